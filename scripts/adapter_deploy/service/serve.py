"""The inference service: hot reload on SIGUSR1 without pausing translations (seed §5, §7.3).

Usage:
    python -m adapter_deploy.service --params params.yaml --endpoint mac-dev
    python -m adapter_deploy.service --adapter-dir DIR [--models gemma_4b ...] \\
        [--base-model gemma_4b=/models/base ...] [--task whisper=transcription ...] \\
        [--platform cpu|cuda|mlx|auto] [--port 8765] [--pidfile FILE] [--diagnostics FILE] \\
        [--reload-mode auto|standby|inplace]

It serves every model with an `active` link under the adapter dir (`--models` / the endpoint's
`models:` narrows that), on 127.0.0.1 only. A model's task (params.yaml `task:`, or `--task`;
default translation) picks its engine: transcription models get the Whisper engine.
    POST /translate {"model", "text"} -> {"text", "version_id", "latency_s"}
    POST /transcribe?model=NAME, body: a PCM WAV file (Content-Type audio/wav or
         application/octet-stream) -> {"text", "version_id", "latency_s"}
    GET  /status    -> per model: task, engine, version_id, sha256, loaded_at, last_reload,
                       fallback, requests, ...
    GET  /health    -> 200 once every served model is loaded, 503 before
Hostile or runaway requests are refused: a Host or Origin that is not loopback 403 (a web
page or DNS rebinding), a body of another Content-Type 415, an invalid Content-Length 400,
a text over --max-input-tokens 413, a body over 64 KiB (/translate) or --max-audio-bytes
(/transcribe) 413, audio that is no PCM WAV 400, audio longer than the model's window 413,
a request for a model of the other task 400, a full queue 503 + Retry-After;
a request whose client has gone is dropped before it runs; idle sockets time out.
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

At start-up a model whose `active` does not load falls back to `previous`, then to its base
model, reported loudly (`fallback: true` in /status). A failed reload keeps the old release.
"""

from __future__ import annotations

import argparse
import json
import logging
import select
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from adapter_deploy.common.errors import AudioTooLong, BadAudio, UsageError
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.engines.factory import TASKS
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
MAX_CONNECTIONS = 64  # open connections at once; more are closed at once (no thread each)
SOCKET_TIMEOUT_S = 10.0  # a half-sent request is dropped after this
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# What a WAV upload is labelled with; none of them is a type a web page may send cross-site
# without a CORS preflight (which is never answered), like application/json.
AUDIO_TYPES = {
    "audio/wav",
    "audio/x-wav",
    "audio/wave",
    "audio/vnd.wave",
    "application/octet-stream",
}


