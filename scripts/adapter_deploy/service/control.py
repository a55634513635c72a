"""The service's control socket: the endpoint agent's in-service pre-check and shadow replay.

`<adapter_dir>/.service-control.sock` (engines/control_client.py holds the wire format) is
created mode 0600 and answers only peers of the service's own uid: the endpoint's agent, not
whoever can reach the public loopback HTTP port. One connection is one candidate session:
`load` puts the staged release `<model>/releases/<id>/` beside the active adapter on the same
base (`load_candidate` of the engine: PEFT and MLX; on this connection's thread, so live
requests are answered while it loads), each `translate`/`transcribe` runs one
input with it on the engine thread, in turn with live requests (FIFO: a live request waits
at most one check sentence, and is always answered by the active release), `shadow` replays
the live inputs the service kept through it, and `drop` or the end of the connection deletes
it. A candidate that does not load or fails its check changes nothing that serves.
"""

from __future__ import annotations

import base64
import difflib
import logging
import os
import socket
import struct
import threading
from typing import Any

from adapter_deploy.common.errors import AdapterDeployError
from adapter_deploy.common.names import check_name, check_version_id
from adapter_deploy.engines.base import NotBeside
from adapter_deploy.engines.control_client import control_path, receive, send, sun_path
from adapter_deploy.service.state import ServedModel, Service, reason_of

log = logging.getLogger("adapter_deploy.service")

SHADOW_WORST = 3  # changed pairs reported, the least similar first


class Unsupported(Exception):
    """The candidate cannot be checked in this service: the agent checks it in a process."""


class CandidateCheck:
    """One control connection's candidate: what it loaded and on which served model."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.served: ServedModel | None = None
        self.engine: Any = None

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "load":
            return {"release": self.load(str(request.get("model")), request.get("version_id"))}
        if op == "drop":
            self.drop()
            return {}
        if self.engine is None:
            raise Unsupported(f"{op!r} before a candidate was loaded")
        if op == "translate":
            return self._run(lambda engine: engine.translate(str(request["text"])))
        if op == "transcribe":
            return self._transcribe(str(request["audio_b64"]))
        if op == "shadow":
            return {"shadow": self.shadow()}
        raise Unsupported(f"unknown control operation {op!r}")

    def load(self, model: str, version_id: Any) -> dict[str, str]:
        self.drop()
        check_name("model", model)
        path = self.service.link(model, "releases") / check_version_id(str(version_id))
        served = self.service.served.get(model)
        engine = served.engine if served else None
        if engine is None or not hasattr(engine, "load_candidate"):
            kind = served.engine_kind if served else None
            raise Unsupported(f"{model} is not served by an engine that loads a candidate ({kind})")
        if not path.is_dir():
            raise Unsupported(f"{path} is not a staged release")

        # Loaded on this connection's thread: live requests are answered meanwhile (the
        # engine adds the candidate beside the serving adapter without holding them up).
        try:
            release = engine.load_candidate(path)
        except NotBeside as err:
            raise Unsupported(str(err)) from err
        self.served, self.engine = served, engine
        log.info("%s: pre-check of %s beside %s", model, release.version_id, _active(served))
        return release.to_dict()

    def _run(self, work: Any) -> dict[str, Any]:
        engine = self.engine

        def job() -> Any:
            with engine.candidate():
                return work(engine)

        answer = self.service.on_engine_thread(job)
        return {"text": answer.text, "latency_s": answer.latency_s}

    def _transcribe(self, audio_b64: str) -> dict[str, Any]:
        from adapter_deploy.engines.whisper_engine import decode_wav

        engine = self.engine
        samples = decode_wav(base64.b64decode(audio_b64), engine.sample_rate, engine.window_s)
        return self._run(lambda whisper: whisper.transcribe(samples))

    def shadow(self) -> dict[str, Any]:
        """The kept live inputs that the active release answered, through the candidate."""
        served = self.served
        assert served is not None
        kept = self.service.on_engine_thread(lambda: list(served.shadow))
        active = _active(served)
        pairs = [(text, out) for text, out, version in kept if version == active]
        changed = []
        for text, before in pairs:
            after = self._run(lambda e, text=text: e.translate(text))["text"]
            if after.strip() != before.strip():
                ratio = difflib.SequenceMatcher(None, before, after).ratio()
                pair = {"input": text, "active_output": before, "candidate_output": after}
                changed.append({**pair, "similarity": round(ratio, 4)})
        changed.sort(key=lambda pair: pair["similarity"])
        return {
            "active_version": active,
            "compared": len(pairs),
            "changed": len(changed),
            "worst": changed[:SHADOW_WORST],
        }

    def drop(self) -> None:
        engine, self.engine, self.served = self.engine, None, None
        if engine is not None:
            engine.drop_candidate()  # not serving: deleted without a turn on the engine thread


def _active(served: ServedModel) -> str | None:
    return served.release.version_id if served.release else None


class ControlServer:
    """Accepts the agent's connections on the control socket, one session at a time."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.path = control_path(service.config.adapter_dir)
        self.busy = threading.Lock()  # one candidate at a time (the agent holds a lock too)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def start(self) -> None:
        # A service started before the first deploy (the demo, a fresh endpoint) finds no
        # adapter dir yet; the agent's session creates it the same way.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        address, fd = sun_path(self.path)
        try:
            if self.path.is_socket():  # left by a service that was killed
                self.path.unlink()
            old = os.umask(0o177)  # created 0600: no window where others may connect
            try:
                self.sock.bind(address)
            finally:
                os.umask(old)
            os.chmod(address, 0o600)
        finally:
            if fd is not None:
                os.close(fd)
        self.sock.listen(4)
        threading.Thread(target=self._accept_loop, name="control", daemon=True).start()
        log.info("control socket %s", self.path)

    def close(self) -> None:
        self.sock.close()
        try:
            if self.path.is_socket():
                self.path.unlink()
        except OSError:
            pass

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the service stops
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            if not _same_user(conn):
                send(conn, {"ok": False, "error": "not the service's user", "unsupported": True})
                return
            with self.busy:
                check = CandidateCheck(self.service)
                try:
                    self._session(conn, reader, check)
                finally:
                    try:
                        check.drop()
                    except Exception:  # the executor is shutting down with the service
                        log.debug("dropping a candidate failed", exc_info=True)

    def _session(self, conn: socket.socket, reader: Any, check: CandidateCheck) -> None:
        while True:
            try:
                request = receive(reader)
            except (OSError, ValueError):
                return
            if request is None:
                return
            try:
                reply = {"ok": True, **check.handle(request)}
            except Unsupported as err:
                reply = {"ok": False, "error": str(err), "unsupported": True}
            except (AdapterDeployError, Exception) as err:  # a bad candidate never stops it
                reply = {"ok": False, "error": reason_of(err), "unsupported": False}
            try:
                send(conn, reply)
            except OSError:
                return


def _same_user(conn: socket.socket) -> bool:
    """The peer runs as this service's uid (Linux SO_PEERCRED; elsewhere the 0600 mode)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return True
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, 12))
    return uid == os.geteuid()
