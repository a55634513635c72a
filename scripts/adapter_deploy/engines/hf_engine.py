"""transformers + PEFT engine: CPU here, CUDA where present.

`HFEngine(adapter_path, base_model=None)` serves either a PEFT adapter dir on its base model
(adapter_config.json's base_model_name_or_path unless `base_model` is given) or a merged model
dir (config.json, no adapter_config.json). `reload()` of a PEFT adapter loads it beside the
serving one on the same base, checks every tensor landed, then switches and drops the old one;
a merged model is loaded whole and swapped. A failed reload leaves the old release serving.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.base import (
    Translation,
    finish_reason,
    prompt_text,
    token_budget,
)
from adapter_deploy.engines.peft_swap import PeftSwapEngine

log = logging.getLogger(__name__)

# PEFT calls a transformers API deprecated in v5 on every load; the warning says nothing about
# the release being served and would clutter the service's stderr.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load_causal_lm(path: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars would clutter the service's stderr
    quantized = _quantization_kwargs(path, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto", use_safetensors=True, **quantized
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises OSError/ValueError/... for a bad dir
        raise AdapterError(
            f"cannot load model {path} ({err})", fix="pass --base-model with a local model dir"
        ) from err
    if quantized:  # bitsandbytes placed it on the device already; .to() is refused
        return model.eval(), tokenizer
    return model.to(device).eval(), tokenizer


def _quantization_kwargs(path: str, device: str) -> dict[str, Any]:
    """Load-time quantization a converted release asks for (quantization.json), CUDA only."""
    from adapter_deploy.engines.quantization import bnb_config, read_quantization

    spec = read_quantization(path) if Path(path).is_dir() else None
    if spec is None:
        return {}
    if not device.startswith("cuda"):
        log.info("%s asks for bitsandbytes 4-bit; no CUDA here, loading it unquantized", path)
        return {}
    return {"quantization_config": bnb_config(spec), "device_map": device}


class HFEngine(PeftSwapEngine):
    """Translate with transformers (+ PEFT); swap adapters without reloading the base."""

    def __init__(
        self,
        adapter_path: str | Path | None = None,
        base_model: str | Path | None = None,
        device: str | None = None,
    ) -> None:
        self.tokenizer: Any = None
        self._start(adapter_path, base_model, _device(device))

    def translate(self, text: str, max_new_tokens: int | None = None) -> Translation:
        import torch

        with self._lock:
            start = time.perf_counter()
            prompt = prompt_text(self.tokenizer, text)
            ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            ids = ids.to(self.device)
            n_text = len(self.tokenizer.encode(text, add_special_tokens=False))
            budget = token_budget(n_text, max_new_tokens)
            with torch.no_grad():
                out = self.model.generate(**ids, max_new_tokens=budget, do_sample=False)
            new = out[0, ids["input_ids"].shape[1] :]
            answer = self.tokenizer.decode(new, skip_special_tokens=True).strip()
            ended = finish_reason(new.tolist(), budget, self._stop_ids())
            return Translation(answer, time.perf_counter() - start, ended)

    def _stop_ids(self) -> set[int]:
        """The token ids generate() stops on: the generation config's and the tokenizer's EOS."""
        config = getattr(self.model, "generation_config", None)
        ids = getattr(config, "eos_token_id", None)
        ids = set(ids) if isinstance(ids, list) else {ids}
        return {i for i in (*ids, self.tokenizer.eos_token_id) if isinstance(i, int)}

    def _load_base(self, name_or_path: str) -> tuple[Any, Any]:
        return _load_causal_lm(name_or_path, self.device)

    def _serve(self, model: Any, companion: Any) -> None:
        self.model, self.tokenizer = model, companion
