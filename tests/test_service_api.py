"""What inference tooling speaks to the service: the OpenAI API and Prometheus `/metrics`.

One real service process on loopback serves gemma_4b (V1 active), gemma_12b (only a corrupt
release: it falls back to its base model) and whisper (a transcription model); the official
`openai` client and prometheus_client's own parser talk to it.
Run: pytest tests/test_service_api.py
"""

from __future__ import annotations

import threading
import time
import urllib.request
from typing import Any

import openai
import pytest
from adapter_deploy.common.clock import utc_now
from adapter_deploy.engines.service_client import service_status, wait_for_version
from adapter_deploy.kit.net import free_port
from adapter_deploy.service.state import Control, Service, ServiceConfig
from prometheus_client.parser import text_string_to_metric_families
from test_serve import (
    BAD,
    JAMES,
    START_TIMEOUT_S,
    V1,
    V2,
    add_release,
    endpoint_dir,
    flip,
    http,
)
from test_serve import Service as ServiceProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
CHAT = "/v1/chat/completions"
W1 = "cycle1_20260201_11111111"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, kit: Any, whisper_kit: Any) -> Any:
    tmp = tmp_path_factory.mktemp("serve-api")
    adapters = endpoint_dir(tmp, kit)
    twelve = adapters / "gemma_12b"
    add_release(twelve, BAD, kit.good, corrupt=True)
    flip(twelve, BAD)
    add_release(adapters / "whisper", W1, whisper_kit.good)
    flip(adapters / "whisper", W1)
    args = ["--adapter-dir", str(adapters), "--platform", "cpu", "--task", "whisper=transcription"]
    args += ["--base-model", f"gemma_4b={kit.base}", "--base-model", f"gemma_12b={kit.base}"]
    service = ServiceProcess(tmp, args, free_port())
    service.wait(200, START_TIMEOUT_S)
    service.model_dir = adapters / "gemma_4b"
    yield service
    service.stop()


@pytest.fixture
def client(svc: ServiceProcess) -> openai.OpenAI:
    # No retries: a refusal must surface as the client's exception at once.
    return openai.OpenAI(base_url=svc.url + "/v1", api_key="unused", max_retries=0)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return parse(resp.read().decode())


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def releases(samples: Samples) -> dict[str, dict[str, str]]:
    """adapter_release_info's labels per model."""
    return {
        dict(labels)["model"]: dict(labels)
        for (name, labels) in samples
        if name == "adapter_release_info"
    }


def ask(client: openai.OpenAI, content: Any, model: str = "gemma_4b") -> Any:
    """A chat completion through the raw response (for its headers)."""
    messages = [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": content},
    ]
    return client.chat.completions.with_raw_response.create(model=model, messages=messages)


