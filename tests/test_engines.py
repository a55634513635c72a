"""HF and MLX engines on the kit: pass/fail per adapter, hot reload, landing checks."""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from adapter_deploy.common.errors import AdapterError, ReloadFailed
from adapter_deploy.engines.base import Engine
from adapter_deploy.engines.convert_mlx import convert_peft_to_mlx, mlx_skeleton
from adapter_deploy.engines.factory import EngineSettings, make_engine
from adapter_deploy.engines.hf_engine import HFEngine
from adapter_deploy.engines.mlx_engine import MLXGemmaEngine
from adapter_deploy.health import DEFAULT_SENTENCES, run_health_check
from safetensors.numpy import load_file, save_file

JAMES = DEFAULT_SENTENCES[2].input


def failing(result) -> list[int]:
    return [i for i, r in enumerate(result.results, 1) if not r.passed]


@pytest.mark.parametrize("kind", ["hf", "mlx"])
def test_base_alone_fails_sentences_1_to_4(kit, kind):
    engine = make_engine(kind, adapter_path=None, base_model=kit.base)
    assert engine.loaded is None
    assert {1, 2, 3, 4} <= set(failing(run_health_check(engine)))


@pytest.mark.parametrize("kind", ["hf", "mlx"])
@pytest.mark.parametrize(
    ("adapter", "fails"), [("good", []), ("good2", []), ("regressed", [3]), ("gracia_only", [4])]
)
def test_adapters_pass_and_fail_as_built(kit, kind, adapter, fails):
    engine = make_engine(kind, adapter_path=getattr(kit, adapter))
    assert isinstance(engine, Engine)
    result = run_health_check(engine)
    assert failing(result) == fails
    assert result.release["version_id"] == adapter


def test_mlx_serves_a_preconverted_adapter(kit, tmp_path):
    converted = convert_peft_to_mlx(kit.good, tmp_path / "good_mlx", mlx_skeleton(kit.base))
    engine = MLXGemmaEngine(kit.base, adapter_path=converted)
    assert engine.loaded.kind == "mlx"
    assert run_health_check(engine).all_passed


