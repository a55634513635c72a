"""The service's control channel: a Unix socket only the endpoint's own agent can use.

The inference service listens on `<adapter_dir>/.service-control.sock` (mode 0600, and it
answers only peers of its own uid) beside its public loopback HTTP port. The endpoint agent
uses it for the in-service pre-check: one connection is one candidate session:

    with CandidateSession(adapter_dir, "gemma_4b", "cycle2_...") as candidate:
        result = run_health_check(candidate, sentences)     # candidate.translate(text)
        shadow = candidate.shadow()                         # live inputs replayed
    # closing the connection drops the candidate in the service

Every message is one JSON line each way: `{"op": ...}` -> `{"ok": true, ...}` or
`{"ok": false, "error": str, "unsupported": bool}`; `unsupported` means "check it in a
separate process instead" (a release kind or engine that needs its own base).
Ops: load {model, version_id}, translate {text}, transcribe {audio_b64}, shadow, drop.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter_deploy.common.errors import AdapterError, ServiceUnavailable

if TYPE_CHECKING:
    from adapter_deploy.engines.base import LoadedRelease, Translation

CONTROL_SOCKET = ".service-control.sock"
CONTROL_TIMEOUT_S = 300.0  # one reply: a load, a sentence, or the whole shadow replay
_SUN_PATH_MAX = 100  # sockaddr_un holds 104-108 bytes; longer paths go through /proc/self/fd


def control_path(adapter_dir: str | Path) -> Path:
    return Path(adapter_dir) / CONTROL_SOCKET


def sun_path(path: Path) -> tuple[str, int | None]:
    """An address for `path` that fits sockaddr_un, and the dir fd to close after use."""
    if len(os.fsencode(str(path))) <= _SUN_PATH_MAX or not Path("/proc/self/fd").is_dir():
        return str(path), None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def receive(reader: Any) -> dict[str, Any] | None:
    """One JSON line from a socket's file; None at the end of the stream."""
    line = reader.readline()
    if not line:
        return None
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a control message is a JSON object")
    return message


class CandidateSession:
    """A staged release loaded in the running service beside the active one (the Engine
    protocol's translate/transcribe run with it); closing drops it there."""

    def __init__(self, adapter_dir: str | Path, model: str, version_id: str) -> None:
        self.model, self.version_id = model, version_id
        self.loaded: LoadedRelease | None = None
        path = control_path(adapter_dir)
        address, fd = sun_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(CONTROL_TIMEOUT_S)
        try:
            self.sock.connect(address)
        except OSError as err:
            self.sock.close()
            raise ServiceUnavailable(
                f"the service's control socket {path} refused ({err})",
                fix="start the service (scripts/service.py start) so checks run inside it",
            ) from None
        finally:
            if fd is not None:
                os.close(fd)
        self.reader = self.sock.makefile("rb")

    def __enter__(self) -> CandidateSession:
        from adapter_deploy.engines.base import LoadedRelease

        try:
            answer = self.call({"op": "load", "model": self.model, "version_id": self.version_id})
        except BaseException:
            self.close()
            raise
        self.loaded = LoadedRelease(**answer["release"])
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request and its reply; a refusal to use the service at all is
        ServiceUnavailable, a release that failed in it an AdapterError."""
        try:
            send(self.sock, request)
            reply = receive(self.reader)
        except (OSError, ValueError) as err:
            raise ServiceUnavailable(f"the service's control socket failed ({err})") from None
        if reply is None:
            raise ServiceUnavailable("the service closed its control socket mid-check")
        if reply.get("ok"):
            return reply
        error = str(reply.get("error"))
        if reply.get("unsupported"):
            raise ServiceUnavailable(f"the service cannot check it in place: {error}")
        raise AdapterError(error, fix="the candidate was dropped; the active release serves on")

    def translate(self, text: str) -> Translation:
        from adapter_deploy.engines.base import Translation

        answer = self.call({"op": "translate", "text": text})
        return Translation(str(answer["text"]), float(answer["latency_s"]))

    def transcribe(self, audio_path: str | Path) -> Translation:
        from adapter_deploy.engines.base import Translation

        audio = base64.b64encode(Path(audio_path).read_bytes()).decode()
        answer = self.call({"op": "transcribe", "audio_b64": audio})
        return Translation(str(answer["text"]), float(answer["latency_s"]))

    def shadow(self) -> dict[str, Any]:
        """The live inputs the service kept, replayed through the candidate: how many
        outputs changed against what the active release answered, and the worst pairs."""
        return self.call({"op": "shadow"})["shadow"]
