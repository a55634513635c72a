"""scripts/version.py and the version store (git + DVC + manifest + tags)."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.store.versioning import make_version_id
from fixtures_repo import ROOT, Store, dvc, make_adapter, run_script, run_script_here

VERSION_RE = re.compile(r"^cycle(\d+)_(\d{8})_([0-9a-f]{8})$")


def version(store: Store, src: Path, cycle: int = 1, model: str = "gemma_4b", *extra: str):
    return run_script(
        "version.py",
        "--model",
        model,
        "--cycle",
        str(cycle),
        "--src",
        str(src),
        "--json",
        *extra,
        params=store.params,
    )


def version_here(store: Store, src: Path, cycle: int = 1, model: str = "gemma_4b", *extra: str):
    """`version` in this process (refusal matrices; each keeps one real-process case)."""
    args = ("--model", model, "--cycle", str(cycle), "--src", str(src), "--json", *extra)
    return run_script_here("version.py", *args, params=store.params)


def test_version_id_format() -> None:
    vid = make_version_id(3, "f1e2d3c4" + "0" * 56, datetime(2026, 4, 1, tzinfo=UTC))
    assert vid == "cycle3_20260401_f1e2d3c4"


def test_version_records_manifest_dvc_and_tags(store: Store, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "out")
    (src / "training_metrics.json").write_text(json.dumps({"final_loss": 0.42, "epochs": 3}))
    proc = version(store, src)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    vid = result["version_id"]
    cycle, day, sha8 = VERSION_RE.match(vid).groups()
    sha = sha256_file(src / "adapter_model.safetensors")
    assert (cycle, sha8) == ("1", sha[:8])
    assert day == datetime.now(UTC).strftime("%Y%m%d")

    entry = store.manifest()["versions"]["gemma_4b"][0]
    assert entry["version_id"] == vid and entry["cycle"] == 1 and entry["sha256"] == sha
    assert entry["base_model"] == "kit/tiny-gemma"
    assert entry["training_metrics"] == {"final_loss": 0.42, "epochs": 3}
    vdir = store.adapters / "gemma_4b" / vid
    assert set(entry["files"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_metrics.json",
    }
    for name, info in entry["files"].items():
        assert info == {"sha256": sha256_file(vdir / name), "size": (vdir / name).stat().st_size}
    assert {"versions", "endpoints", "deployments"} <= set(store.manifest())

    assert (store.adapters / "gemma_4b" / f"{vid}.dvc").is_file()
    assert store.git("status", "--porcelain") == ""
    assert store.git("ls-files", f"adapters/gemma_4b/{vid}") == ""  # weights live in DVC
    assert set(store.git("tag", "-l").split()) == {"cycle1", "gemma_4b@v1.0.0"}
    assert vid in store.git("tag", "-l", "--format=%(contents)", "gemma_4b@v1.0.0")
    assert list(store.remote.rglob("*")), "dvc push to the default remote"


def test_same_bytes_same_cycle_changes_nothing(store: Store, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "out")
    first = json.loads(version(store, src).stdout)
    before = store.state()
    again = version(store, src)
    assert again.returncode == 0
    assert json.loads(again.stdout) == {**first, "created": False, "tags": []}
    assert store.state() == before


def test_same_bytes_new_cycle_new_id_without_second_cache_copy(
    store: Store, tmp_path: Path
) -> None:
    src = make_adapter(tmp_path / "out")
    first = json.loads(version(store, src, 1).stdout)["version_id"]
    cache = store.repo / ".dvc" / "cache"
    objects = sorted(p for p in cache.rglob("*") if p.is_file())
    second = json.loads(version(store, src, 2).stdout)["version_id"]
    assert second != first and second.startswith("cycle2_")
    weights = [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".dir")]
    assert len(weights) == len([p for p in objects if not p.name.endswith(".dir")])


def test_existing_cycle_tag_is_never_moved(store: Store, tmp_path: Path) -> None:
    version(store, make_adapter(tmp_path / "a", seed=1), 1, "gemma_4b")
    target = store.git("rev-list", "-n1", "cycle1")
    proc = version(store, make_adapter(tmp_path / "b", seed=2), 1, "whisper")
    assert proc.returncode == 0, proc.stderr
    assert store.git("rev-list", "-n1", "cycle1") == target
    assert "cycle1.1" in json.loads(proc.stdout)["tags"]
    assert "whisper@v1.0.0" in store.git("tag", "-l").split()


def test_retag_moves_the_cycle_tag_explicitly(store: Store, tmp_path: Path) -> None:
    version(store, make_adapter(tmp_path / "a", seed=1), 1, "gemma_4b")
    old = store.git("rev-list", "-n1", "cycle1")
    proc = version(store, make_adapter(tmp_path / "b", seed=2), 1, "whisper", "--retag")
    assert proc.returncode == 0, proc.stderr
    assert store.git("rev-list", "-n1", "cycle1") != old


class _Canary:
    """Unpickling this creates the canary file: proof that something loaded a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickle_is_refused_and_never_loaded(store: Store, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "out")
    canary = tmp_path / "CANARY"
    (src / "adapter_model.bin").write_bytes(pickle.dumps(_Canary(canary)))
    (src / "adapter_model.safetensors").unlink()
    before = store.state()
    proc = version(store, src)
    assert proc.returncode == 2
    assert "adapter_model.bin: pickle-format file refused" in proc.stderr
    assert "adapter_model.safetensors: missing" in proc.stderr  # every problem at once
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not canary.exists()
    assert store.state() == before


