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


class DiskFull(RemoteError):
    """The endpoint ran out of space mid-transfer."""


class HealthCheckFailed(AdapterDeployError):
    exit_code = 4


class ReloadFailed(AdapterDeployError):
    exit_code = 5


class NothingToRollBack(AdapterDeployError):
    exit_code = 6


class Locked(AdapterDeployError):
    exit_code = 7


EXIT_CODES = {
    0: "success",
    1: "unexpected internal error",
    2: "usage or configuration error",
    3: "remote error",
    4: "health check failed",
    5: "reload failed",
    6: "nothing to roll back",
    7: "endpoint locked",
}
