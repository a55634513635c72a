"""A training store plus endpoints reached over the real sshd, with kit adapters versioned."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from fixtures_repo import ROOT, Store, copy_store, make_store, run_script, run_script_here
from safetensors.numpy import load_file, save_file


@dataclass
class Fleet:
    store: Store
    params: Path
    endpoints: dict[str, Path]  # name -> adapter_dir
    versions: dict[str, str] = field(default_factory=dict)  # label -> version id

    def deploy(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_script("deploy_adapters.py", *args, params=self.params, **kw)

    def deploy_here(self, *args: str) -> subprocess.CompletedProcess:
        """`deploy` in this process: for matrices of refused arguments."""
        return run_script_here("deploy_adapters.py", *args, params=self.params)

    def links(self, endpoint: str, model: str = "gemma_4b") -> tuple[str | None, str | None]:
        root = self.endpoints[endpoint] / model
        names = []
        for link in ("active", "previous"):
            try:
                names.append(Path(os.readlink(root / link)).name)
            except FileNotFoundError:
                names.append(None)
        return names[0], names[1]

    def log(self) -> list[dict]:
        path = self.store.adapters / "deploy_log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def set_endpoint(self, name: str, **changes: object) -> None:
        data = yaml.safe_load(self.params.read_text())
        data["endpoints"][name].update(changes)
        self.params.write_text(yaml.safe_dump(data))


def agent_wrapper(tmp_path: Path, preamble: str, name: str = "python-agent") -> Path:
    """An endpoint `python` that runs the real agent after `preamble` (Python code that
    changes one thing, e.g. what a reply holds): the deployer runs `<python> -m
    adapter_deploy.agent ...` over the real sshd, the wrapper drops the `-m` pair."""
    wrapper = tmp_path / name
    code = (
        f"{preamble}; import runpy, sys; sys.argv[0] = 'agent'; "
        "runpy.run_module('adapter_deploy.agent', run_name='__main__')"
    )
    wrapper.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} -c "{code}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def version(store: Store, params: Path, src: Path, cycle: int, model: str = "gemma_4b") -> str:
    proc = run_script(
        "version.py",
        "--model",
        model,
        "--cycle",
        str(cycle),
        "--src",
        str(src),
        "--json",
        params=params,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["version_id"]


@pytest.fixture(scope="session")
def fleet_template(kit, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A store with cycle1=good, cycle2=good2, cycle3=regressed, versioned once per session."""
    from fixtures_repo import make_store

    store = make_store(tmp_path_factory.mktemp("fleet-template"))
    data = yaml.safe_load(store.params.read_text())
    data["models"]["gemma_4b"]["base_model"] = str(kit.base)
    store.params.write_text(yaml.safe_dump(data))
    versions = {}
    for cycle, adapter in ((1, kit.good), (2, kit.good2), (3, kit.regressed)):
        versions[f"cycle{cycle}"] = version(store, store.params, adapter, cycle)
    return store.repo.parent, versions


@pytest.fixture
def fleet(fleet_template, sshd, tmp_path: Path) -> Fleet:
    """A private copy of the template store plus two endpoints (ep1, ep2) over ssh."""
    template, versions = fleet_template
    store = copy_store(template, tmp_path)
    endpoints = {name: tmp_path / name / "adapters" for name in ("ep1", "ep2")}
    data = yaml.safe_load(store.params.read_text())
    data["store"]["adapters_dir"] = str(store.adapters)
    data["endpoints"] = {name: sshd.endpoint(path) for name, path in endpoints.items()}
    store.params.write_text(yaml.safe_dump(data))
    return Fleet(store, store.params, endpoints, dict(versions))


__all__ = ["Fleet", "fleet", "ROOT", "sys"]


def inflated_adapter(src: Path, dst: Path, rank: int) -> Path:
    """`src` with its LoRA rank padded to `rank`: the same outputs, megabytes instead of KB.

    The padding holds random values around 1e-25, so each extra rank adds about 1e-50 to a
    float32 output: it underflows to zero, the health check still passes, and the bytes are
    as incompressible and unrepeating as real weights (zeros would let rsync match blocks of
    the part never sent against those of the part that was).
    """
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    r, rng, padded = config["r"], np.random.default_rng(7), {}
    for name, t in load_file(dst / "adapter_model.safetensors").items():
        axis = 0 if ".lora_A." in name else 1  # A is (r, in), B is (out, r)
        shape = (rank - r, t.shape[1]) if axis == 0 else (t.shape[0], rank - r)
        pad = (rng.standard_normal(shape) * 1e-25).astype(t.dtype)
        padded[name] = np.concatenate([t, pad], axis=axis)
    save_file(padded, str(dst / "adapter_model.safetensors"))
    # scaling is lora_alpha / r: keep it, or the original ranks would count for less
    config.update(r=rank, lora_alpha=config["lora_alpha"] * rank // r)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def restart_deploy_and_rollback(fleet: Fleet, tmp_path: Path, check_active, **endpoint) -> None:
    """Deploy cycles 1 and 2 to ep2 (restart reload, `endpoint` settings), call
    `check_active(<ep2>/gemma_4b/active)`, roll back: cycle 1 serves, three restarts."""
    restarts = tmp_path / "restarts.log"
    fleet.set_endpoint(
        "ep2", platform="cuda", reload_method="restart",
        restart_command=["sh", "-c", f"echo restarted >> {restarts}"], **endpoint,
    )  # fmt: skip
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    for cycle in ("1", "2"):
        proc = fleet.deploy("--cycle", cycle, "--models", "gemma_4b", "--endpoints", "ep2")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fleet.links("ep2") == (v2, v1)
    check_active(fleet.endpoints["ep2"] / "gemma_4b" / "active")
    proc = fleet.deploy("--rollback", "--endpoints", "ep2", "--models", "gemma_4b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fleet.links("ep2")[0] == v1
    assert restarts.read_text().count("restarted") == 3  # two activations and the rollback


@pytest.fixture(scope="session")
def signed_template(kit, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A store with a signing key: cycle1=good, cycle2=good2, cycle3=regressed, all signed
    (the pull tests' template, shared by every module that pulls)."""
    store = make_store(tmp_path_factory.mktemp("pull-template"))
    key = store.repo.parent / "keys" / "signing.pem"
    data = yaml.safe_load(store.params.read_text())
    data["models"]["gemma_4b"]["base_model"] = str(kit.base)
    data["store"]["signing_key"] = str(key)
    store.params.write_text(yaml.safe_dump(data))
    assert run_script("keygen.py", params=store.params).returncode == 0
    versions = {}
    for cycle, adapter in ((1, kit.good), (2, kit.good2), (3, kit.regressed)):
        versions[f"cycle{cycle}"] = version(store, store.params, adapter, cycle)
    return store.repo.parent, versions