def test_truncated_and_corrupt_safetensors_refused(store: Store, tmp_path: Path) -> None:
    truncated = make_adapter(tmp_path / "t")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    corrupt = make_adapter(tmp_path / "c")
    (corrupt / "adapter_model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "
    )
    renamed = make_adapter(tmp_path / "r")
    (renamed / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 a zip, not safetensors")
    before = store.state()
    for src, why in [(truncated, "truncated"), (corrupt, "not valid JSON"), (renamed, "exceeds")]:
        proc = version_here(store, src)
        assert proc.returncode == 2, proc.stderr
        assert why in proc.stderr
    assert store.state() == before


def test_bad_config_reported_with_weights_problem(store: Store, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "out")
    (src / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING", "r": 0}')
    proc = version(store, src)
    assert proc.returncode == 2
    assert "peft_type" in proc.stderr and "r (LoRA rank)" in proc.stderr


def test_bad_input_exits_2_and_changes_nothing(store: Store, tmp_path: Path) -> None:
    src = make_adapter(tmp_path / "out")
    before = store.state()
    cases = [
        (version(store, src, 1, "no_such_model"), "unknown model 'no_such_model'"),
        (version_here(store, tmp_path / "missing"), "is not a directory"),
        (version_here(store, src, 0), "cycle must be a positive integer"),
        (version_here(store, src, 1, "../etc"), "invalid model name"),
        (
            run_script_here(
                "version.py",
                "--model",
                "gemma_4b",
                "--cycle",
                "x",
                "--src",
                str(src),
                params=store.params,
            ),
            "invalid int value",
        ),
        (
            version_here(store, src, 1, "gemma_4b", "--metrics", str(tmp_path / "nope.json")),
            "nope.json",
        ),
    ]
    for proc, message in cases:
        assert proc.returncode == 2, (message, proc.stderr)
        assert message in proc.stderr
    assert store.state() == before


def test_dvc_pull_in_fresh_clone_restores_every_version(store: Store, tmp_path: Path) -> None:
    ids = [
        json.loads(version(store, make_adapter(tmp_path / f"a{i}", seed=i), i).stdout)["version_id"]
        for i in (1, 2)
    ]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(store.repo), str(clone)], check=True)
    assert not (clone / "adapters" / "gemma_4b" / ids[0]).exists()
    dvc(clone, "pull", "-q")
    for vid in ids:
        for name in ("adapter_config.json", "adapter_model.safetensors", "training_metrics.json"):
            original = store.adapters / "gemma_4b" / vid / name
            restored = clone / "adapters" / "gemma_4b" / vid / name
            assert restored.read_bytes() == original.read_bytes()


def test_gto_show_reads_the_tags(store: Store, tmp_path: Path) -> None:
    vid = json.loads(version(store, make_adapter(tmp_path / "a"), 1).stdout)["version_id"]
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "gto"),
            "show",
            "gemma_4b",
            "--json",
            "-r",
            str(store.repo),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    shown = json.loads(proc.stdout)
    assert any(v["version"] == "v1.0.0" for v in shown), shown
    assert vid in store.git("tag", "-l", "--format=%(contents)", "gemma_4b@v1.0.0")


def test_make_version_passes_values_as_single_arguments(store: Store, tmp_path: Path) -> None:
    """A SRC with spaces and shell syntax stays one path and never runs as code."""
    pwned = tmp_path / "PWNED"
    src = make_adapter(tmp_path / f"my adapter $(touch {pwned}) ; echo x")
    proc = subprocess.run(
        [
            "make",
            "-s",
            "version",
            "MODEL=gemma_4b",
            "CYCLE=1",
            f"SRC={src}",
            f"PARAMS={store.params}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "versioned cycle1_" in proc.stdout
    assert not pwned.exists()


def test_training_metrics_are_checked_and_absence_is_recorded(store: Store, tmp_path: Path):
    src = make_adapter(tmp_path / "no-metrics", seed=7)
    (src / "training_metrics.json").unlink()
    proc = run_script(
        "version.py", "--model", "gemma_4b", "--cycle", "1", "--src", str(src), params=store.params
    )
    assert proc.returncode == 0, proc.stderr
    assert "training metrics: none" in proc.stdout
    entry = store.manifest()["versions"]["gemma_4b"][-1]
    assert "training_metrics" not in entry and "training_metrics.json" not in entry["files"]
    partial = make_adapter(tmp_path / "partial", seed=8)
    (partial / "training_metrics.json").write_text(json.dumps({"final_loss": 0.3}))
    args = ("--model", "gemma_4b", "--cycle", "2", "--src", str(partial), "--json")
    proc = run_script("version.py", *args, params=store.params)
    assert json.loads(proc.stdout)["metrics_missing"] == ["eval_wer", "epochs", "data_hours"]
    bad = make_adapter(tmp_path / "bad", seed=9)
    (bad / "training_metrics.json").write_text(json.dumps({"final_loss": -1, "epochs": "3"}))
    before = store.state()
    args = ("--model", "gemma_4b", "--cycle", "3", "--src", str(bad))
    proc = run_script("version.py", *args, params=store.params)
    assert proc.returncode == 2 and "final_loss=-1, epochs='3'" in proc.stderr
    assert store.state() == before