# --- HTTP -------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    """JSON over loopback HTTP; the service object hangs off the server."""

    server_version = "adapter-deploy-serve/1"
    timeout = SOCKET_TIMEOUT_S  # socket timeout: an idle or half-sent request is dropped

    @property
    def service(self) -> Service:
        return self.server.service  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http: " + format, *args)  # keep stderr for the service's own events

    def _reply(self, code: int, body: dict[str, Any], headers: dict[str, str] = {}) -> None:  # noqa: B006
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

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
            self._reply(403, {"error": why})
            return
        path = urlsplit(self.path).path
        if path == "/health":
            ok, body = self.service.health()
            self._reply(200 if ok else 503, body)
        elif path == "/status":
            self._reply(200, self.service.status())
        else:
            paths = "/translate, /transcribe, /status, /health"
            self._reply(404, {"error": f"no such path {path}; use {paths}"})

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        if why := self._foreign():
            self._reply(403, {"error": why})
            return
        url = urlsplit(self.path)
        if url.path == "/transcribe":
            self._transcribe_request(url.query)
            return
        if url.path != "/translate":
            self._reply(404, {"error": "POST only to /translate or /transcribe"})
            return
        kind = self._content_type()
        if kind != "application/json":
            # Also what a browser cannot send cross-site without a CORS preflight we refuse.
            self._reply(415, {"error": "send Content-Type: application/json"})
            return
        request, error = self._read_request()
        if error:
            self._reply(*error)
            return
        model = request["model"]
        self._answer(
            model, lambda: self.service.translate(model, request["text"], self._client_gone)
        )

    def _content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()

    def _transcribe_request(self, query: str) -> None:
        models = parse_qs(query).get("model", [])
        if len(models) != 1 or not models[0]:
            self._reply(400, {"error": "name one model: POST /transcribe?model=NAME"})
            return
        if self._content_type() not in AUDIO_TYPES:
            self._reply(415, {"error": "send the WAV file with Content-Type: audio/wav"})
            return
        body, error = self._read_body(self.service.config.max_audio_bytes)
        if error:
            self._reply(*error)
            return
        model = models[0]
        self._answer(model, lambda: self.service.transcribe(model, body, self._client_gone))

    def _read_body(self, limit: int) -> tuple[bytes, tuple[int, dict[str, Any]] | None]:
        raw = self.headers.get("Content-Length", "")
        if not raw.isdigit():  # also refuses "-1", "abc" and a missing length
            return b"", (400, {"error": f"invalid Content-Length {raw!r}"})
        length = int(raw)
        if length > limit:  # refused unread: nothing that large is ever held in memory
            return b"", (413, {"error": f"request over {limit} bytes"})
        return self.rfile.read(length), None

    def _read_request(self) -> tuple[dict[str, Any], tuple[int, dict[str, Any]] | None]:
        data, error = self._read_body(MAX_BODY)
        if error:
            return {}, error
        try:
            request = json.loads(data or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return {}, (400, {"error": f"body is not JSON ({err})"})
        if not isinstance(request, dict) or not all(
            isinstance(request.get(k), str) for k in ("model", "text")
        ):
            return {}, (400, {"error": 'send {"model": str, "text": str}'})
        return request, None

    def _answer(self, model: str, ask: Callable[[], dict[str, Any]]) -> None:
        """Reply with what `ask` (a translate or transcribe call) answers, or why it could not."""
        if not self.service.ready:
            self._reply(503, {"error": "service is starting"})
            return
        try:
            self._reply(200, ask())
        except Busy as err:
            queued = f"{err.args[0]} requests queued"
            self._reply(503, {"error": f"busy: {queued}"}, {"Retry-After": "1"})
        except InputTooLong as err:
            self._reply(413, {"error": str(err) + "; send one sentence at a time"})
        except AudioTooLong as err:
            self._reply(413, {"error": err.one_line()})
        except BadAudio as err:
            self._reply(400, {"error": err.one_line()})
        except WrongTask as err:
            self._reply(400, {"error": str(err)})
        except ClientGone:
            self.close_connection = True  # nobody to answer
        except KeyError:
            served = sorted(self.service.served)
            self._reply(404, {"error": f"model {model!r} is not served (served: {served})"})
        except FutureTimeout:
            self._reply(504, {"error": f"no answer within {REQUEST_TIMEOUT_S} s"})
        except Exception as err:  # an engine failure answers 500, the service keeps going
            log.exception("request for %s failed", model)
            self._reply(500, {"error": reason_of(err)})

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


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, but never more than MAX_CONNECTIONS of them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close at once rather than queue a thread
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def start_http(service: Service) -> ThreadingHTTPServer:
    server = BoundedHTTPServer((LOOPBACK, service.config.port), Handler)
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
    parser.add_argument("--diagnostics", help="session metadata JSONL (seed §7.3)")
    parser.add_argument("--reload-mode", choices=["auto", "standby", "inplace"])
    parser.add_argument("--max-queue", type=int, help="requests waiting at most (16)")
    parser.add_argument("--max-input-tokens", type=int, help="longest text in tokens (200)")
    parser.add_argument(
        "--max-audio-bytes", type=int, help=f"largest /transcribe body ({MAX_AUDIO_BYTES})"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    control = Control()
    # First of all: a SIGUSR1 sent while the models load must queue a reload, not kill us.
    install_signal_handlers(control)
    service = Service(config_from_args(args), control)
    try:
        server = start_http(service)  # /health answers 503 while the models load
    except OSError as err:
        raise UsageError(
            f"cannot listen on {LOOPBACK}:{service.config.port} ({err})", fix="pick a free --port"
        ) from err
    try:
        service.load_all()
        service.become_ready()
        service.run_controller()
    finally:
        server.shutdown()
        service.close()
        log.info("stopped")
    return 0


def entry() -> None:
    run(main, build_parser())


if __name__ == "__main__":
    entry()
