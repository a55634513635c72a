"""What inference tooling speaks to the service: the OpenAI API and Prometheus `/metrics`.

One real service process on loopback serves gemma_4b (V1 active), gemma_12b (only a corrupt
release: it falls back to its base model) and whisper (a transcription model); the official
`openai` client and prometheus_client's own parser talk to it.
Run: pytest tests/test_service_api.py
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from typing import Any

import openai
import pytest
from adapter_deploy.common.clock import utc_now
from adapter_deploy.engines.base import Translation
from adapter_deploy.engines.service_client import service_status, wait_for_version
from adapter_deploy.kit.net import free_port
from adapter_deploy.service.serve import start_http
from adapter_deploy.service.state import Control, ServedModel, Service, ServiceConfig
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
COMPLETIONS = "/v1/completions"
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


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_chat_completion_streams_server_sent_events(
    svc: ServiceProcess, client: openai.OpenAI
) -> None:
    whole = ask(client, JAMES).parse()
    raw = client.chat.completions.with_raw_response.create(
        model="gemma_4b",
        messages=user(JAMES),
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["Content-Type"] == "text/event-stream"
    assert raw.headers["X-Adapter-Version"] == V1
    chunks = list(raw.parse())
    first, *content, end, usage = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    pieces = [chunk.choices[0].delta.content for chunk in content]
    assert len(pieces) > 2 and "".join(pieces) == whole.choices[0].message.content  # word by word
    assert [c.choices[0].finish_reason for c in content] == [None] * len(content)
    assert end.choices[0].finish_reason == "stop" and not end.choices[0].delta.content
    assert usage.choices == [] and usage.usage.model_dump() == whole.usage.model_dump()
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert {c.system_fingerprint for c in chunks} == {V1}


def test_completions_translate_the_prompt(svc: ServiceProcess, client: openai.OpenAI) -> None:
    expected = ask(client, JAMES).parse().choices[0].message.content
    raw = client.completions.with_raw_response.create(model="gemma_4b", prompt=JAMES)
    assert raw.headers["X-Adapter-Version"] == V1
    completion = raw.parse()
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == expected and completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    listed = client.completions.create(model="gemma_4b", prompt=[JAMES])
    assert listed.choices[0].text == expected
    chunks = list(client.completions.create(model="gemma_4b", prompt=JAMES, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gemma_27b", prompt=JAMES)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as whisper:
        client.completions.create(model="whisper", prompt=JAMES, stream=True)
    assert whisper.value.code == "wrong_task"  # refused before the stream opens
    with pytest.raises(openai.BadRequestError) as ids:
        client.completions.create(model="gemma_4b", prompt=[1, 2, 3])
    assert ids.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="gemma_4b", prompt="Amen. " * 300)
    assert (long.value.code, long.value.param) == ("context_length_exceeded", "prompt")


def test_max_tokens_caps_decoding(svc: ServiceProcess, client: openai.OpenAI) -> None:
    whole = ask(client, JAMES).parse()
    capped = client.chat.completions.create(model="gemma_4b", messages=user(JAMES), max_tokens=2)
    assert capped.choices[0].finish_reason == "length"
    text = capped.choices[0].message.content
    assert (
        text
        and whole.choices[0].message.content.startswith(text)
        and len(text) < len(whole.choices[0].message.content)
    )
    assert 0 < capped.usage.completion_tokens <= 2
    assert capped.usage.prompt_tokens == whole.usage.prompt_tokens
    roomy = client.chat.completions.create(
        model="gemma_4b", messages=user(JAMES), max_completion_tokens=1000
    )
    assert roomy.choices[0].finish_reason == "stop"
    assert roomy.choices[0].message.content == whole.choices[0].message.content
    legacy = client.completions.create(model="gemma_4b", prompt=JAMES, max_tokens=2)
    assert (legacy.choices[0].text, legacy.choices[0].finish_reason) == (text, "length")
    chunks = list(
        client.chat.completions.create(
            model="gemma_4b", messages=user(JAMES), max_tokens=2, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_stream_refusals_before_and_after_it_opens(
    svc: ServiceProcess, client: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError):  # before: an HTTP status
        client.chat.completions.create(model="gemma_27b", messages=user(JAMES), stream=True)
    stream = client.chat.completions.create(
        model="gemma_4b", messages=user("Amen. " * 300), stream=True
    )
    with pytest.raises(openai.APIError) as long:  # after (the engine counts tokens): an event
        list(stream)
    assert long.value.code == "context_length_exceeded"
    assert long.value.type == "invalid_request_error"


class GatedEngine:
    """An engine whose answer waits for its gate: what a slow translation looks like."""

    loaded = None

    def __init__(self) -> None:
        self.gate = threading.Event()

    def translate(self, text: str, max_new_tokens: int | None = None) -> Translation:
        assert self.gate.wait(30), "the test never opened the gate"
        return Translation("Hola y adiós.", 0.01)

    def reload(self, adapter_path: Any) -> bool:
        return False


def head_and_first_event(sock: socket.socket) -> tuple[bytes, bytes]:
    """An answer's head and its first server-sent event, read as they arrive."""
    data = b""
    while b"\n\n" not in data.partition(b"\r\n\r\n")[2]:
        more = sock.recv(4096)
        assert more, f"closed before the first event: {data!r}"
        data += more
    head, _, first = data.partition(b"\r\n\r\n")
    return head, first


