"""The inference service against hostile or runaway requests, on a real service process."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from adapter_deploy.kit.net import free_port
from test_serve import JAMES, Service, endpoint_dir, http

LONG_TEXT = ("In the beginning was the Word, and the Word was with God. " * 17)[:990]
DEADLINE_S = 2.0  # --request-deadline here: a request's head and body arrive within this
MAX_CONNECTIONS = 64  # the service's general pool (serve.MAX_CONNECTIONS)
MAX_WAITING = 256  # connections it holds while their head arrives (serve.MAX_WAITING)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, kit: Any) -> Any:
    tmp = tmp_path_factory.mktemp("serve-hostile")
    adapters = endpoint_dir(tmp, kit)
    args = ["--adapter-dir", str(adapters), "--models", "gemma_4b", "--platform", "cpu"]
    args += ["--base-model", f"gemma_4b={kit.base}", "--max-queue", "2"]
    args += ["--request-deadline", str(DEADLINE_S), "-v"]  # -v: the http debug log too
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
    # The service drops a request not whole by its deadline (DEADLINE_S here, 10 s by default).
    idle[0].settimeout(20)
    assert idle[0].recv(1024) == b""
    for sock in idle[:100]:
        sock.close()
    time.sleep(0.5)
    assert svc.health_code() == 200


def _closed_by_service(sock: socket.socket) -> bool:
    """Has the service closed this connection (EOF or reset), without an answer?"""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
        return bool(ready) and sock.recv(1024) == b""
    except OSError:
        return True


def test_a_trickled_request_is_cut_off_at_its_deadline(svc: Service) -> None:
    """One deadline for head and body together: a byte every 0.2 s never resets it."""
    head = b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    slow_head = socket.create_connection(("127.0.0.1", svc.port))
    slow_head.sendall(head)  # then one more header byte at a time, never the blank line
    slow_body = socket.create_connection(("127.0.0.1", svc.port))
    slow_body.sendall(head + b"Content-Length: 1000\r\n\r\n")  # then one body byte at a time
    began, cut = time.monotonic(), {}
    try:
        while len(cut) < 2 and time.monotonic() - began < DEADLINE_S + 4:
            for name, sock in (("head", slow_head), ("body", slow_body)):
                if name in cut:
                    continue
                if _closed_by_service(sock):
                    cut[name] = time.monotonic() - began
                    continue
                try:
                    sock.send(b"x")
                except OSError:
                    cut[name] = time.monotonic() - began
            time.sleep(0.2)
    finally:
        slow_head.close()
        slow_body.close()
    assert set(cut) == {"head", "body"}, f"still open after {DEADLINE_S + 4} s: {cut}"
    assert all(DEADLINE_S - 0.3 < took < DEADLINE_S + 1.5 for took in cut.values()), cut
    assert svc.health_code() == 200


def test_health_answers_while_slow_clients_hold_the_pool(svc: Service) -> None:
    """Slowloris: slow heads (some asking for /health themselves) beyond what the service
    holds waiting, and slow bodies in every general handler slot; /health and /status
    still answer at once, the pool answers 503 + Retry-After, and all of it is cut at the
    deadline."""
    slow_heads = []
    for _ in range(MAX_WAITING + 44):  # more than it holds: the oldest are closed first
        sock = socket.create_connection(("127.0.0.1", svc.port))
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        slow_heads.append(sock)
    held = time.monotonic()  # every general slot is held until at least DEADLINE_S after this
    slow_bodies = []
    for _ in range(MAX_CONNECTIONS):
        sock = socket.create_connection(("127.0.0.1", svc.port))
        sock.sendall(post(b'{"model": "gem', Content_Length="1000"))  # the body never ends
        slow_bodies.append(sock)
    try:
        body = json.dumps({"model": "gemma_4b", "text": "Amen."}).encode()
        while (refused := raw(svc, post(body, Content_Length=str(len(body)))))[0] != 503:
            assert time.monotonic() - held < 1.0, (
                f"the slow bodies never filled the pool: {refused}"
            )
            time.sleep(0.05)  # they are still reaching their handler threads
        assert b"Retry-After: 1" in refused[1]
        assert _threads(svc.proc.pid) < MAX_CONNECTIONS + 16  # slow heads take no thread
        began = time.monotonic()
        assert svc.health_code() == 200
        assert http(svc.url + "/status")[0] == 200
        answered = time.monotonic()
        assert answered - began < 1.0, f"/health and /status took {answered - began:.2f} s"
        assert answered - held < DEADLINE_S, "answered only once the slow bodies were cut"
        for sock in slow_heads + slow_bodies:  # all cut at their deadline, none answered
            sock.settimeout(held + DEADLINE_S + 3 - time.monotonic())
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        for sock in slow_heads + slow_bodies:
            sock.close()
    assert svc.translate(JAMES)[0] == 200  # the pool is free again


def test_debug_log_escapes_control_characters(svc: Service) -> None:
    """The request line is logged (at debug) with control characters escaped, as http.server
    does: a client cannot write terminal escape sequences to the operator's screen."""
    request = b"GET /\x1b[2J\x1b]0;owned\x07 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    assert raw(svc, request)[0] == 404
    deadline = time.monotonic() + 5
    while b"owned" not in (log := svc.log.read_bytes()):
        assert time.monotonic() < deadline, "the request line was never logged"
        time.sleep(0.05)
    assert b"\x1b[2J" not in log and b"\x07" not in log
    assert b"GET /\\x1b[2J\\x1b]0;owned\\x07 HTTP/1.1" in log
