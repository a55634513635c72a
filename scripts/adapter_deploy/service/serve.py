"""The inference service: hot reload on SIGUSR1 without pausing translations (the operator's plan).

Usage:
    python -m adapter_deploy.service --params params.yaml --endpoint mac-dev
    python -m adapter_deploy.service --adapter-dir DIR [--models gemma_4b ...] \\
        [--base-model gemma_4b=/models/base ...] [--task whisper=transcription ...] \\
        [--platform cpu|cuda|mlx|auto] [--port 8765] [--pidfile FILE] [--diagnostics FILE] \\
        [--reload-mode auto|standby|inplace] [--request-deadline 10] [--shadow-inputs 20]

It serves every model with an `active` link under the adapter dir (`--models` / the endpoint's
`models:` narrows that), on 127.0.0.1 only. A model's task (params.yaml `task:`, or `--task`;
default translation) picks its engine: transcription models get the Whisper engine.
    POST /translate {"model", "text"} -> {"text", "version_id", "latency_s"}
    POST /transcribe?model=NAME, body: a PCM WAV file (Content-Type audio/wav or
         application/octet-stream) -> {"text", "version_id", "latency_s"}
    GET  /status    -> per model: task, engine, version_id, sha256, loaded_at, last_reload,
                       fallback, requests, ...
    GET  /health    -> 200 once every served model is loaded, 503 before
    GET  /metrics   -> Prometheus text: requests, latency, reloads, release, fallback, queue
    GET  /v1/models, POST /v1/chat/completions, POST /v1/completions -> OpenAI-compatible,
         `stream: true` as server-sent events (service/openai_api.py)
Answers of /translate, /transcribe and the /v1/ completions name the release that answered
in an X-Adapter-Version header (`base` when the model serves its base model).
Hostile or runaway requests are refused: a Host or Origin that is not loopback 403 (a web
page or DNS rebinding), a body of another Content-Type 415, an invalid Content-Length 400,
a text over --max-input-tokens 413, a body over 64 KiB (/translate) or --max-audio-bytes
(/transcribe) 413, audio that is no PCM WAV 400, audio longer than the model's window 413,
a request for a model of the other task 400, a full queue 503 + Retry-After
(under /v1/ in OpenAI's error shape, an overlong text there 400 context_length_exceeded);
a request whose client has gone is dropped before it runs. Slow clients (slowloris) cannot
stall it: a request must arrive whole, head and body, within --request-deadline (10 s) of its
connection, however it trickles; a connection gets a thread only once its head is complete
(until then one admission thread holds it, at most 256, the oldest closed first); 64 requests
are served at once, a further 4 threads serve only GET /health and /status, and a request
beyond those gets 503 + Retry-After, so /health answers while slow bodies fill the pool.
The pid goes to the pidfile once the service is ready and is removed on a clean exit.

Signals: SIGUSR1 schedules a reload of every model (several signals coalesce into one pass);
SIGTERM/SIGINT stop it cleanly. The handlers only set a flag: all work runs on the
controller (main) thread, and every engine call that serves requests runs on ONE engine
executor thread, because MLX is not thread-safe.

Reload modes: `standby` builds the new release in a second engine on the controller thread,
warms it up, then swaps it in on the executor between two requests, so a request waits at most
for the swap (the cost: base weights twice in memory during a reload). `inplace` runs
`engine.reload()` on the executor: no second copy, but requests wait for the whole adapter
swap. `auto` = inplace (measured faster; MLX evaluation never leaves one thread).

The endpoint's agent pre-checks a staged release inside the service, over a Unix socket in
the adapter dir (`.service-control.sock`, mode 0600, the service's uid only; never the HTTP
port): the candidate is loaded beside the active adapter on the same base, its sentences run
in turn with live requests (which the active release keeps answering), and the last
--shadow-inputs live translations (memory only, never on disk) are replayed through it to
count changed answers; then it is dropped (service/control.py).

At start-up a model whose `active` does not load falls back to `previous`, then to its base
model, reported loudly (`fallback: true` in /status). A failed reload keeps the old release.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import select
import selectors
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from adapter_deploy.common.errors import AudioTooLong, BadAudio, UsageError
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.engines.factory import TASKS
from adapter_deploy.service.metrics import OTHER_MODEL
from adapter_deploy.service.openai_api import (
    CHAT,
    CLIENT_GONE,
    COMPLETIONS,
    VERSION_HEADER,
    ApiError,
    OpenAIRoutes,
    error_body,
    model_entry,
    model_list,
    version_header,
)
from adapter_deploy.service.state import (
    DEFAULT_PORT,
    LOOPBACK,
    MAX_AUDIO_BYTES,
    REQUEST_TIMEOUT_S,
    Busy,
    ClientGone,
    Control,
    InputTooLong,
    Service,
    ServiceConfig,
    WrongTask,
    reason_of,
)

log = logging.getLogger("adapter_deploy.service")

MAX_BODY = 64 * 1024  # a translation request is a sentence, not a document
MAX_CONNECTIONS = 64  # requests served at once, a thread each; more get 503 + Retry-After
RESERVED_CONNECTIONS = 4  # more threads, for LIGHT_PATHS only: /health answers when all are busy
LIGHT_PATHS = {"/health", "/status"}  # GET only: no body to trickle, the answer is at hand
MAX_WAITING = 256  # connections still sending their head (no thread); more: the oldest is closed
MAX_HEAD_BYTES = 64 * 1024  # a request line and headers longer than this are dropped unread
REQUEST_DEADLINE_S = 10.0  # accept to the end of the body, however slowly the bytes trickle
SOCKET_TIMEOUT_S = 10.0  # writing an answer to a client that does not read it
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
INFERENCE_PATHS = {"/translate", "/transcribe", CHAT, COMPLETIONS}  # counted in /metrics
# What a WAV upload is labelled with; none of them is a type a web page may send cross-site
# without a CORS preflight (which is never answered), like application/json.
AUDIO_TYPES = {
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/vnd.wave",
    "application/octet-stream",
}


# Control characters as \xNN (and \ as \\), as http.server escapes what it logs: a client's
# request line or header must not write escape sequences to an operator's terminal, nor forge
# a log line with a newline.
_CONTROL_CHARS = str.maketrans(
    {c: f"\\x{c:02x}" for c in itertools.chain(range(0x20), range(0x7F, 0xA0))} | {0x5C: "\\\\"}
)


def escape_control(text: str) -> str:
    return text.translate(_CONTROL_CHARS)


# --- HTTP -------------------------------------------------------------------------------
class _DeadlineReader(io.RawIOBase):
    """A request's bytes: first `head` (what admission already read), then the socket's, every
    recv bounded by ONE deadline for the whole request. A per-recv timeout alone lets a client
    that sends a byte now and then hold its connection for ever."""

    def __init__(self, sock: socket.socket, head: bytes, deadline: float) -> None:
        super().__init__()
        self.sock, self.head, self.deadline = sock, head, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        left = self.deadline - time.monotonic()
        if left <= 0:  # http.server drops the connection on a TimeoutError
            raise TimeoutError("the request did not arrive whole within its deadline")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(SOCKET_TIMEOUT_S)  # for writing the answer


class Handler(OpenAIRoutes, BaseHTTPRequestHandler):
    """JSON over loopback HTTP; the service object hangs off the server.

    One request per connection (HTTP/1.0: the connection closes after the answer), so the
    deadline that runs from accept bounds the request."""

    server_version = "adapter-deploy-serve/1"
    timeout = SOCKET_TIMEOUT_S  # for writes; reads are bounded by the request's deadline
    model_label = OTHER_MODEL  # the request's model once known, for /metrics
    started = 0.0  # when the request came in

    def __init__(
        self,
        request: Any,
        client_address: Any,
        server: Any,
        head: bytes = b"",
        accepted: float | None = None,
    ) -> None:
        self.head = head  # what admission read of the request already
        self.accepted = time.monotonic() if accepted is None else accepted
        super().__init__(request, client_address, server)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the plain socket file; ours bounds the whole request in time
        seconds = getattr(self.server, "request_deadline_s", REQUEST_DEADLINE_S)
        reader = _DeadlineReader(self.connection, self.head, self.accepted + seconds)
        self.rfile = io.BufferedReader(reader)

    @property
    def service(self) -> Service:
        return self.server.service  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # Overriding log_message skips http.server's own escaping: the request line and the
        # client's words in it are escaped here. stderr is kept for the service's own events.
        log.debug("http: %s", escape_control(format % args))

    def _reply(self, code: int, body: dict[str, Any], headers: dict[str, str] = {}) -> None:  # noqa: B006
        self._send(code, json.dumps(body).encode(), "application/json", headers)

    def _send(self, code: int, data: bytes, kind: str, headers: dict[str, str]) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self._count(code)

    def _count(self, code: int) -> None:
        path = urlsplit(self.path).path
        if self.command == "POST" and path in INFERENCE_PATHS:
            seconds = time.perf_counter() - self.started
            self.service.metrics.request(self.model_label, path, code, seconds)

    def _fail(self, err: ApiError) -> None:
        """An error in the shape the path's clients expect: OpenAI's under /v1/."""
        if urlsplit(self.path).path.startswith("/v1/"):
            self._reply(err.status, error_body(err), err.headers)
        else:
            self._reply(err.status, {"error": err.message}, err.headers)

    def _foreign(self) -> str | None:
        """Why this request may come from a web page rather than a local program: a Host
        that is not loopback (DNS rebinding) or a browser's Origin from another site."""
        host = _hostname(self.headers.get("Host", ""))
        if host not in LOOPBACK_HOSTS:
            return f"Host {self.headers.get('Host')!r} is not loopback"
        origin = self.headers.get("Origin")
        if origin is not None and _hostname(urlsplit(origin).netloc) not in LOOPBACK_HOSTS:
            return f"Origin {origin!r} is not loopback"
        return None

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if why := self._foreign():
            self._fail(ApiError(403, why))
            return
        path = urlsplit(self.path).path
        if path == "/health":
            ok, body = self.service.health()
            self._reply(200 if ok else 503, body)
        elif path == "/status":
            self._reply(200, self.service.status())
        elif path == "/metrics":
            self._send(200, *self.service.metrics.exposition(), {})
        elif path == "/v1/models":
            self._reply(200, model_list(self.service.status()["models"]))
        elif path.startswith("/v1/models/"):
            self._model(path.removeprefix("/v1/models/"))
        else:
            paths = "/translate, /transcribe, /status, /health, /metrics, /v1/models"
            self._fail(ApiError(404, f"no such path {path}; use {paths}"))

    def _model(self, name: str) -> None:
        model = self.service.status()["models"].get(name)
        if model is None or not model["ready"]:
            self._fail(ApiError(404, f"model {name!r} is not served", "model_not_found", "model"))
        else:
            self._reply(200, model_entry(name, model))

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self.started, self.model_label = time.perf_counter(), OTHER_MODEL
        if why := self._foreign():
            self._fail(ApiError(403, why))
            return
        url = urlsplit(self.path)
        if url.path == "/transcribe":
            self._transcribe_request(url.query)
        elif url.path == "/translate":
            self._translate_request()
        elif url.path in (CHAT, COMPLETIONS):
            self._completion_request()  # service/openai_api.py
        else:
            where = "/translate, /transcribe, /v1/chat/completions or /v1/completions"
            self._fail(ApiError(404, f"POST only to {where}"))

    def _translate_request(self) -> None:
        read, request = self._read_json()
        if not read:
            return
        self._name_model(request)
        if not isinstance(request, dict) or not all(
            isinstance(request.get(k), str) for k in ("model", "text")
        ):
            self._fail(ApiError(400, 'send {"model": str, "text": str}'))
            return
        model = request["model"]
        answer = self._call(
            model, lambda: self.service.translate(model, request["text"], self._client_gone)
        )
        if answer is not None:
            plain = {key: answer[key] for key in ("text", "version_id", "latency_s")}
            self._reply(200, plain, {VERSION_HEADER: version_header(answer)})

    def _content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()

    def _transcribe_request(self, query: str) -> None:
        models = parse_qs(query).get("model", [])
        if len(models) != 1 or not models[0]:
            self._fail(ApiError(400, "name one model: POST /transcribe?model=NAME"))
            return
        if self._content_type() not in AUDIO_TYPES:
            self._fail(ApiError(415, "send the WAV file with Content-Type: audio/wav"))
            return
        body = self._read_body(self.service.config.max_audio_bytes)
        if body is None:
            return
        model = models[0]
        answer = self._call(model, lambda: self.service.transcribe(model, body, self._client_gone))
        if answer is not None:
            self._reply(200, answer, {VERSION_HEADER: version_header(answer)})

    def _read_body(self, limit: int) -> bytes | None:
        """The request body, or None once the refusal has been sent."""
        raw = self.headers.get("Content-Length", "")
        if not raw.isdigit():  # also refuses "-1", "abc" and a missing length
            self._fail(ApiError(400, f"invalid Content-Length {raw!r}"))
            return None
        length = int(raw)
        if length > limit:  # refused unread: nothing that large is ever held in memory
            self._fail(ApiError(413, f"request over {limit} bytes"))
            return None
        return self.rfile.read(length)

    def _read_json(self) -> tuple[bool, Any]:
        """(True, the parsed JSON body), or (False, None) once the refusal has been sent."""
        if self._content_type() != "application/json":
            # Also what a browser cannot send cross-site without a CORS preflight we refuse.
            self._fail(ApiError(415, "send Content-Type: application/json"))
            return False, None
        data = self._read_body(MAX_BODY)
        if data is None:
            return False, None
        try:
            return True, json.loads(data or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            self._fail(ApiError(400, f"body is not JSON ({err})"))
            return False, None

    def _name_model(self, request: Any) -> None:
        """Count the request under its model in /metrics, if that model is served."""
        model = request.get("model") if isinstance(request, dict) else None
        if isinstance(model, str) and model in self.service.served:
            self.model_label = model

    def _call(self, model: str, ask: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """What `ask` (a translate or transcribe call) answers; None once a refusal is sent."""
        self._name_model({"model": model})
        try:
            if not self.service.ready:
                raise ApiError(503, "service is starting", "starting")
            return ask()
        except ClientGone:
            self.close_connection = True  # nobody to answer
            self._count(CLIENT_GONE)
        except Exception as err:
            self._fail(self._refusal(model, err))
        return None

    def _refusal(self, model: str, err: Exception) -> ApiError:
        """The HTTP refusal for what a translate or transcribe call raised."""
        if isinstance(err, ApiError):
            return err
        if isinstance(err, Busy):
            retry = {"Retry-After": "1"}
            return ApiError(503, f"busy: {err.args[0]} requests queued", "busy", None, retry)
        if isinstance(err, InputTooLong):
            # OpenAI's clients know an overlong input as 400 context_length_exceeded.
            status = 400 if self.path.startswith("/v1/") else 413
            message = str(err) + "; send one sentence at a time"
            param = "prompt" if self.path.startswith(COMPLETIONS) else "messages"
            return ApiError(status, message, "context_length_exceeded", param)
        if isinstance(err, AudioTooLong):
            return ApiError(413, err.one_line(), "audio_too_long")
        if isinstance(err, BadAudio):
            return ApiError(400, err.one_line(), "bad_audio")
        if isinstance(err, WrongTask):
            return ApiError(400, str(err), "wrong_task", "model")
        if isinstance(err, KeyError):
            served = sorted(self.service.served)
            message = f"model {model!r} is not served (served: {served})"
            return ApiError(404, message, "model_not_found", "model")
        if isinstance(err, FutureTimeout):
            return ApiError(504, f"no answer within {REQUEST_TIMEOUT_S} s", "timeout")
        log.error("request for %s failed", model, exc_info=err)  # answers 500, serving goes on
        return ApiError(500, reason_of(err), "engine_error")

    def _client_gone(self) -> bool:
        """Has the client closed its connection? (Peeks; never consumes its bytes.)"""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def _hostname(netloc: str) -> str:
    try:
        return urlsplit(f"//{netloc}").hostname or ""
    except ValueError:
        return ""


@dataclass(eq=False)
class _Pending:
    """An accepted connection whose request head is still arriving."""

    sock: socket.socket
    address: Any
    accepted: float  # time.monotonic() at accept: the request's deadline runs from here
    head: bytearray = field(default_factory=bytearray)


def _request_line(head: bytes) -> tuple[str, str]:
    """(method, path) of a request head; ("", "") when it has none."""
    words = head.split(b"\n", 1)[0].split()
    if len(words) < 2:
        return "", ""
    try:
        return words[0].decode("latin-1"), urlsplit(words[1].decode("latin-1")).path
    except ValueError:
        return words[0].decode("latin-1"), ""


class BoundedHTTPServer(ThreadingHTTPServer):
    """Slow clients cannot take the service down (slowloris).

    Accepted connections wait in one admission thread (a selector, no thread each, at most
    MAX_WAITING: a new one closes the oldest) until their request head is complete, and
    are closed when the request's deadline passes first. A complete head takes one of
    MAX_CONNECTIONS handler threads, or, for GET /health or /status, one of
    RESERVED_CONNECTIONS more; with none free it is answered 503 + Retry-After at once.
    A handler thread then reads the body under the same deadline. Slow bodies can fill the
    general pool for a deadline at most, and never the reserve: a head that takes it has
    no body to wait for. Slow heads take no thread at all, whatever path they ask for."""

    daemon_threads = True
    # The listen backlog: at socketserver's 5, a burst of connections (a flood of slow
    # clients) makes the kernel drop the SYN of the next one, /health's too, for 1 s or more.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type,
        request_deadline_s: float = REQUEST_DEADLINE_S,
    ) -> None:
        super().__init__(address, handler)
        self.request_deadline_s = request_deadline_s
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.reserved = threading.BoundedSemaphore(RESERVED_CONNECTIONS)
        self.incoming: deque[_Pending] = deque()  # accepted, not yet seen by admission
        self.waiting: dict[socket.socket, _Pending] = {}  # admission thread only; accept order
        self.stopping = threading.Event()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    # --- the accept thread (serve_forever) ---
    def serve_forever(self, poll_interval: float = 0.5) -> None:
        admission = threading.Thread(target=self._admit_loop, name="http-admission", daemon=True)
        admission.start()
        try:
            super().serve_forever(poll_interval)
        finally:
            self.stopping.set()
            self._wake()
            admission.join(timeout=2)

    def server_close(self) -> None:
        super().server_close()
        self.wake_r.close()
        self.wake_w.close()

    def process_request(self, request: Any, client_address: Any) -> None:
        request.setblocking(False)
        self.incoming.append(_Pending(request, client_address, time.monotonic()))
        self._wake()

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"\0")
        except OSError:  # its buffer is full: admission is woken already
            pass

    # --- the admission thread ---
    def _admit_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.wake_r, selectors.EVENT_READ)
            while not self.stopping.is_set():
                for key, _ in selector.select(self._next_expiry()):
                    if key.fileobj is self.wake_r:
                        self._take_incoming(selector)
                    else:
                        self._read_head(selector, key.data)
                self._expire(selector)
            for pending in list(self.waiting.values()):
                self._drop(selector, pending)

    def _next_expiry(self) -> float:
        oldest = next(iter(self.waiting.values()), None)
        if oldest is None:
            return 1.0
        left = oldest.accepted + self.request_deadline_s - time.monotonic()
        return min(1.0, max(0.0, left))

    def _take_incoming(self, selector: selectors.BaseSelector) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except OSError:  # drained
            pass
        while self.incoming:
            pending = self.incoming.popleft()
            if len(self.waiting) >= MAX_WAITING:  # the oldest is the likeliest to be slow
                why = f"the oldest of {MAX_WAITING} with a head still arriving"
                self._drop(selector, next(iter(self.waiting.values())), why)
            selector.register(pending.sock, selectors.EVENT_READ, pending)
            self.waiting[pending.sock] = pending

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for pending in list(self.waiting.values()):  # oldest first: stop at the first in time
            if pending.accepted + self.request_deadline_s > now:
                break
            self._drop(selector, pending, f"no whole head within {self.request_deadline_s:g} s")

    def _drop(self, selector: selectors.BaseSelector, pending: _Pending, why: str = "") -> None:
        selector.unregister(pending.sock)
        del self.waiting[pending.sock]
        pending.sock.close()
        if why:
            log.debug("http: closed %s: %s", pending.address[0], why)

    def _read_head(self, selector: selectors.BaseSelector, pending: _Pending) -> None:
        try:
            data = pending.sock.recv(MAX_HEAD_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or len(pending.head) + len(data) > MAX_HEAD_BYTES:
            self._drop(selector, pending, "head over 64 KiB" if data else "")  # or gone
            return
        seen = max(0, len(pending.head) - 2)  # search only what a new byte can complete
        pending.head += data
        if pending.head.find(b"\n\r\n", seen) < 0 and pending.head.find(b"\n\n", seen) < 0:
            return
        selector.unregister(pending.sock)
        del self.waiting[pending.sock]
        self._dispatch(pending)

    def _dispatch(self, pending: _Pending) -> None:
        """A complete head: a handler thread for it, or 503 at once."""
        method, path = _request_line(bytes(pending.head))
        slot = self.slots if self.slots.acquire(blocking=False) else None
        if slot is None and method == "GET" and path in LIGHT_PATHS:
            slot = self.reserved if self.reserved.acquire(blocking=False) else None
        if slot is None:
            self._refuse_busy(pending, method, path)
            return
        try:
            pending.sock.setblocking(True)
            thread = threading.Thread(target=self._serve, args=(pending, slot), daemon=True)
            thread.start()
        except Exception:
            slot.release()
            self.shutdown_request(pending.sock)

    def _refuse_busy(self, pending: _Pending, method: str, path: str) -> None:
        err = ApiError(503, f"busy: {MAX_CONNECTIONS} requests being served", "busy")
        body = json.dumps(error_body(err) if path.startswith("/v1/") else {"error": err.message})
        head = (
            "HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        try:
            pending.sock.send((head + body).encode())  # small: fits the empty send buffer
        except OSError:
            pass
        self.shutdown_request(pending.sock)
        service = getattr(self, "service", None)
        if service is not None and method == "POST" and path in INFERENCE_PATHS:
            service.metrics.request(OTHER_MODEL, path, 503, 0.0)

    # --- a handler thread ---
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Through the service's log (socketserver prints to stderr, past its escaping)."""
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client left mid-answer
            log.debug("http: %s left before its answer", client_address[0])
        else:
            log.error("http: a request from %s failed", client_address[0], exc_info=True)

    def _serve(self, pending: _Pending, slot: threading.BoundedSemaphore) -> None:
        try:
            self.RequestHandlerClass(
                pending.sock, pending.address, self, bytes(pending.head), pending.accepted
            )
        except Exception:
            self.handle_error(pending.sock, pending.address)
        finally:
            self.shutdown_request(pending.sock)
            slot.release()


def start_http(
    service: Service, request_deadline_s: float = REQUEST_DEADLINE_S
) -> ThreadingHTTPServer:
    server = BoundedHTTPServer((LOOPBACK, service.config.port), Handler, request_deadline_s)
    server.service = service  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


# --- configuration and main -------------------------------------------------------------
def install_signal_handlers(control: Control) -> None:
    signal.signal(signal.SIGUSR1, lambda *_: setattr(control, "reload", True))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(control, "stop", True))


def _parse_base_models(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        model, sep, path = item.partition("=")
        if not sep or not model or not path:
            raise UsageError(f"bad --base-model {item!r}", fix="write MODEL=PATH")
        out[model] = path
    return out


def _parse_tasks(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        model, sep, task = item.partition("=")
        if not sep or not model or task not in TASKS:
            raise UsageError(f"bad --task {item!r}", fix="write MODEL=translation|transcription")
        out[model] = task
    return out


def _port_of(url: str) -> int:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise UsageError(f"service_url {url} is not loopback", fix="use http://127.0.0.1:PORT")
    return parts.port or 80


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    """Flags win over the endpoint's params.yaml entry."""
    config = ServiceConfig(adapter_dir=Path("."))
    if args.endpoint:
        from adapter_deploy.config import load_params

        params = load_params(args.params)
        ep = params.endpoint(args.endpoint)
        config.adapter_dir = params.resolve(ep.adapter_dir)
        config.models = ep.models or list(params.models)
        config.tasks = {m: mp.task for m, mp in params.models.items()}
        config.base_models = {m: mp.base_model for m, mp in params.models.items()}
        config.base_models.update({m: str(params.resolve(p)) for m, p in ep.base_models.items()})
        config.platform = ep.platform
        config.port = _port_of(ep.service_url) if ep.service_url else DEFAULT_PORT
        config.pidfile = params.resolve(ep.pidfile) if ep.pidfile else None
    elif not args.adapter_dir:
        raise UsageError("no endpoint and no adapter dir", fix="pass --endpoint or --adapter-dir")
    if args.adapter_dir:
        config.adapter_dir = Path(args.adapter_dir)
    if args.models:
        config.models = args.models
    config.base_models.update(_parse_base_models(args.base_model))
    config.tasks.update(_parse_tasks(args.task))
    for name in (
        "platform",
        "port",
        "pidfile",
        "diagnostics",
        "reload_mode",
        "max_queue",
        "max_input_tokens",
        "max_audio_bytes",
        "shadow_inputs",
    ):
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, Path(value) if name in ("pidfile", "diagnostics") else value)
    config.engine_kind  # noqa: B018 - validates the platform before any loading
    return config


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.splitlines()[0])
    parser.prog = "python -m adapter_deploy.service"
    parser.add_argument("--endpoint", help="endpoint in params.yaml to serve")
    parser.add_argument("--adapter-dir", help="endpoint adapter dir (<model>/active links)")
    parser.add_argument("--models", nargs="+", help="models to serve (default: all with active)")
    parser.add_argument("--base-model", action="append", default=[], metavar="MODEL=PATH")
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="MODEL=TASK",
        help="a model's task: translation (default) or transcription (Whisper)",
    )
    parser.add_argument("--platform", choices=["auto", "mlx", "cuda", "cpu", "hf"])
    parser.add_argument("--port", type=int, help=f"loopback port (default {DEFAULT_PORT})")
    parser.add_argument("--pidfile", help="written once ready, removed on clean exit")
    parser.add_argument("--diagnostics", help="session metadata JSONL (the operator's plan)")
    parser.add_argument("--reload-mode", choices=["auto", "standby", "inplace"])
    parser.add_argument("--max-queue", type=int, help="requests waiting at most (16)")
    parser.add_argument("--max-input-tokens", type=int, help="longest text in tokens (200)")
    parser.add_argument(
        "--max-audio-bytes", type=int, help=f"largest /transcribe body ({MAX_AUDIO_BYTES})"
    )
    parser.add_argument(
        "--shadow-inputs",
        type=int,
        metavar="N",
        help="live translations kept in memory per model for the pre-check's shadow replay "
        "(20; 0: none)",
    )
    parser.add_argument(
        "--request-deadline",
        type=float,
        default=REQUEST_DEADLINE_S,
        metavar="SECONDS",
        help=f"a request's head and body must arrive within this of connecting "
        f"({REQUEST_DEADLINE_S:g})",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    if not args.request_deadline > 0:
        raise UsageError(
            f"bad --request-deadline {args.request_deadline}", fix="give seconds above 0"
        )
    control = Control()
    # First of all: a SIGUSR1 sent while the models load must queue a reload, not kill us.
    install_signal_handlers(control)
    service = Service(config_from_args(args), control)
    channel = None  # the agent's control socket, once the models are loaded
    try:
        # /health answers 503 while the models load
        server = start_http(service, args.request_deadline)
    except OSError as err:
        raise UsageError(
            f"cannot listen on {LOOPBACK}:{service.config.port} ({err})", fix="pick a free --port"
        ) from err
    try:
        service.load_all()
        channel = _start_control(service)
        service.become_ready()
        service.run_controller()
    finally:
        server.shutdown()
        if channel is not None:
            channel.close()
        service.close()
        log.info("stopped")
    return 0


def _start_control(service: Service) -> Any:
    """The agent's control socket; without it pre-checks run in a separate process."""
    from adapter_deploy.service.control import ControlServer

    if not service.config.control:
        return None
    server = ControlServer(service)
    try:
        server.start()
    except OSError as err:
        log.warning("no control socket at %s (%s): pre-checks run beside it", server.path, err)
        return None
    return server


def entry() -> None:
    run(main, build_parser())


if __name__ == "__main__":
    entry()
