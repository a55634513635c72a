"""What the service exposes at `GET /metrics`, in the Prometheus text format.

Events (requests, reloads) are counted as they happen; what the service serves right now
(release per model, fallback, queue depth) is read from its status at scrape time, so a
scrape never reports a release that is no longer loaded. Each service has its own registry:
two services in one process (tests) never share counts.

    adapter_requests_total{model,path,code}          answered requests (code 499: client left)
    adapter_request_duration_seconds{model,path}     histogram of answered (200) requests
    adapter_reloads_total{model,result}              result: ok, noop or error
    adapter_release_info{model,version_id,sha256,kind,source,engine,task}   1 per served model
    adapter_fallback{model}                          1 while a model serves its base model
    adapter_queue_depth                              requests waiting for the engine thread
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric

# The model label of a request that named no served model: client-chosen names never become
# label values, so a stream of made-up names cannot grow the series without bound.
OTHER_MODEL = "_other"
# From a tiny model's milliseconds to the request timeout (120 s) of a big one on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RELEASE_LABELS = ("version_id", "sha256", "kind", "source", "engine", "task")


class ServiceMetrics:
    """The counters the service bumps plus a collector over its live status."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "adapter_requests",
            "Requests answered, by model, path and HTTP status",
            ["model", "path", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "adapter_request_duration_seconds",
            "Time from request in to answer out of answered requests, queue wait included",
            ["model", "path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "adapter_reloads",
            "Reloads (SIGUSR1) per model by result: ok, noop or error (the old release kept)",
            ["model", "result"],
            registry=self.registry,
        )
        self.registry.register(_StatusCollector(status))

    def request(self, model: str, path: str, code: int, seconds: float) -> None:
        self.requests.labels(model, path, str(code)).inc()
        if code == 200:  # a refusal's few microseconds would drag every latency quantile down
            self.latency.labels(model, path).observe(seconds)

    def reloaded(self, model: str, result: str) -> None:
        self.reloads.labels(model, result).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The scrape body and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StatusCollector:
    """Gauges read from `Service.status()` at scrape time."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration; names are fixed below

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        release = InfoMetricFamily(
            "adapter_release",
            "The release each served model answers with (version_id empty: base model)",
            labels=["model"],
        )
        fallback = GaugeMetricFamily(
            "adapter_fallback",
            "1 while a model serves its base model because no release loaded",
            labels=["model"],
        )
        for name, model in status["models"].items():
            if not model["ready"]:
                continue
            values = {key: str(model.get(key) or "") for key in RELEASE_LABELS}
            release.add_metric([name], values)
            fallback.add_metric([name], 1.0 if model["fallback"] else 0.0)
        yield release
        yield fallback
        yield GaugeMetricFamily(
            "adapter_queue_depth",
            "Requests waiting for the engine thread (the one it is running not included)",
            value=status["waiting"],
        )
