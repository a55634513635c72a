"""The store's DVC remote over ssh: its host key checked, the ssh-agent never forwarded.

dvc-ssh talks to an ssh:// remote through sshfs and asyncssh, not OpenSSH, and as shipped
trusts any host key (sshfs passes asyncssh `known_hosts=None`) and forwards the user's ssh-agent
to whoever answers (dvc-ssh passes `agent_forwarding=True`); dvc's config schema for ssh remotes
has no key to change either. So:
    - before a push, `check_known_host` refuses, without connecting, a remote whose host has no
      entry in the user's known_hosts (~/.ssh/known_hosts), naming the fix;
    - the push itself runs as `python -m adapter_deploy.store.ssh_remote push ...`: dvc, in a
      process of its own where dvc-ssh's connect options are made strict first
      (`strict_login`: known_hosts = that file, agent_forwarding off), so asyncssh checks the
      key of the very connection that carries the data and refuses a host whose key does not
      match, before anything is sent; `host_key_error` turns that refusal into HostKeyRefused.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from adapter_deploy.common.errors import HostKeyRefused

DEFAULT_PORT = 22
# What asyncssh says when it refuses a host key (ValueError texts in asyncssh.connection).
_REFUSALS = ("Host key is not trusted", "Host key is revoked", "Host CA key is")


def known_hosts_path() -> Path:
    """The user's known_hosts file: the one OpenSSH's ssh checks first."""
    return Path.home() / ".ssh" / "known_hosts"


def ssh_target(url: str, port: str | int | None = None) -> tuple[str, int] | None:
    """(host, port) of an ssh:// DVC remote URL (`port`: the remote's `port` setting, which
    wins over the URL's, as in dvc); None for any other kind of remote."""
    parts = urlsplit(url)
    if parts.scheme != "ssh" or not parts.hostname:
        return None
    return parts.hostname, int(port or parts.port or DEFAULT_PORT)


def _keyscan(host: str, port: int) -> str:
    scan = f"ssh-keyscan -p {port} {host}"
    return (
        f"compare the fingerprint `{scan} | ssh-keygen -lf -` prints with the host's own "
        "(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there), then "
        f"`{scan} >> {known_hosts_path()}` and push again"
    )


def check_known_host(host: str, port: int) -> None:
    """Refuse, without connecting, a host that has no trusted key in the user's known_hosts."""
    import asyncssh

    where = known_hosts_path()
    name = f"{host}:{port}"
    if not where.is_file():
        raise HostKeyRefused(
            f"the DVC remote {name}'s host key cannot be checked: {where} does not exist; "
            "nothing was pushed",
            fix=_keyscan(host, port),
        )
    try:
        known = asyncssh.read_known_hosts(str(where))
    except (OSError, ValueError) as err:
        raise HostKeyRefused(
            f"{where} is unreadable ({err}); nothing was pushed to the DVC remote {name}",
            fix=f"repair or remove the bad line in {where}, then push again",
        ) from err
    # (host keys, CA keys, revoked keys, X.509 certs, revoked certs, X.509 subjects, ...)
    found = known.match(host, "", port if port != DEFAULT_PORT else None)
    if not (found[0] or found[1] or found[3] or found[5]):
        raise HostKeyRefused(
            f"{where} holds no key for the DVC remote {name}, so it could be any host; "
            "nothing was pushed",
            fix=_keyscan(host, port),
        )


def refused_host_key(output: str) -> bool:
    """Whether a dvc command's output says asyncssh refused the remote's host key."""
    return any(text in output for text in _REFUSALS)


def host_key_error(host: str, port: int) -> HostKeyRefused:
    """The remote answered with a key known_hosts does not hold for it."""
    target = f"[{host}]:{port}" if port != DEFAULT_PORT else host
    return HostKeyRefused(
        f"the DVC remote {host}:{port} answered with a host key that {known_hosts_path()} does "
        "not hold for it (another machine may be answering in its place); nothing was pushed",
        fix=f"if that host's key changed on purpose, check its new fingerprint on the host, "
        f"`ssh-keygen -R '{target}'`, then `ssh-keyscan -p {port} {host} >> "
        f"{known_hosts_path()}` and push again; otherwise push nowhere until it is explained",
    )


def strict_login(login: dict[str, Any]) -> dict[str, Any]:
    """dvc-ssh's asyncssh connect options, made strict: the user's known_hosts decides which
    host keys are trusted (none, without the file), and no ssh-agent is forwarded."""
    where = known_hosts_path()
    trusted: Any = str(where) if where.is_file() else ([], [], [])  # trust no key at all
    return {**login, "known_hosts": trusted, "agent_forwarding": False}


def patch_dvc_ssh() -> bool:
    """Make every dvc-ssh connection of this process use `strict_login`; False without
    dvc-ssh (then no ssh:// remote can be reached at all)."""
    try:
        from dvc_ssh import SSHFileSystem
    except ImportError:
        return False
    prepare = SSHFileSystem._prepare_credentials
    if getattr(prepare, "strict", False):
        return True

    def strict_credentials(self: Any, **config: Any) -> dict[str, Any]:
        return strict_login(prepare(self, **config))

    strict_credentials.strict = True  # type: ignore[attr-defined]
    SSHFileSystem._prepare_credentials = strict_credentials
    return True


def _dvc_main(argv: list[str]) -> int:
    """dvc's own command line, in this process, its ssh remotes strict."""
    patch_dvc_ssh()
    from dvc.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_dvc_main(sys.argv[1:]))
