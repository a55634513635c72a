"""The benchmarks' stand-in (kit/standin.py): a base plus two PEFT adapters of a chosen size.

Built here at a small width (the benchmarks use hidden 1024, about 380 MB), so the test stays
a few seconds: the same code path, the same checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from adapter_deploy.kit.standin import build_standin
from safetensors.torch import load_file

ADAPTER_MB = 2.0


# Building the small stand-in takes ~5 s on 2 cores; a hang fails well inside a test run.
@pytest.mark.timeout(120)
def test_standin_adapters_are_peft_adapters_of_the_asked_size(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths = build_standin(tmp_path / "standin", adapter_mb=ADAPTER_MB, hidden_size=128)
    first, second = paths.adapters
    for adapter in paths.adapters:
        size = (adapter / "adapter_model.safetensors").stat().st_size
        assert abs(size - ADAPTER_MB * 1e6) <= 0.2 * ADAPTER_MB * 1e6, size
        assert not (adapter / "README.md").exists()
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"

    base = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(first))
    saved = load_file(str(first / "adapter_model.safetensors"))
    assert len(saved) > 0 and all("lora_" in name for name in saved)
    state = model.state_dict()
    landed = [k for k in saved if k.replace(".weight", ".default.weight") in state]
    assert len(landed) == len(saved)

    other = load_file(str(second / "adapter_model.safetensors"))
    assert saved.keys() == other.keys()
    b_names = [name for name in saved if ".lora_B." in name]
    assert all(saved[name].abs().sum() > 0 for name in b_names)  # the adapter moves the output
    assert any(not torch.equal(saved[name], other[name]) for name in b_names)

    built = (first / "adapter_model.safetensors").stat().st_mtime_ns
    assert build_standin(tmp_path / "standin", adapter_mb=ADAPTER_MB, hidden_size=128) == paths
    assert (first / "adapter_model.safetensors").stat().st_mtime_ns == built  # reused
