"""A real DVC remote: `store.remote` over ssh (dvc-ssh to the test sshd), version pushes,
a fresh clone's `dvc pull` restores every file, and dvc.yaml declares the models. Over ssh
the push checks the host key against the user's known_hosts (each test's own HOME) and never
forwards the ssh-agent (issue #27, hole 1)."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.kit.sshd import SSHServer, running_sshd
from fixtures_repo import ROOT, Store, make_adapter, run_script

# The end-to-end tier (make test-e2e): DVC store remotes over the real sshd.
pytestmark = pytest.mark.e2e


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _set_store(store: Store, **settings: object) -> None:
    data = yaml.safe_load(store.params.read_text())
    data["store"].update(settings)
    store.params.write_text(yaml.safe_dump(data, sort_keys=False))
    store.git("commit", "-q", "-am", "store settings")


def _home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, known_hosts: str | None) -> Path:
    """A HOME of the test's own: ~/.ssh/known_hosts holds `known_hosts` (None: no file)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    if known_hosts is not None:
        (home / ".ssh" / "known_hosts").write_text(known_hosts)
    monkeypatch.setenv("HOME", str(home))
    return home


def _ssh_store(store: Store, server: SSHServer, remote: Path) -> str:
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{server.port}{remote}"
    _set_store(store, remote=url, remote_config={"keyfile": str(server.identity)})
    return url


def test_version_pushes_to_an_ssh_remote_and_a_fresh_clone_pulls_it(
    store: Store, sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _home(monkeypatch, tmp_path, sshd.known_hosts.read_text())
    remote = tmp_path / "ssh-remote"
    url = _ssh_store(store, sshd, remote)
    adapter = make_adapter(tmp_path / "adapter")
    proc = run_script(
        "version.py", "--model", "gemma_4b", "--cycle", "1", "--src", str(adapter),
        params=store.params,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"pushed to the DVC remote {url}" in proc.stdout
    assert "only on this machine" not in proc.stderr
    assert store.git("status", "--porcelain") == ""  # .dvc/config and dvc.yaml committed
    version_id = proc.stdout.split("versioned ")[1].split()[0]
    original = _files(store.adapters / "gemma_4b" / version_id)

    clone = tmp_path / "new-machine"
    subprocess.run(["git", "clone", "-q", str(store.repo), str(clone)], check=True)
    pulled = subprocess.run(
        [sys.executable, "-m", "dvc", "pull"], cwd=clone, capture_output=True, text=True
    )
    assert pulled.returncode == 0, pulled.stderr
    assert _files(clone / "adapters" / "gemma_4b" / version_id) == original
    assert set(original) >= {"adapter_model.safetensors", "adapter_config.json"}

    import dvc.api

    shown = dvc.api.artifacts_show("gemma_4b", repo=str(clone))
    assert shown["path"] == "adapters/gemma_4b"


@pytest.mark.parametrize("known", ["another key", "no entry", "no file"])
def test_a_host_whose_key_known_hosts_does_not_hold_gets_nothing(
    store: Store, sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, known: str
) -> None:
    """An impostor answers on the remote's address (a host key other than the one known_hosts
    pins for it), or known_hosts has no entry for it: version refuses to push, one line with
    the fix, and nothing reaches the remote directory."""
    other_key = " ".join((sshd.dir / "id_ed25519.pub").read_text().split()[:2])  # not the host's
    known_hosts = {
        "another key": f"[127.0.0.1]:{sshd.port} {other_key}\n",
        "no entry": f"[127.0.0.1]:{sshd.port + 1} {other_key}\nexample.org {other_key}\n",
        "no file": None,
    }[known]
    home = _home(monkeypatch, tmp_path, known_hosts)
    remote = tmp_path / "ssh-remote"
    _ssh_store(store, sshd, remote)
    manifest = store.manifest()
    proc = run_script(
        "version.py", "--model", "gemma_4b", "--cycle", "1",
        "--src", str(make_adapter(tmp_path / "adapter")), params=store.params,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "nothing was pushed" in errors[0]
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {home}/.ssh/known_hosts" in errors[0]
    if known == "another key":
        assert "answered with a host key" in errors[0]
        assert f"ssh-keygen -R '[127.0.0.1]:{sshd.port}'" in errors[0]
    assert not remote.exists()  # not even a directory was made there
    assert store.manifest() == manifest  # no version recorded, no tag
    assert "cycle1" not in store.git("tag", "-l")


def test_the_push_never_asks_for_the_ssh_agent(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dvc-ssh asks for agent forwarding on every session where an agent is reachable; sshd
    logs each such request (auth-agent-req@openssh.com) at DEBUG1."""
    with running_sshd(tmp_path / "sshd", options="LogLevel DEBUG1\n") as server:
        _home(monkeypatch, tmp_path, server.known_hosts.read_text())
        monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))  # an agent to forward
        remote = tmp_path / "ssh-remote"
        url = _ssh_store(store, server, remote)
        proc = run_script(
            "version.py", "--model", "gemma_4b", "--cycle", "1",
            "--src", str(make_adapter(tmp_path / "adapter")), params=store.params,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert f"pushed to the DVC remote {url}" in proc.stdout
        log = (server.dir / "sshd.log").read_text()
    assert "Starting session: subsystem 'sftp'" in log  # the push's session is in the log
    assert "auth-agent-req" not in log
    assert any(p.is_file() for p in remote.rglob("*"))


def test_without_a_remote_version_warns_it_exists_only_here(store: Store, tmp_path: Path):
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "remove", "local"], cwd=store.repo, check=True
    )
    store.git("commit", "-q", "-am", "no remote")
    proc = run_script(
        "version.py", "--model", "gemma_4b", "--cycle", "1",
        "--src", str(make_adapter(tmp_path / "adapter")), "--json", params=store.params,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["pushed_to"] is None
    assert proc.stderr.count("exists only on this machine") == 1
    assert "set store.remote in params.yaml" in proc.stderr


def test_dvc_yaml_declares_every_model_as_a_registry_artifact(store: Store, tmp_path: Path):
    proc = run_script(
        "version.py", "--model", "whisper", "--cycle", "1",
        "--src", str(make_adapter(tmp_path / "a", base="kit/tiny-whisper")), params=store.params,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    artifacts = yaml.safe_load((store.repo / "dvc.yaml").read_text())["artifacts"]
    assert artifacts["whisper"]["path"] == "adapters/whisper"
    assert artifacts["whisper"]["type"] == "model"
    # The shipped dvc.yaml names every shipped model the same way.
    shipped = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    assert set(shipped) == set(models)
    for name, entry in shipped.items():
        assert entry["path"] == f"adapters/{name}" and entry["type"] == "model"
        assert models[name]["base_model"] in entry["desc"]
