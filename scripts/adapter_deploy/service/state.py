"""The service's state: the served models, the engine thread, reloads and start-up fallback.

`adapter_deploy.service.serve` (HTTP, signals, command line) drives one `Service`; its
docstring describes the behaviour. Every engine call that serves requests runs on ONE
executor thread (MLX is not thread-safe); reloads and the controller loop run on the main thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from adapter_deploy.common import pidfile
from adapter_deploy.common.clock import utc_now
from adapter_deploy.common.fsutil import append_jsonl
from adapter_deploy.common.runner import release_thread_streams
from adapter_deploy.engines.base import Engine, LoadedRelease, Translation, describe_release
from adapter_deploy.engines.factory import engine_kind_for, kind_of, make_engine
from adapter_deploy.service.metrics import ServiceMetrics

log = logging.getLogger("adapter_deploy.service")

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8765
REQUEST_TIMEOUT_S = 120.0
# A live-translation request is one sentence: longer input is refused (413) before it can
# hold the single engine thread for seconds and queue everyone behind it.
MAX_INPUT_TOKENS = 200
MAX_QUEUE = 16  # requests waiting for the engine thread; beyond: 503 + Retry-After
# A transcription request is one WAV clip: 30 s (a real Whisper's whole window) of 48 kHz
# 16-bit stereo is 5.8 MB; a larger body is refused (413) before it is read.
MAX_AUDIO_BYTES = 8 * 1024 * 1024
WARMUP_TEXT = "Amen."
WARMUP_AUDIO_S = 0.5  # of silence: a Whisper engine's first call pays its one-time costs
CONTROL_POLL_S = 0.02
# Live translations kept per model, in memory only, for the pre-check's shadow replay.
SHADOW_INPUTS = 20


class Busy(Exception):
    """The request queue is full."""


class ClientGone(Exception):
    """The client left before its queued request started: it was not run."""


class WrongTask(Exception):
    """A request for a model of the other task: text to a Whisper model, audio to a Gemma."""

    def __init__(self, model: str, task: str) -> None:
        if task == "transcription":
            fix = f"POST its WAV audio to /transcribe?model={model}"
        else:
            fix = 'POST {"model", "text"} JSON to /translate'
        super().__init__(f"model {model!r} is a {task} model; {fix}")


class InputTooLong(Exception):
    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"text is {tokens} tokens, over the limit of {limit}")
        self.tokens, self.limit = tokens, limit


def input_tokens(engine: Any, text: str) -> int | None:
    """The text's length in the engine's own tokens (None when the engine has no tokenizer)."""
    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "encode"):
        return len(tokenizer.encode(text, add_special_tokens=False))
    llm = getattr(engine, "llm", None)
    if llm is not None:
        return len(llm.tokenize(text.encode(), add_bos=False))
    return None


@dataclass
class ServiceConfig:
    adapter_dir: Path
    models: list[str] | None = None  # None: every model dir with an `active` link
    base_models: dict[str, str] = field(default_factory=dict)
    platform: str = "auto"
    port: int = DEFAULT_PORT
    pidfile: Path | None = None
    diagnostics: Path | None = None
    reload_mode: str = "auto"
    max_input_tokens: int = MAX_INPUT_TOKENS
    max_queue: int = MAX_QUEUE
    max_audio_bytes: int = MAX_AUDIO_BYTES
    tasks: dict[str, str] = field(default_factory=dict)  # model -> task; default translation
    shadow_inputs: int = SHADOW_INPUTS  # live inputs kept per model for the shadow replay
    control: bool = True  # listen on <adapter_dir>/.service-control.sock for the agent

    def task_of(self, model: str) -> str:
        return self.tasks.get(model, "translation")

    @property
    def engine_kind(self) -> str:
        return engine_kind_for(self.platform)

    @property
    def standby(self) -> bool:
        mode = self.reload_mode
        # auto = inplace everywhere: swapping LoRA weights in the serving engine paused requests
        # 16-29 ms at most (bench/bench_reload.py), while standby rebuilds a whole engine (base
        # weights twice in memory) and paused them ~100 ms on 2 cores.
        return mode == "standby"


@dataclass
class ServedModel:
    """One served model: its engine, what that engine serves, and how the last reload went."""

    name: str
    task: str = "translation"
    engine: Engine | None = None
    engine_kind: str | None = None  # hf, mlx, llamacpp or whisper, once an engine serves
    release: LoadedRelease | None = None
    source: str | None = None  # "active", "previous" or "base"
    loaded_at: str | None = None
    last_reload: dict[str, Any] | None = None
    error: str | None = None  # why nothing at all could be loaded
    requests: int = 0  # requests this model answered
    # (input, output, version_id) of the last live translations; memory only, never on disk
    shadow: deque[tuple[str, str, str | None]] = field(default_factory=deque)

    def serve(self, engine: Engine, source: str) -> None:
        self.engine, self.release, self.source = engine, engine.loaded, source
        self.engine_kind = kind_of(engine)
        self.loaded_at, self.error = utc_now(ms=True), None

    def status(self) -> dict[str, Any]:
        release = self.release.to_dict() if self.release else {}
        return {
            "ready": self.engine is not None,
            "task": self.task,
            "engine": self.engine_kind,
            "version_id": release.get("version_id"),
            "sha256": release.get("sha256"),
            "path": release.get("path"),
            "kind": release.get("kind"),
            "source": self.source,
            "fallback": self.source == "base",
            "loaded_at": self.loaded_at,
            "last_reload": self.last_reload,
            "error": self.error,
            "requests": self.requests,
        }


class Service:
    """The served models plus the controller loop; the HTTP handler and signals talk to this."""

    def __init__(self, config: ServiceConfig, control: Control) -> None:
        self.config = config
        self.control = control  # flags set by the signal handlers
        self.served: dict[str, ServedModel] = {}
        self._pidfile_fd: int | None = None
        self.ready = False
        self.session_id = datetime.now().strftime("%Y%m%d_%H%M%S")
        self.started_at = utc_now(ms=True)
        # One thread runs every serving engine call: MLX must not be driven from two threads.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._futures: weakref.WeakSet[Future] = weakref.WeakSet()  # to cancel at stop
        self.lock = threading.Lock()  # guards the served-model fields read by /status
        self.queued = 0  # requests submitted and not finished (guarded by self.lock)
        self.dropped = 0  # queued requests skipped because their client had gone
        self.waiting = 0  # of the queued: not started yet (guarded by self.lock)
        self.metrics = ServiceMetrics(self.status)
        self.base_loads = 0  # engines built, each with its base model: a pre-check adds none

    # --- models and loading -------------------------------------------------------------
    def model_names(self) -> list[str]:
        if self.config.models is not None:
            return list(self.config.models)
        # Every model of the endpoint: served (an `active` link) or not yet (releases only).
        root = self.config.adapter_dir
        active = {p.parent.name for p in root.glob("*/active") if p.is_symlink()}
        return sorted(active | {p.parent.name for p in root.glob("*/releases") if p.is_dir()})

    def link(self, model: str, name: str = "active") -> Path:
        return self.config.adapter_dir / model / name

    def _build(self, target: Path | None, model: str) -> Engine:
        """A new engine for `target` (None: base model only), warmed up before it serves."""
        base, task = self.config.base_models.get(model), self.config.task_of(model)
        with self.lock:
            self.base_loads += 1
        engine: Any = make_engine(
            self.config.platform, adapter_path=target, base_model=base, task=task
        )
        # The first call pays one-time costs; not on a user's request.
        if task == "transcription":
            import numpy as np

            engine.transcribe(np.zeros(int(engine.sample_rate * WARMUP_AUDIO_S), np.float32))
        else:
            engine.translate(WARMUP_TEXT)
        return engine

    def _on_engine_thread(self, fn: Any) -> Any:
        return self._submit(fn).result()

    def _submit(self, fn: Any) -> Future:
        future = self.executor.submit(fn)
        self._futures.add(future)
        return future

    def on_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread in turn with live requests (FIFO): a live request
        waits at most for one such call."""
        return self._on_engine_thread(fn)

    def _construct(self, target: Path | None, model: str) -> Engine:
        # MLX engines are built on the engine thread (MLX stays on one thread). torch is safe
        # across threads, and an HF engine built on the engine thread translated ~10x slower
        # there (measured, bench/bench_reload.py), so HF engines are built here.
        mlx = self.config.engine_kind == "mlx" and self.config.task_of(model) == "translation"
        if self.config.standby or not mlx:
            return self._build(target, model)
        return self._on_engine_thread(lambda: self._build(target, model))

    def load_initial(self, model: str) -> None:
        """Serve active, else previous, else the base model (the operator's plan), loudly."""
        served, errors = ServedModel(model, self.config.task_of(model)), []
        served.shadow = deque(maxlen=max(0, self.config.shadow_inputs))
        for source in ("active", "previous"):
            link = self.link(model, source)
            if not link.exists():
                if link.is_symlink():
                    errors.append(f"{source} points at a missing release")
                continue
            try:
                target = link.resolve(strict=True)  # once: config and weights from one release
                served.serve(self._construct(target, model), source)
                break
            except Exception as err:  # any load failure moves on to the next candidate
                errors.append(f"{source} ({link.resolve().name}): {reason_of(err)}")
        else:
            try:
                served.serve(self._construct(None, model), "base")
                log.error("FALLBACK: %s serves its BASE model: %s", model, "; ".join(errors))
            except Exception as err:
                served.error = "; ".join([*errors, f"base: {reason_of(err)}"])
                log.error("%s cannot be served: %s", model, served.error)
        if errors and served.source == "previous":
            log.error("FALLBACK: %s serves its previous release: %s", model, errors[0])
        if errors:
            served.last_reload = {
                "result": "error",
                "error": "; ".join(errors),
                "at": utc_now(ms=True),
            }
        with self.lock:
            self.served[model] = served
        if served.release:
            log.info("%s: serving %s (%s)", model, served.release.version_id, served.source)

    def load_all(self) -> None:
        for model in self.model_names():
            if self.link(model, "active").is_symlink() or self.link(model, "active").exists():
                self.load_initial(model)
            else:
                log.info("%s has no active release; not served", model)

    # --- reload -------------------------------------------------------------------------
    def reload_all(self) -> None:
        log.info("SIGUSR1: reloading adapters")
        for model in self.model_names():
            if model not in self.served:
                if self.link(model).exists():
                    self.load_initial(model)  # first deploy of a model to this service
                    record = self.served[model].last_reload
                    self.metrics.reloaded(model, record["result"] if record else "ok")
                    self._diagnose_reload(model, None, record)
                continue
            self.reload(self.served[model])

    def reload(self, served: ServedModel) -> None:
        """Swap in what `active` points at now; on failure the old release keeps serving."""
        started, previous = time.perf_counter(), served.release
        record: dict[str, Any] = {"result": "error", "version_id": None, "sha256": None}
        try:
            target = self.link(served.name).resolve(strict=True)
            record["version_id"] = target.name
            wanted = describe_release(target)
            record["sha256"] = wanted.sha256
            current = (previous.path, previous.sha256) if previous else None
            if current == (wanted.path, wanted.sha256) and served.source == "active":
                record["result"] = "noop"
            else:
                record["engine_s"] = round(self._swap_in(served, target, wanted), 4)
                record["result"] = "ok"
        except Exception as err:  # a bad release must never take the service down
            record["error"] = reason_of(err)
            log.error("reload of %s failed, %s keeps serving: %s", served.name, _vid(served), err)
        record["at"] = utc_now(ms=True)
        record["duration_s"] = round(time.perf_counter() - started, 4)
        with self.lock:
            served.last_reload = record
        log.info("%s: reload %s -> %s", served.name, record["result"], _vid(served))
        self.metrics.reloaded(served.name, record["result"])
        self._diagnose_reload(served.name, previous, record)

    def _swap_in(self, served: ServedModel, target: Path, wanted: LoadedRelease) -> float:
        """Serve `target`; the seconds the engine thread spent on it (no request ran then)."""
        state, held = "whole", []
        if self.config.standby or served.engine is None:
            engine = self._construct(target, served.name)
            state = "built"
        else:
            engine = served.engine
            prepare = getattr(engine, "prepare", None)
            if prepare is not None:
                # Read, hash, place and check the new weights here, off the engine thread:
                # live requests go on being answered by the old release meanwhile.
                state = prepare(target, wanted)  # hashed once, by reload()
            if state == "whole":  # a whole model load (merged...): the engine waits for it
                self._on_engine_thread(lambda: _timed(held, lambda: engine.reload(target)))

        def swap() -> None:  # runs between two requests on the engine thread
            if state == "prepared":
                engine.switch()
            with self.lock:
                served.serve(engine, "active")

        self._on_engine_thread(lambda: _timed(held, swap))
        return sum(held)

    # --- serving ------------------------------------------------------------------------
    def translate(
        self,
        model: str,
        text: str,
        gone: Callable[[], bool] = lambda: False,
        max_tokens: int | None = None,
    ) -> dict[str, Any]:
        """Translate on the engine thread. Busy when the queue is full; InputTooLong over the
        token cap; ClientGone when the caller left (or timed out) before its turn came;
        WrongTask for a transcription model; KeyError for a model not served.
        The answer's `usage` counts the text's and the translation's tokens (words when the
        engine has no tokenizer); `max_tokens` caps the new tokens decoded, and
        `finish_reason` says whether a cap ended the translation ("length") or not ("stop")."""
        served = self._serving(model, "translation")
        usage: dict[str, int] = {}
        ended = {"finish_reason": "stop"}

        def work(engine: Any) -> Translation:
            tokens = input_tokens(engine, text)
            if tokens is not None and tokens > self.config.max_input_tokens:
                raise InputTooLong(tokens, self.config.max_input_tokens)
            answer = engine.translate(text, max_new_tokens=max_tokens)
            ended["finish_reason"] = answer.finish_reason
            if served.shadow.maxlen:  # what answered, read on the thread that swaps releases
                served.shadow.append((text, answer.text, _vid(served)))
            out = input_tokens(engine, answer.text)  # on this thread: tokenizers are not shared
            usage["prompt_tokens"] = len(text.split()) if tokens is None else tokens
            usage["completion_tokens"] = len(answer.text.split()) if out is None else out
            return answer

        return {**self._run(served, work, gone), "usage": usage, **ended}

    def transcribe(
        self, model: str, audio: bytes, gone: Callable[[], bool] = lambda: False
    ) -> dict[str, Any]:
        """Transcribe WAV bytes on the engine thread; as `translate`, plus BadAudio for bytes
        that are no PCM WAV and AudioTooLong past the model's window."""
        from adapter_deploy.engines.whisper_engine import decode_wav

        served = self._serving(model, "transcription")
        engine: Any = served.engine
        # Decoded on the request's own thread: a bad or overlong clip never takes a queue place.
        samples = decode_wav(audio, engine.sample_rate, engine.window_s, "the request body")
        return self._run(served, lambda whisper: whisper.transcribe(samples), gone)

    def _serving(self, model: str, task: str) -> ServedModel:
        served = self.served.get(model)
        if served is None or served.engine is None:
            raise KeyError(model)
        if served.task != task:
            raise WrongTask(model, served.task)
        return served

    def _run(
        self, served: ServedModel, work: Callable[[Any], Translation], gone: Callable[[], bool]
    ) -> dict[str, Any]:
        """Run `work` on the engine that serves when its turn comes; its answer and release."""
        with self.lock:
            if self.queued >= self.config.max_queue:
                raise Busy(self.queued)
            self.queued += 1
            self.waiting += 1
        timed_out = threading.Event()

        def job() -> dict[str, Any]:  # engine and release read together: what answered
            with self.lock:
                self.waiting -= 1
            if timed_out.is_set() or gone():
                with self.lock:
                    self.dropped += 1
                raise ClientGone()
            engine, release = served.engine, served.release
            answer = work(engine)
            with self.lock:
                served.requests += 1
            version = release.version_id if release else None
            return {"text": answer.text, "version_id": version, "latency_s": answer.latency_s}

        future = self._submit(job)
        future.add_done_callback(lambda _: self._finished())
        try:
            return future.result(timeout=REQUEST_TIMEOUT_S)
        except TimeoutError:
            timed_out.set()  # still queued: it will not run; running: it finishes unseen
            if future.cancel():  # never started: no longer waiting either
                with self.lock:
                    self.waiting -= 1
            raise

    def _finished(self) -> None:
        with self.lock:
            self.queued -= 1

    def health(self) -> tuple[bool, dict[str, Any]]:
        with self.lock:
            problems = [f"{n}: {s.error}" for n, s in self.served.items() if s.engine is None]
            versions = {n: _vid(s) for n, s in self.served.items()}
        ok = self.ready and not problems
        return ok, {"ready": ok, "models": versions, "problems": problems}

    def status(self) -> dict[str, Any]:
        with self.lock:
            models = {n: s.status() for n, s in self.served.items()}
        return {
            "session_id": self.session_id,
            "pid": os.getpid(),
            "queued": self.queued,
            "waiting": self.waiting,
            "dropped_requests": self.dropped,
            "started_at": self.started_at,
            "ready": self.ready,
            "engine": self.config.engine_kind,
            "reload_mode": "standby" if self.config.standby else "inplace",
            "base_loads": self.base_loads,
            "models": models,
            "not_served": [m for m in self.model_names() if m not in models],
        }

    # --- life cycle ---------------------------------------------------------------------
    def become_ready(self) -> None:
        # pidfile first: whoever sees /health answer 200 can already signal this process
        if self.config.pidfile:
            self._pidfile_fd = pidfile.hold(self.config.pidfile)
        self.ready = True
        adapters = {m: None for m in self.model_names()}
        adapters.update({n: _vid(s) for n, s in self.served.items()})
        models = {
            m: {"task": self.config.task_of(m), "engine": s.engine_kind if s else None}
            for m in adapters
            for s in [self.served.get(m)]
        }
        self._diagnose(
            {
                "event": "session",
                "started_at": self.started_at,
                "adapters": adapters,
                "models": models,
            }
        )
        log.info("ready on http://%s:%d: %s", LOOPBACK, self.config.port, adapters)

    def run_controller(self) -> None:
        """Act on signals until a stop; signals that arrive together make one reload pass."""
        while not self.control.stop:
            if self.control.reload:
                # Cleared before the pass: a signal during the pass asks for one more.
                self.control.reload = False
                self.reload_all()
            else:
                # A short sleep, not a blocking wait: the kernel may deliver the signal to
                # another thread, and Python only runs handlers when the main thread wakes.
                time.sleep(CONTROL_POLL_S)

    def close(self) -> None:
        for future in list(self._futures):
            future.cancel()  # queued requests are dropped; a running one finishes
        try:
            self.executor.submit(release_thread_streams).result()  # the engine thread's last
        except RuntimeError:  # already shut down
            pass
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.config.pidfile and self._pidfile_fd is not None:
            pidfile.release(self.config.pidfile, self._pidfile_fd)
            self._pidfile_fd = None
        self._diagnose({"event": "stop"})

    def _diagnose_reload(self, model: str, old: LoadedRelease | None, record: Any) -> None:
        record = dict(record or {})
        served = self.served.get(model)
        what = {"task": self.config.task_of(model), "engine": served and served.engine_kind}
        self._diagnose({"event": "reload", "model": model, **what, "from": _vid_of(old), **record})

    def _diagnose(self, record: dict[str, Any]) -> None:
        if self.config.diagnostics:
            entry = {"session_id": self.session_id, "at": utc_now(ms=True), **record}
            append_jsonl(self.config.diagnostics, entry)


def _timed(spent: list[float], fn: Callable[[], Any]) -> None:
    start = time.perf_counter()
    try:
        fn()
    finally:
        spent.append(time.perf_counter() - start)


def _vid_of(release: LoadedRelease | None) -> str | None:
    return release.version_id if release else None


def _vid(served: ServedModel) -> str | None:
    return _vid_of(served.release)


def reason_of(err: BaseException) -> str:
    one_line = getattr(err, "one_line", None)
    return one_line() if callable(one_line) else f"{type(err).__name__}: {err}"


@dataclass
class Control:
    """What the signal handlers ask for; plain flags, since a handler must not take locks."""

    reload: bool = False
    stop: bool = False
