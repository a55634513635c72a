"""One error hierarchy for the whole project.

Every error carries the exit code the scripts return and a message that names
the problem and the fix. The core raises these; only the shared runner prints
them and exits.

Exit codes (the documented interface; `make` itself exits 2 on any failure):
    0  success
    1  unexpected internal error (a bug: rerun with --traceback)
    2  usage or configuration error (bad flag, params.yaml, adapter, model, cycle)
    3  remote error (ssh, rsync, transfer, checksum, endpoint disk)
    4  health check failed
    5  reload failed (service did not acknowledge the new release)
    6  nothing to roll back
    7  endpoint locked by another deploy
"""

from __future__ import annotations


class AdapterDeployError(Exception):
    """Base class: a known failure with an exit code and a suggested fix."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        return f"{text}. Fix: {self.fix}" if self.fix else text


class UsageError(AdapterDeployError):
    exit_code = 2


class ConfigError(UsageError):
    """params.yaml is missing, unreadable or invalid."""


class AdapterError(UsageError):
    """An adapter directory is not something we will version or load."""


class SignatureRefused(UsageError):
    """Signed metadata an endpoint must not accept: the release is refused."""


class ProtocolMismatch(UsageError):
    """The endpoint's agent speaks another protocol version than the deployer."""


class ProtocolError(UsageError):
    """A request the agent cannot read: unknown operation, missing or unknown fields."""


class CorruptState(UsageError):
    """A state file is not what this project writes: reported, never read as empty."""


class TamperedTool(UsageError):
    """A pinned tool (the llama-cpp-python sdist, llama.cpp's converter tree) whose bytes are
    not the ones this repository pins: refused before it is built or run."""


class BadAudio(UsageError):
    """An audio clip that is not a PCM WAV we can decode."""


class AudioTooLong(BadAudio):
    """A clip longer than the model hears at once: it would be cut, so it is refused."""

    def __init__(self, seconds: float, limit: float) -> None:
        super().__init__(
            f"audio is {seconds:.1f} s, over the model's {limit:g} s window",
            fix="send shorter clips, one utterance at a time",
        )
        self.seconds, self.limit = seconds, limit


class RemoteError(AdapterDeployError):
    exit_code = 3


class ChecksumMismatch(RemoteError):
    """A transferred file does not match the manifest."""


class HostKeyRefused(RemoteError):
    """An ssh host whose key is not in, or does not match, the user's known_hosts: nothing
    is sent to it (and no ssh-agent is ever forwarded to any host)."""


class DiskFull(RemoteError):
    """The endpoint ran out of space mid-transfer."""


class UntrustedReply(RemoteError):
    """An endpoint answered with a name or version id this project never writes."""


class ServiceUnavailable(RemoteError):
    """The running service cannot check a release itself (not up, no control socket, an
    engine or release kind it cannot load beside the serving one): checked in a process."""


class HealthCheckFailed(AdapterDeployError):
    exit_code = 4


class ReloadFailed(AdapterDeployError):
    exit_code = 5


class NothingToRollBack(AdapterDeployError):
    exit_code = 6


class Locked(AdapterDeployError):
    exit_code = 7


class StepFailed(AdapterDeployError):
    """A step of a scripted run (make demo) failed: its command's own exit code (one of the
    codes above; 1 for any other), or 5 when the service it started stopped answering."""

    def __init__(self, message: str, fix: str | None, exit_code: int) -> None:
        super().__init__(message, fix)
        self.exit_code = exit_code if exit_code in EXIT_CODES and exit_code else 1


class RolloutHalted(AdapterDeployError):
    """A wave of a staged rollout failed: the later waves were held on their release."""

    exit_code = 8


EXIT_CODES = {
    0: "success",
    1: "unexpected internal error",
    2: "usage or configuration error",
    3: "remote error",
    4: "health check failed",
    5: "reload failed",
    6: "nothing to roll back",
    7: "endpoint locked",
    8: "rollout halted: a wave failed, the later waves were held",
}
