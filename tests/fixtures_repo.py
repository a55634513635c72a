"""Fixtures for the training-side store: a real git + DVC repo with a local remote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
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


def dvc(cwd: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(tmp_path)


def make_store(tmp_path: Path) -> Store:
    """git init + dvc init + a local-directory DVC remote, with a params file."""
    repo, remote = tmp_path / "project", tmp_path / "dvc-remote"
    repo.mkdir()
    remote.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.analytics", "false")
    dvc(repo, "remote", "add", "-d", "local", str(remote))
    (repo / "adapters").mkdir()
    params = write_params(repo / "params.yaml", repo / "adapters")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "init"], cwd=repo, check=True)
    return Store(repo, remote, params)
