"""The inference service against hostile or runaway requests, on a real service process."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from adapter_deploy.kit.net import free_port
from test_serve import JAMES, Service, endpoint_dir, http

LONG_TEXT = ("In the beginning was the Word, and the Word was with God. " * 17)[:990]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, kit: Any) -> Any:
    tmp = tmp_path_factory.mktemp("serve-hostile")
    adapters = endpoint_dir(tmp, kit)
    args = ["--adapter-dir", str(adapters), "--models", "gemma_4b", "--platform", "cpu"]
    args += ["--base-model", f"gemma_4b={kit.base}", "--max-queue", "2"]
    service = Service(tmp, args, free_port())
    service.wait(200)
    yield service
    service.stop()


def raw(svc: Service, request: bytes, timeout: float = 10.0) -> tuple[int, bytes, float]:
    """Send bytes as they are; the status code, the response and how long it took."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", svc.port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.split(b"\r\n\r\n", 1)[1]:
                break
    code = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return code, data, time.monotonic() - began


def post(body: bytes, **headers: str) -> bytes:
    fields = {"Host": "127.0.0.1", "Content-Type": "application/json"} | {
        k.replace("_", "-"): v for k, v in headers.items()
    }
    lines = [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return ("POST /translate HTTP/1.1\r\n" + "\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_invalid_content_length_is_400_without_reading(svc: Service) -> None:
    body = json.dumps({"model": "gemma_4b", "text": "Amen."}).encode()
    code, _, took = raw(svc, post(body, Content_Length="-1"))
    assert code == 400 and took < 5
    code, data, _ = raw(svc, post(body, Content_Length="abc"))
    assert code == 400 and b"invalid Content-Length" in data


def test_only_json_from_loopback_is_served(svc: Service) -> None:
    body = json.dumps({"model": "gemma_4b", "text": "Amen."}).encode()
    length = str(len(body))
    plain = post(
        body, Content_Length=length, Content_Type="text/plain", Origin="http://evil.example"
    )
    assert raw(svc, plain)[0] in (403, 415)
    assert raw(svc, post(body, Content_Length=length, Content_Type="text/plain"))[0] == 415
    foreign = post(body, Content_Length=length, Origin="http://evil.example")
    assert raw(svc, foreign)[0] == 403
    rebound = post(body, Content_Length=length, Host="attacker.example:8765")
    assert raw(svc, rebound)[0] == 403
    status = b"GET /status HTTP/1.1\r\nHost: attacker.example\r\n\r\n"
    assert raw(svc, status)[0] == 403
    assert raw(svc, post(body, Content_Length=length))[0] == 200


def test_long_input_is_413_and_does_not_hold_the_engine(svc: Service) -> None:
    began = time.monotonic()
    code, answer = svc.translate(LONG_TEXT)
    assert code == 413 and "tokens, over the limit" in answer["error"]
    code, answer = svc.translate(JAMES)
    assert code == 200 and time.monotonic() - began < 8


def test_a_full_queue_answers_503_with_retry_after(svc: Service) -> None:
    results: list[tuple[int, str | None]] = []

    def one() -> None:
        with socket.create_connection(("127.0.0.1", svc.port), timeout=60) as sock:
            body = json.dumps({"model": "gemma_4b", "text": JAMES}).encode()
            sock.sendall(post(body, Content_Length=str(len(body))))
            data = sock.recv(65536)
        code = int(data.split(b" ", 2)[1])
        retry = next(
            (line.split(b":", 1)[1].strip().decode() for line in data.split(b"\r\n")
             if line.lower().startswith(b"retry-after:")),
            None,
        )  # fmt: skip
        results.append((code, retry))

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {code for code, _ in results} <= {200, 503}
    assert any(code == 503 for code, _ in results), results
    assert all(retry == "1" for code, retry in results if code == 503)
    assert svc.translate(JAMES)[0] == 200


def test_queued_work_of_a_client_that_left_is_dropped(svc: Service) -> None:
    before = http(svc.url + "/status")[1]["dropped_requests"]
    body = json.dumps({"model": "gemma_4b", "text": JAMES}).encode()
    for _ in range(2):
        socks = []
        for _ in range(2):  # fills the queue (max 2): one runs, one waits
            sock = socket.create_connection(("127.0.0.1", svc.port))
            sock.sendall(post(body, Content_Length=str(len(body))))
            socks.append(sock)
        for sock in socks:
            sock.close()  # both clients leave at once
        time.sleep(1.0)
    assert http(svc.url + "/status")[1]["dropped_requests"] > before
    assert svc.translate(JAMES)[0] == 200


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads")))


def test_idle_half_sent_requests_neither_pile_up_threads_nor_stay(svc: Service) -> None:
    idle = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(150)]
    for sock in idle:
        sock.sendall(b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
    time.sleep(1.0)
    assert _threads(svc.proc.pid) < 64 + 16  # bounded, not one thread per socket
    for sock in idle[100:]:
        sock.close()
    # The service drops a half-sent request after its socket timeout (10 s).
    idle[0].settimeout(20)
    assert idle[0].recv(1024) == b""
    for sock in idle[:100]:
        sock.close()
    time.sleep(0.5)
    assert svc.health_code() == 200
