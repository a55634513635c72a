"""The store's ssh remote: the host-key rule and the strict connect options (issue #27, hole 1),
without a network. The pushes themselves, to a real sshd (an impostor's key, no entry, no agent
request), are in test_store_remote.py (e2e tier)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest
from adapter_deploy.common.errors import HostKeyRefused
from adapter_deploy.store import ssh_remote


def _ed25519(seed: bytes) -> str:
    """An ssh-ed25519 public key line part (any 32 bytes are one to known_hosts)."""
    blob = b"".join(len(x).to_bytes(4, "big") + x for x in (b"ssh-ed25519", seed * 32))
    return "ssh-ed25519 " + base64.b64encode(blob).decode()


HOST_KEY, OTHER_KEY = _ed25519(b"h"), _ed25519(b"o")  # the host's, and somebody else's


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / ".ssh").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def _known_hosts(home: Path, *lines: str) -> Path:
    path = home / ".ssh" / "known_hosts"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _hashed(name: str, key: str) -> str:
    """An entry as `ssh-keygen -H` (Debian's HashKnownHosts) writes it."""
    salt = b"0123456789abcdefghij"
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()} {key}"


def test_no_known_hosts_file_is_refused_with_the_fix(home: Path) -> None:
    with pytest.raises(HostKeyRefused) as refused:
        ssh_remote.check_known_host("store.example", 2222)
    line = refused.value.one_line()
    assert refused.value.exit_code == 3 and "\n" not in line
    assert "does not exist" in line and "nothing was pushed" in line
    assert f"ssh-keyscan -p 2222 store.example >> {home}/.ssh/known_hosts" in line
    assert "ssh-keygen -lf" in line  # check the fingerprint before trusting it


@pytest.mark.parametrize(
    "lines",
    [
        (),  # an empty file
        (f"[store.example]:2200 {HOST_KEY}", f"other.example {HOST_KEY}"),  # other port, host
        (f"@revoked [store.example]:2222 {HOST_KEY}",),
    ],
)
def test_no_trusted_entry_for_the_host_is_refused(home: Path, lines: tuple[str, ...]) -> None:
    _known_hosts(home, *lines)
    with pytest.raises(HostKeyRefused) as refused:
        ssh_remote.check_known_host("store.example", 2222)
    line = refused.value.one_line()
    assert "holds no key for the DVC remote store.example:2222" in line
    assert "ssh-keyscan -p 2222 store.example >>" in line


@pytest.mark.parametrize(
    "entry",
    [
        f"[store.example]:2222 {HOST_KEY}",
        _hashed("[store.example]:2222", HOST_KEY),
        f"other.example,[store.example]:2222 {HOST_KEY}",
    ],
)
def test_a_plain_or_hashed_entry_for_the_host_passes(home: Path, entry: str) -> None:
    _known_hosts(home, f"other.example {OTHER_KEY}", entry)
    ssh_remote.check_known_host("store.example", 2222)


def test_port_22_entries_are_the_bare_host_name(home: Path) -> None:
    _known_hosts(home, f"store.example {HOST_KEY}")
    ssh_remote.check_known_host("store.example", 22)


def test_the_connect_options_check_known_hosts_and_never_forward_the_agent(home: Path) -> None:
    login = {"host": "store.example", "agent_forwarding": True, "known_hosts": None}
    strict = ssh_remote.strict_login(login)
    assert strict["agent_forwarding"] is False
    assert strict["known_hosts"] == ([], [], [])  # no file: no key is trusted
    path = _known_hosts(home, f"[store.example]:2222 {HOST_KEY}")
    strict = ssh_remote.strict_login(login)
    assert strict["known_hosts"] == str(path) and strict["agent_forwarding"] is False
    assert strict["host"] == "store.example" and login["agent_forwarding"] is True


def test_dvc_ssh_filesystems_get_the_strict_options(home: Path, monkeypatch) -> None:
    """What dvc-ssh hands asyncssh.connect once the push's process is patched (dvc-ssh alone
    passes agent_forwarding=True, and sshfs known_hosts=None: any key is trusted)."""
    from dvc_ssh import SSHFileSystem

    monkeypatch.setattr(SSHFileSystem, "_prepare_credentials", SSHFileSystem._prepare_credentials)
    path = _known_hosts(home, f"[store.example]:2222 {HOST_KEY}")
    assert ssh_remote.patch_dvc_ssh() and ssh_remote.patch_dvc_ssh()  # twice: one wrapper
    fs = SSHFileSystem(host="store.example", port=2222, keyfile=str(home / "id"))
    assert fs.fs_args["known_hosts"] == str(path)
    assert fs.fs_args["agent_forwarding"] is False
    assert fs.fs_args["client_keys"] == [str(home / "id")]  # dvc-ssh's own options stay


@pytest.mark.parametrize(
    ("url", "port", "target"),
    [
        ("ssh://user@store.example:2222/srv/dvc", None, ("store.example", 2222)),
        ("ssh://store.example/srv/dvc", None, ("store.example", 22)),
        ("ssh://user@store.example:2222/srv/dvc", "2200", ("store.example", 2200)),  # setting
        ("ssh://[::1]:2222/srv/dvc", None, ("::1", 2222)),
        ("s3://bucket/dvc", None, None),
        ("/srv/dvc-remote", None, None),
    ],
)
def test_ssh_target(url: str, port: str | None, target: tuple | None) -> None:
    assert ssh_remote.ssh_target(url, port) == target


def test_asyncssh_refusals_are_recognised() -> None:
    assert ssh_remote.refused_host_key(
        "ERROR: unexpected error - Host key is not trusted for host 127.0.0.1\n\nHaving any"
    )
    assert not ssh_remote.refused_host_key("ERROR: failed to push data to the cloud")
    error = ssh_remote.host_key_error("store.example", 2222)
    assert error.exit_code == 3
    assert "ssh-keygen -R '[store.example]:2222'" in error.one_line()