def test_a_stream_opens_before_the_engine_answers(tmp_path: Any) -> None:
    """In process, no model: the headers and role chunk come while the engine still works;
    the text, the finish and [DONE] follow it, and the service closes the connection."""
    service = Service(ServiceConfig(adapter_dir=tmp_path, port=free_port()), Control())
    engine, served = GatedEngine(), ServedModel("gemma_4b")
    served.serve(engine, "base")  # type: ignore[arg-type]
    service.served["gemma_4b"], service.ready = served, True
    server = start_http(service)
    body = json.dumps({"model": "gemma_4b", "messages": user("Hello and goodbye."), "stream": True})
    head = f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    try:
        with socket.create_connection(("127.0.0.1", service.config.port), timeout=10) as sock:
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())
            head, first = head_and_first_event(sock)
            status, *lines = head.decode().split("\r\n")
            assert status.startswith("HTTP/1.0 200 ") and not engine.gate.is_set()
            headers = dict(line.split(": ", 1) for line in lines)
            assert headers["Content-Type"] == "text/event-stream"
            assert headers["X-Adapter-Version"] == "base" and "Content-Length" not in headers
            assert json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant"}
            engine.gate.set()
            rest = b""
            while more := sock.recv(4096):  # ends: the service closes after [DONE]
                rest += more
        events = [json.loads(e[6:]) for e in rest.split(b"\n\n")[:-2]]
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == (
            "Hola y adiós."
        )
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        assert rest.endswith(b"\n\ndata: [DONE]\n\n")
    finally:
        engine.gate.set()
        server.shutdown()
        server.server_close()
        service.close()


def test_bad_bodies_get_openai_errors(svc: ServiceProcess) -> None:
    code, body = http(svc.url + CHAT, {"model": "gemma_4b"})
    assert code == 400 and body["error"]["param"] == "messages"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    code, body = http(svc.url + CHAT, [1, 2])  # type: ignore[arg-type]
    assert code == 400 and body["error"]["type"] == "invalid_request_error"
    user = [{"role": "user", "content": JAMES}]
    for name, bad in (("stream", "yes"), ("max_tokens", 0), ("max_completion_tokens", 1.5)):
        code, body = http(svc.url + CHAT, {"model": "gemma_4b", "messages": user, name: bad})
        assert code == 400 and body["error"]["param"] == name, (name, body)
    code, body = http(svc.url + COMPLETIONS, {"model": "gemma_4b", "prompt": [JAMES, JAMES]})
    assert code == 400 and body["error"]["param"] == "prompt"
    code, body = http(svc.url + COMPLETIONS, {"model": "gemma_4b", "prompt": JAMES, "echo": True})
    assert code == 400 and body["error"]["param"] == "echo"
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
