"""Client of the inference service (`python -m adapter_deploy.service`), stdlib only.

Used by the deployer's VERIFY phase on the endpoint side, next to the service:

    from adapter_deploy.engines.service_client import ServiceEngine, wait_for_version
    wait_for_version("http://127.0.0.1:8765", "gemma_4b", "cycle2_20260315_f1e2d3c4", 30)
    result = run_health_check(ServiceEngine("http://127.0.0.1:8765", "gemma_4b"))
    result = run_transcription_check(ServiceEngine("http://127.0.0.1:8765", "whisper"), clips)

Only loopback URLs are accepted: the service listens on 127.0.0.1 and the deployer reaches it
through the endpoint's ssh connection, never across the network.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from adapter_deploy.common.errors import ReloadFailed, RemoteError, UsageError

if TYPE_CHECKING:
    from adapter_deploy.engines.base import LoadedRelease, Translation

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
POLL_INTERVAL_S = 0.2


def _checked(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise UsageError(
            f"service URL {url!r} is not a loopback http URL",
            fix="set service_url: http://127.0.0.1:PORT in params.yaml",
        )
    return url.rstrip("/")


def _request(
    url: str,
    timeout: float,
    body: dict[str, Any] | None = None,
    audio: bytes | None = None,
) -> dict[str, Any]:
    """One request (a JSON `body`, WAV `audio` or neither: GET) answered with JSON; HTTP
    errors come back as RemoteError carrying the service's message."""
    data = json.dumps(body).encode() if body is not None else audio
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    request.add_header("Content-Type", "application/json" if audio is None else "audio/wav")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")
        raise RemoteError(
            f"{url} answered {err.code}: {detail}", fix="check the service log"
        ) from None
    except (urllib.error.URLError, OSError, json.JSONDecodeError) as err:
        reason = getattr(err, "reason", err)
        raise RemoteError(
            f"service at {url} is unreachable ({reason})",
            fix="start it: python -m adapter_deploy.service --params params.yaml --endpoint NAME",
        ) from None


def service_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The service's GET /status document."""
    return _request(_checked(url) + "/status", timeout)


def _reported(status: dict[str, Any] | None, model: str) -> dict[str, Any]:
    return ((status or {}).get("models") or {}).get(model) or {}


def _acknowledged(entry: dict[str, Any], version_id: str, sha256: str | None) -> bool:
    last = entry.get("last_reload") or {}
    return (
        entry.get("version_id") == version_id
        and (sha256 is None or entry.get("sha256") == sha256)
        and entry.get("source") == "active"
        # A fresh start (restart method) has no reload yet; otherwise the last one must be ok.
        and last.get("result") in (None, "ok", "noop")
    )


def wait_for_version(
    url: str,
    model: str,
    version_id: str,
    timeout_s: float,
    sha256: str | None = None,
) -> dict[str, Any]:
    """Poll /status until `model` serves `version_id` (and `sha256`, when given).

    Returns the model's status entry. Raises ReloadFailed when the service reports that its
    reload to this version failed, or when the deadline passes (an unreachable service counts
    as not yet acknowledged, so a restart can be waited for the same way).
    """
    deadline = time.monotonic() + timeout_s
    status, unreachable = None, ""
    while True:
        try:
            status, unreachable = service_status(url, timeout=min(5.0, max(timeout_s, 0.1))), ""
        except RemoteError as err:
            unreachable = err.message
        entry = _reported(status, model)
        if _acknowledged(entry, version_id, sha256):
            return entry
        last = entry.get("last_reload") or {}
        if last.get("result") == "error" and last.get("version_id") == version_id:
            raise ReloadFailed(
                f"{model}: the service failed to load {version_id} ({last.get('error')}); "
                f"it still serves {entry.get('version_id')}",
                fix="the release is broken on this endpoint; roll back or redeploy it",
            )
        if time.monotonic() >= deadline:
            raise ReloadFailed(_timeout_message(model, version_id, timeout_s, entry, unreachable))
        time.sleep(POLL_INTERVAL_S)


def _timeout_message(
    model: str, version_id: str, timeout_s: float, entry: dict[str, Any], unreachable: str
) -> str:
    if unreachable:
        reported = unreachable
    elif not entry:
        reported = "the service does not serve this model"
    else:
        last = entry.get("last_reload") or {}
        reported = (
            f"reported {entry.get('version_id')} (source {entry.get('source')}, "
            f"last reload {last.get('result')} for {last.get('version_id')})"
        )
    return (
        f"{model}: no acknowledgement of {version_id} within {timeout_s:g} s; {reported}. "
        "Fix: check that the reload signal reached the service (pidfile) and its log"
    )


class ServiceEngine:
    """The Engine protocol over HTTP, so the health check can run through the live service."""

    def __init__(self, url: str, model: str, timeout: float = 60.0) -> None:
        self.url, self.model, self.timeout = _checked(url), model, timeout

    @property
    def loaded(self) -> LoadedRelease | None:
        """What the service reports it serves for this model (a LoadedRelease), or None."""
        from adapter_deploy.engines.base import LoadedRelease

        entry = _reported(service_status(self.url, self.timeout), self.model)
        if not entry.get("version_id"):
            return None
        keys = ("version_id", "sha256", "path", "kind")
        return LoadedRelease(**{k: entry.get(k) or "" for k in keys})

    def translate(self, text: str) -> Translation:
        """POST /translate; latency is the round trip, what a caller of the service waits."""
        from adapter_deploy.engines.base import Translation

        start = time.perf_counter()
        answer = _request(
            self.url + "/translate", self.timeout, {"model": self.model, "text": text}
        )
        return Translation(str(answer.get("text", "")), time.perf_counter() - start)

    def transcribe(self, audio_path: str | Path) -> Translation:
        """POST the WAV file to /transcribe; latency is the round trip, as for `translate`."""
        from adapter_deploy.engines.base import Translation

        try:
            audio = Path(audio_path).read_bytes()
        except OSError as err:
            raise UsageError(
                f"audio file {audio_path} is unreadable ({err})", fix="check the clip file"
            ) from err
        start = time.perf_counter()
        url = f"{self.url}/transcribe?model={quote(self.model, safe='')}"
        answer = _request(url, self.timeout, audio=audio)
        return Translation(str(answer.get("text", "")), time.perf_counter() - start)

    def reload(self, adapter_path: object) -> bool:
        raise UsageError(
            "a running service reloads on a signal, not on a call",
            fix="flip the endpoint's active link and send SIGUSR1 to the pid in its pidfile",
        )
