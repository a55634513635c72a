"""A real DVC remote: `store.remote` over ssh (dvc-ssh to the test sshd), version pushes,
a fresh clone's `dvc pull` restores every file, and dvc.yaml declares the models."""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from adapter_deploy.common.fsutil import sha256_file
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


def test_version_pushes_to_an_ssh_remote_and_a_fresh_clone_pulls_it(
    store: Store, sshd, tmp_path: Path
) -> None:
    remote = tmp_path / "ssh-remote"
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{sshd.port}{remote}"
    _set_store(store, remote=url, remote_config={"keyfile": str(sshd.identity)})
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