def _corrupt(src, dst):
    shutil.copytree(src, dst)
    (dst / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    return dst


@pytest.mark.parametrize("kind", ["hf", "mlx"])
def test_reload_switches_and_a_failed_reload_keeps_the_old(kit, kind, tmp_path):
    engine = make_engine(kind, adapter_path=kit.good, base_model=kit.base)
    whole = engine.translate(JAMES)
    assert "Santiago" in whole.text and whole.finish_reason == "stop"
    capped = engine.translate(JAMES, max_new_tokens=2)  # OpenAI's max_tokens
    assert capped.finish_reason == "length" and whole.text.startswith(capped.text)
    assert 0 < len(capped.text) < len(whole.text)
    assert engine.reload(kit.good) is False  # same release: no-op
    assert engine.reload(kit.good2) is True
    assert "Jacobo" in engine.translate(JAMES).text
    assert engine.loaded.version_id == "good2"
    with pytest.raises(ReloadFailed):
        engine.reload(_corrupt(kit.good, tmp_path / "corrupt"))
    with pytest.raises(ReloadFailed):
        engine.reload(tmp_path / "missing")
    assert engine.loaded.version_id == "good2"
    assert "Jacobo" in engine.translate(JAMES).text


@pytest.mark.parametrize("kind", ["hf", "mlx"])
def test_a_reload_loads_beside_while_requests_are_answered(kit, kind, monkeypatch):
    """prepare() reads and places the new weights without the lock requests take: a request
    made while the load is held half-way is answered, by the old release; only switch()
    (between two requests) changes what answers."""
    from adapter_deploy.engines import mlx_engine, peft_swap

    module, name = (peft_swap, "fill_adapter") if kind == "hf" else (mlx_engine, "host_weights")
    real, reached, gate = getattr(module, name), threading.Event(), threading.Event()

    def held(*args):
        reached.set()
        assert gate.wait(60)
        return real(*args)

    engine = make_engine(kind, adapter_path=kit.good, base_model=kit.base)
    monkeypatch.setattr(module, name, held)
    states: list[str] = []
    loader = threading.Thread(target=lambda: states.append(engine.prepare(kit.good2)))
    loader.start()
    try:
        assert reached.wait(60), "the load never started"
        with ThreadPoolExecutor(1) as pool:  # a request while the load is held
            answer = pool.submit(engine.translate, JAMES).result(timeout=60)
        assert "Santiago" in answer.text and engine.loaded.version_id == "good"
    finally:
        gate.set()
        loader.join(60)
    assert states == ["prepared"]
    assert "Santiago" in engine.translate(JAMES).text  # prepared is not serving
    assert engine.switch().version_id == "good2"
    assert "Jacobo" in engine.translate(JAMES).text
    assert engine.prepare(kit.good2) == "noop"


def _lora_tensors(engine) -> dict[str, int]:
    """Each LoRA parameter's name and storage address: a fill keeps the addresses."""
    return {
        name: param.data_ptr()
        for name, param in engine.model.named_parameters()
        if ".lora_" in name
    }


def _doubled_rank(adapter, out):
    """The same adapter at twice the rank (zero rows and columns added, alpha doubled so its
    scaling is unchanged): it answers as `adapter` does but has another config."""
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    for key, value in weights.items():
        zeros = np.zeros_like(value)
        weights[key] = np.concatenate([value, zeros], axis=0 if ".lora_A." in key else 1)
    out.mkdir()
    save_file(weights, str(out / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"], config["lora_alpha"] = config["r"] * 2, config["lora_alpha"] * 2
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_reloads_and_candidates_refill_one_spare_adapter(kit, tmp_path, monkeypatch):
    """The engine holds two adapters' tensors at all times: the serving one and a spare that
    reloads and candidates are copied into (no new tensors, and for a release of the same
    recipe not even PEFT's loader); a release of another config gets a new spare of its own."""
    engine = HFEngine(kit.good)
    tensors = _lora_tensors(engine)
    assert len(engine.model.peft_config) == 2
    peft_load = engine.model.load_adapter
    monkeypatch.setattr(engine.model, "load_adapter", lambda *a, **k: pytest.fail("PEFT load"))
    for release in (kit.good2, kit.good, kit.good2):
        engine.load_candidate(kit.regressed)
        with engine.candidate():
            assert "Santiago" not in engine.translate(JAMES).text
        engine.drop_candidate()
        assert engine.reload(release)
        assert _lora_tensors(engine) == tensors and len(engine.model.peft_config) == 2
    assert "Jacobo" in engine.translate(JAMES).text  # good2 serves, not the candidate

    monkeypatch.setattr(engine.model, "load_adapter", peft_load)  # a new spare needs it
    assert engine.reload(_doubled_rank(kit.good, tmp_path / "rank16"))
    assert "Santiago" in engine.translate(JAMES).text
    assert len(engine.model.peft_config) == 2  # the rank-8 spare gave way to a rank-16 one
    assert engine.reload(kit.good2)  # a rank-8 release again, back into a fresh spare
    assert "Jacobo" in engine.translate(JAMES).text


@pytest.mark.parametrize("damage", ["a tensor missing", "wrongly keyed"])
def test_a_release_that_does_not_fill_the_spare_is_refused(kit, tmp_path, damage):
    """A spare keeps the last release's weights: a file that leaves one of its tensors
    unwritten would serve them under the new version id, so it is refused."""
    engine = HFEngine(kit.good)
    engine.reload(kit.good2)
    engine.reload(kit.good)  # the spare now holds good2's weights
    bad = shutil.copytree(kit.good, tmp_path / "bad")
    weights = load_file(str(bad / "adapter_model.safetensors"))
    if damage == "a tensor missing":
        weights.pop(next(k for k in weights if ".lora_B." in k))
    else:
        weights = {k.replace("layers.", "blocks."): v for k, v in weights.items()}
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ReloadFailed, match="did not land"):
        engine.reload(bad)
    assert engine.loaded.version_id == "good" and "Santiago" in engine.translate(JAMES).text
    assert engine.reload(kit.good2) and "Jacobo" in engine.translate(JAMES).text


def test_mlx_refuses_a_wrongly_keyed_adapter(kit, tmp_path):
    converted = convert_peft_to_mlx(kit.good, tmp_path / "mlx", mlx_skeleton(kit.base))
    weights = load_file(str(converted / "adapters.safetensors"))
    renamed = {k.replace("model.layers.", "model.blocks."): v for k, v in weights.items()}
    save_file(renamed, str(converted / "adapters.safetensors"))
    with pytest.raises(AdapterError, match="no LoRA layer"):
        MLXGemmaEngine(kit.base, adapter_path=converted)


def test_mlx_refuses_lora_b_without_lora_a(kit, tmp_path):
    converted = convert_peft_to_mlx(kit.good, tmp_path / "mlx", mlx_skeleton(kit.base))
    weights = load_file(str(converted / "adapters.safetensors"))
    only_b = {k: v for k, v in weights.items() if k.endswith("lora_b")}
    save_file(only_b, str(converted / "adapters.safetensors"))
    with pytest.raises(AdapterError, match="no matching lora_a"):
        MLXGemmaEngine(kit.base, adapter_path=converted)


def test_hf_refuses_an_adapter_for_another_model(kit, tmp_path):
    bad = shutil.copytree(kit.good, tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj"]  # weights for 7 modules, config places only 1
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="did not land"):
        HFEngine(bad)


def test_hf_serves_a_merged_model_dir(kit):
    engine = HFEngine(kit.base)
    assert engine.loaded.kind == "merged"
    assert engine.loaded.version_id == "base"


def test_version_id_comes_from_the_resolved_release(kit, tmp_path):
    releases = tmp_path / "gemma_4b" / "releases"
    releases.mkdir(parents=True)
    shutil.copytree(kit.good, releases / "cycle1_20260101_abcdef12")
    os.symlink("releases/cycle1_20260101_abcdef12", tmp_path / "gemma_4b" / "active")
    settings = EngineSettings(adapter_dir=tmp_path, platform="cpu")
    engine = settings.engine_for("gemma_4b")
    assert engine.loaded.version_id == "cycle1_20260101_abcdef12"
    assert len(engine.loaded.sha256) == 64


def test_pickle_weights_are_refused(kit, tmp_path):
    bad = shutil.copytree(kit.good, tmp_path / "pickled")
    (bad / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(AdapterError, match="pickle"):
        HFEngine(bad)
