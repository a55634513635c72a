"""Fixtures for the training-side store: a real git + DVC repo with a local remote."""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from adapter_deploy.common import logs
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]

# Tests never read the developer's git or DVC settings.
os.environ.update(
    {
        "GIT_AUTHOR_NAME": "Adapter Deploy Tests",
        "GIT_AUTHOR_EMAIL": "tests@adapter-deploy.invalid",
        "GIT_COMMITTER_NAME": "Adapter Deploy Tests",
        "GIT_COMMITTER_EMAIL": "tests@adapter-deploy.invalid",
        "GIT_CONFIG_NOSYSTEM": "1",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(Path("/tmp") / f"adapter-deploy-dvc-site-{os.getpid()}"),
        "NO_COLOR": "1",
    }
)


# Deploy-logic tests judge answers, not speed: their latency limit is a setting no machine
# load reaches (parallel workers, a busy CI box). The latency rule itself is proven where load
# cannot move it: test_health_check's judgement and test_deploy's limit so small that the
# pre-check must refuse.
TEST_LATENCY_LIMIT_S = 60.0


@dataclass
class Store:
    repo: Path
    remote: Path
    params: Path

    @property
    def adapters(self) -> Path:
        return self.repo / "adapters"

    def manifest(self) -> dict:
        path = self.adapters / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def git(self, *args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=self.repo, check=True, capture_output=True, text=True
        ).stdout

    def state(self) -> tuple[str, str, str]:
        """What must not change after a refused command: HEAD, tags, files on disk."""
        files = sorted(
            str(p.relative_to(self.repo)) for p in self.repo.rglob("*") if ".git" not in p.parts
        )
        return self.git("rev-parse", "HEAD"), self.git("tag", "-l"), "\n".join(files)


def write_params(path: Path, adapters_dir: Path, endpoints: dict | None = None) -> Path:
    data = {
        "store": {"adapters_dir": str(adapters_dir)},
        "models": {
            "gemma_4b": {"task": "translation", "base_model": "kit/tiny-gemma"},
            "whisper": {"task": "transcription", "base_model": "kit/tiny-whisper"},
        },
        "health_check": {"latency_limit_s": TEST_LATENCY_LIMIT_S},
        "endpoints": endpoints or {},
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_adapter(path: Path, seed: int = 0, base: str = "kit/tiny-gemma") -> Path:
    """A structurally real PEFT LoRA adapter dir (random weights)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": rng.standard_normal((8, 64), dtype=np.float32),
            f"{prefix}.lora_B.weight": rng.standard_normal((64, 8), dtype=np.float32),
        },
        str(path / "adapter_model.safetensors"),
    )
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": base,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    metrics = {"final_loss": 0.4 + seed / 100, "eval_wer": 8.0, "epochs": 3, "data_hours": 22.5}
    (path / "training_metrics.json").write_text(json.dumps(metrics))  # as the trainer saves it
    return path


def run_script(
    name: str, *args: str, params: Path | None = None, **kw
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if params is not None:
        env["PARAMS"] = str(params)
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=kw.pop("cwd", ROOT),
        env=env,
        capture_output=True,
        text=True,
        **kw,
    )


def run_script_here(
    name: str, *args: str, params: Path | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """`run_script` inside this process: the same script file, argv, PARAMS and cwd, its exit
    code and output captured, without a Python start-up (and its imports) per call. For
    argument-checking matrices; one case of each stays a real subprocess (`run_script`)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, os.getcwd(), os.environ.get("PARAMS")
    process_context = dict(logs._PROCESS)  # a script's set_process_context must not outlive it
    argv = [str(ROOT / "scripts" / name), *args]
    sys.argv = list(argv)
    if params is not None:
        os.environ["PARAMS"] = str(params)
    os.chdir(cwd)
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        if saved[2] is None:
            os.environ.pop("PARAMS", None)
        else:
            os.environ["PARAMS"] = saved[2]
        logs._PROCESS.clear()
        logs._PROCESS.update(process_context)
        root = logging.getLogger()
        for handler in [h for h in root.handlers if getattr(h, "stream", None) is err]:
            root.removeHandler(handler)
    if isinstance(code, str):  # sys.exit("message"): Python prints it and exits 1
        err.write(code + "\n")
        code = 1
    return subprocess.CompletedProcess(argv, code or 0, out.getvalue(), err.getvalue())


def dvc(cwd: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(tmp_path)


_TEMPLATE: list[Path] = []  # the one store built with git + dvc in this process


def _store_template() -> Path:
    """git init + dvc init + a local-directory DVC remote, once per process (dvc's start-up
    costs about a second a call; every store after the first is a copy)."""
    if not _TEMPLATE:
        root = Path(tempfile.mkdtemp(prefix="adapter-deploy-store-template-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        repo, remote = root / "project", root / "dvc-remote"
        repo.mkdir()
        remote.mkdir()
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
        dvc(repo, "init", "-q")
        dvc(repo, "config", "core.analytics", "false")
        dvc(repo, "remote", "add", "-d", "local", str(remote))
        (repo / "adapters").mkdir()
        write_params(repo / "params.yaml", repo / "adapters")
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run(["git", "commit", "-q", "-m", "init"], cwd=repo, check=True)
        _TEMPLATE.append(root)
    return _TEMPLATE[0]


def copy_store(template: Path, dest: Path) -> Store:
    """A copy of the store under `template` (project/ + dvc-remote/) at `dest`, its DVC remote
    pointing at its own copy. The copied config is left uncommitted, as `dvc remote modify`
    would leave it."""
    shutil.copytree(template / "project", dest / "project", symlinks=True)
    shutil.copytree(template / "dvc-remote", dest / "dvc-remote", symlinks=True)
    config = dest / "project" / ".dvc" / "config"
    old, new = str(template / "dvc-remote"), str(dest / "dvc-remote")
    config.write_text(config.read_text().replace(old, new))
    return Store(dest / "project", dest / "dvc-remote", dest / "project" / "params.yaml")


def make_store(tmp_path: Path) -> Store:
    """A fresh store: git + DVC repo, a local-directory DVC remote, a params file, one commit
    (a copy of this process's template, made and committed in place)."""
    store = copy_store(_store_template(), tmp_path)
    write_params(store.params, store.adapters)
    subprocess.run(
        ["git", "commit", "-q", "-a", "--amend", "--no-edit"], cwd=store.repo, check=True
    )
    return store
