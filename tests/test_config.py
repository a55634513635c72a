"""params.yaml loading and validation (adapter_deploy.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from adapter_deploy.common.errors import ConfigError, UsageError
from adapter_deploy.config import check_name, load_params
from fixtures_repo import ROOT, run_script


def test_shipped_params_file_is_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert {"whisper", "gemma_4b", "gemma_12b"} <= set(params.models)
    assert params.endpoints["mac-dev"].reload_method == "sigusr1"
    assert params.adapters_dir == ROOT / "adapters"


def test_every_problem_reported_at_once_with_key_paths(tmp_path: Path) -> None:
    bad = {
        "models": {"gemma_4b": {"task": "poetry", "base_model": "x", "colour": "red"}},
        "release": {"keep": "many"},
        "endpoints": {"mac": {"adapter_dir": "/a", "reload_method": "reboot"}},
        "surprise": 1,
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    text = info.value.one_line()
    for where in (
        "models.gemma_4b.task",
        "models.gemma_4b.colour: unknown key",
        "release.keep",
        "endpoints.mac.reload_method",
        "surprise: unknown key",
    ):
        assert where in text
    assert "\n" not in text


def test_missing_and_unparseable_params(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "broken.yaml")


def test_params_env_var_and_relative_paths(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "other.yaml"
    path.write_text(
        yaml.safe_dump(
            {"store": {"adapters_dir": "elsewhere/adapters"}, "models": {"m1": {"base_model": "b"}}}
        )
    )
    monkeypatch.setenv("PARAMS", str(path))
    params = load_params()
    assert params.source == path
    # Relative paths belong to the params file's checkout, wherever the command runs.
    assert params.adapters_dir == tmp_path / "elsewhere" / "adapters"


def test_params_found_from_a_subdirectory_never_from_the_package(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("PARAMS", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"models": {"m1": {"base_model": "b"}}}))
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")
    params = load_params()
    assert params.source == tmp_path / "params.yaml"
    assert params.adapters_dir == tmp_path / "adapters"
    monkeypatch.chdir("/")
    with pytest.raises(ConfigError, match="not found") as info:
        load_params()
    assert "--params" in info.value.one_line()


def test_names_are_checked_against_an_allowlist() -> None:
    for good in ("gemma_4b", "mac-dev", "church-rtx2070-1"):
        assert check_name("endpoint", good) == good
    for bad in ("../x", "a b", "x;rm", "", "-flag", "a/b", "x" * 65):
        with pytest.raises(UsageError):
            check_name("endpoint", bad)


def test_unknown_model_names_the_known_ones() -> None:
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(UsageError, match="known: gemma_12b, gemma_4b, whisper"):
        params.model("gemma_7b")


def test_bad_params_file_is_exit_2_one_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("models: {m: {base_model: b, extra: 1}}\n")
    proc = run_script("versions.py", params=path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "models.m.extra: unknown key" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
