"""llama.cpp engine (llama-cpp-python) for GGUF releases on NVIDIA and CPU endpoints.

A GGUF release dir holds one `model.gguf`: the merged model with its tokenizer and chat
template inside. The prompt is rendered from that embedded template (the same template the
transformers engines use), generation is greedy, and a reload loads the new file beside the
serving one before switching, so a file that does not load leaves the old release serving.
Layers are offloaded to the GPU where llama.cpp was built with CUDA (n_gpu_layers=-1 is a
no-op on a CPU build).
"""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError
from adapter_deploy.engines.base import (
    LoadedRelease,
    SwappingEngine,
    Translation,
    chat_messages,
    describe_release,
    generation_budget,
)

N_CTX = 2048
TOOLS_HINT = "GGUF releases need llama.cpp's tools (llama-cpp-python, gguf): not installed"


def gguf_file(release_dir: Path) -> Path:
    files = sorted(release_dir.glob("*.gguf"))
    if len(files) != 1:
        raise AdapterError(
            f"{release_dir} holds {len(files)} .gguf files, not one",
            fix="deploy the converted release as `make convert` wrote it",
        )
    return files[0]


def _open(path: Path, n_gpu_layers: int) -> Any:
    if importlib.util.find_spec("llama_cpp") is None:
        raise AdapterError(TOOLS_HINT, fix="run `make gguf-tools` there (make bootstrap does)")
    from llama_cpp import Llama

    try:
        return Llama(
            model_path=str(path), n_ctx=N_CTX, n_gpu_layers=n_gpu_layers, seed=0, verbose=False
        )
    except Exception as err:  # llama-cpp-python raises ValueError/RuntimeError for a bad file
        raise AdapterError(
            f"llama.cpp cannot load {path} ({err})", fix="convert and deploy the release again"
        ) from err


def _prompt_formatter(llm: Any, path: Path) -> Any:
    """The GGUF's own chat template, rendered the way llama-cpp-python renders chat."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise AdapterError(f"{path} has no chat template", fix="convert the release again")

    def token_text(key: str) -> str:
        token_id = llm.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None:
            return ""
        return llm.detokenize([int(token_id)], special=True).decode("utf-8", "replace")

    return Jinja2ChatFormatter(template, eos_token=token_text("eos"), bos_token=token_text("bos"))


class LlamaCppEngine(SwappingEngine):
    """Translate with llama.cpp from a GGUF release; reload swaps the whole model."""

    def __init__(self, release_path: str | Path, n_gpu_layers: int = -1) -> None:
        self.n_gpu_layers = n_gpu_layers  # -1: every layer on the GPU where there is one
        self._lock = threading.RLock()
        self._loaded: LoadedRelease | None = None
        self.llm: Any = None
        self._format: Any = None
        self._load(describe_release(release_path))

    @property
    def loaded(self) -> LoadedRelease | None:
        return self._loaded

    def _load(self, release: LoadedRelease) -> None:
        path = gguf_file(Path(release.path))
        llm = _open(path, self.n_gpu_layers)
        formatter = _prompt_formatter(llm, path)
        old = self.llm
        self.llm, self._format, self._loaded = llm, formatter, release
        if old is not None:
            old.close()

    def translate(self, text: str) -> Translation:
        with self._lock:
            start = time.perf_counter()
            prompt = self._format(messages=chat_messages(text)).prompt
            tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
            n_text = len(self.llm.tokenize(text.encode(), add_bos=False, special=False))
            out = self.llm.create_completion(
                tokens,
                max_tokens=generation_budget(n_text),
                temperature=0.0,
                top_k=1,
                top_p=1.0,
                min_p=0.0,
                repeat_penalty=1.0,
            )
            answer = out["choices"][0]["text"].strip()
            return Translation(answer, time.perf_counter() - start)