def test_models_lists_the_served_models(svc: ServiceProcess, client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert sorted(models) == ["gemma_12b", "gemma_4b", "whisper"]
    four = models["gemma_4b"]
    assert four.object == "model" and four.owned_by == "adapter-deploy" and four.created > 0
    assert client.models.retrieve("gemma_4b").id == "gemma_4b"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gemma_27b")
    assert err.value.code == "model_not_found"


def test_chat_completion_translates_plain_text(svc: ServiceProcess, client: openai.OpenAI) -> None:
    raw = ask(client, JAMES)
    assert raw.headers["X-Adapter-Version"] == V1
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == "gemma_4b"
    assert completion.id.startswith("chatcmpl-") and completion.created > 0
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and "Santiago" in choice.message.content
    assert choice.finish_reason == "stop"
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_translategemma_structured_content_matches_translate(
    svc: ServiceProcess, client: openai.OpenAI
) -> None:
    part = {"type": "text", "source_lang_code": "en", "target_lang_code": "es", "text": JAMES}
    answer = ask(client, [part]).parse().choices[0].message.content
    code, plain = svc.translate(JAMES)
    assert code == 200 and answer == plain["text"]
    with urllib.request.urlopen(
        urllib.request.Request(
            svc.url + "/translate",
            b'{"model": "gemma_4b", "text": "Amen."}',
            {"Content-Type": "application/json"},
        ),
        timeout=30,
    ) as resp:
        assert resp.headers["X-Adapter-Version"] == V1


def test_transcribe_names_its_release_in_the_header(svc: ServiceProcess, whisper_kit: Any) -> None:
    clip = (whisper_kit.clips_json.parent / "clip1.wav").read_bytes()
    request = urllib.request.Request(
        svc.url + "/transcribe?model=whisper", clip, {"Content-Type": "audio/wav"}
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.headers["X-Adapter-Version"] == W1


def test_fallback_model_answers_with_base_version(
    svc: ServiceProcess, client: openai.OpenAI
) -> None:
    raw = ask(client, JAMES, model="gemma_12b")
    assert raw.headers["X-Adapter-Version"] == "base" and raw.parse().choices[0].message.content
    samples = scrape(svc.url)
    assert value(samples, "adapter_fallback", model="gemma_12b") == 1
    assert value(samples, "adapter_fallback", model="gemma_4b") == 0
    assert releases(samples)["gemma_12b"]["source"] == "base"


def test_errors_come_in_openai_shape(svc: ServiceProcess, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, JAMES, model="gemma_27b")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    assert missing.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as stream:
        client.chat.completions.create(
            model="gemma_4b", messages=[{"role": "user", "content": JAMES}], stream=True
        )
    assert stream.value.param == "stream" and "stream: true is not supported" in str(stream.value)
    with pytest.raises(openai.BadRequestError) as whisper:
        ask(client, JAMES, model="whisper")
    assert whisper.value.code == "wrong_task" and "/transcribe?model=whisper" in str(whisper.value)
    french = {"type": "text", "source_lang_code": "fr", "target_lang_code": "de", "text": JAMES}
    with pytest.raises(openai.BadRequestError) as pair:
        ask(client, [french])
    assert pair.value.code == "unsupported_language_pair" and "en -> es" in str(pair.value)
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(model="gemma_4b", messages=[])
    assert empty.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as long:
        ask(client, "Amen. " * 300)
    assert long.value.code == "context_length_exceeded"


def test_bad_bodies_get_openai_errors(svc: ServiceProcess) -> None:
    code, body = http(svc.url + CHAT, {"model": "gemma_4b"})
    assert code == 400 and body["error"]["param"] == "messages"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    code, body = http(svc.url + CHAT, [1, 2])  # type: ignore[arg-type]
    assert code == 400 and body["error"]["type"] == "invalid_request_error"
    # the plain API keeps its plain errors
    code, body = http(svc.url + "/translate", {"model": "gemma_4b"})
    assert code == 400 and isinstance(body["error"], str)


def test_metrics_count_requests_and_latency(svc: ServiceProcess, client: openai.OpenAI) -> None:
    before = scrape(svc.url)
    ask(client, JAMES)
    ask(client, JAMES)
    svc.translate(JAMES)
    with pytest.raises(openai.NotFoundError):
        ask(client, JAMES, model="gemma_27b")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gemma_4b", messages=[])
    after = scrape(svc.url)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("adapter_requests_total", model="gemma_4b", path=CHAT, code="200") == 2
    assert moved("adapter_requests_total", model="gemma_4b", path="/translate", code="200") == 1
    # a made-up model name is no label value of its own
    assert moved("adapter_requests_total", model="_other", path=CHAT, code="404") == 1
    assert moved("adapter_requests_total", model="gemma_4b", path=CHAT, code="400") == 1
    # only answered requests are timed: the 400 is counted, not timed
    assert moved("adapter_request_duration_seconds_count", model="gemma_4b", path=CHAT) == 2
    assert moved("adapter_request_duration_seconds_sum", model="gemma_4b", path=CHAT) > 0
    assert not [key for key in after if ("model", "gemma_27b") in key[1]]
    assert value(after, "adapter_queue_depth") == 0


def test_release_info_matches_status(svc: ServiceProcess) -> None:
    models = service_status(svc.url)["models"]
    info = releases(scrape(svc.url))
    assert sorted(info) == sorted(models)
    for name, status in models.items():
        assert info[name]["version_id"] == (status["version_id"] or "")
        assert info[name]["sha256"] == (status["sha256"] or "")
        assert info[name]["engine"] == status["engine"] and info[name]["task"] == status["task"]


def test_reloads_show_in_metrics_and_version_header(
    svc: ServiceProcess, client: openai.OpenAI
) -> None:
    before = scrape(svc.url)
    flip(svc.model_dir, V2)
    svc.signal_reload()
    wait_for_version(svc.url, "gemma_4b", V2, 60)
    after = scrape(svc.url)
    ok = value(after, "adapter_reloads_total", model="gemma_4b", result="ok")
    assert ok - value(before, "adapter_reloads_total", model="gemma_4b", result="ok") == 1
    assert releases(after)["gemma_4b"]["version_id"] == V2
    raw = ask(client, JAMES)
    assert raw.headers["X-Adapter-Version"] == V2
    assert "Jacobo" in raw.parse().choices[0].message.content

    flip(svc.model_dir, BAD)  # a damaged release: the reload fails, V2 keeps serving
    at = utc_now(ms=True)
    svc.signal_reload()
    deadline = time.monotonic() + 60
    while (svc.model_status()["last_reload"] or {}).get("at", "") < at:
        assert time.monotonic() < deadline, "the reload never ran"
        time.sleep(0.05)
    failed = scrape(svc.url)
    assert value(failed, "adapter_reloads_total", model="gemma_4b", result="error") == 1
    assert releases(failed)["gemma_4b"]["version_id"] == V2
    flip(svc.model_dir, V1)


def test_queue_depth_counts_requests_waiting_for_the_engine(tmp_path: Any, kit: Any) -> None:
    """In process: the engine thread is held, so a request must wait for it."""
    adapters = endpoint_dir(tmp_path, kit)
    base = {"gemma_4b": str(kit.base)}
    config = ServiceConfig(adapter_dir=adapters, models=["gemma_4b"], base_models=base)
    config.platform = "cpu"
    service, gate = Service(config, Control()), threading.Event()
    try:
        service.load_all()
        service.ready = True
        service.executor.submit(gate.wait)
        waiter = threading.Thread(target=service.translate, args=("gemma_4b", JAMES))
        waiter.start()
        deadline = time.monotonic() + 30
        while value(metrics_of(service), "adapter_queue_depth") != 1:
            assert time.monotonic() < deadline, "the request never queued"
            time.sleep(0.01)
        gate.set()
        waiter.join(timeout=60)
        assert value(metrics_of(service), "adapter_queue_depth") == 0
        assert service.status()["waiting"] == 0
    finally:
        gate.set()
        service.close()


def metrics_of(service: Service) -> Samples:
    return parse(service.metrics.exposition()[0].decode())


def test_each_service_has_its_own_registry(tmp_path: Any) -> None:
    one, two = (Service(ServiceConfig(adapter_dir=tmp_path), Control()) for _ in range(2))
    try:
        one.metrics.reloaded("gemma_4b", "ok")
        assert value(metrics_of(one), "adapter_reloads_total", model="gemma_4b", result="ok") == 1
        assert value(metrics_of(two), "adapter_reloads_total", model="gemma_4b", result="ok") == 0
    finally:
        one.close()
        two.close()
