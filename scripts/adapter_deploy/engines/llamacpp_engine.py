"""llama.cpp engine (llama-cpp-python) for GGUF releases on NVIDIA and CPU endpoints.

A GGUF release dir holds one `model.gguf`: the merged model with its tokenizer and chat
template inside. A GGUF LoRA release (format gguf-lora) holds `adapter.gguf` and `base.json`,
which names the GGUF base release it applies to and its sha256 (convert/gguf_lora.py). The
base is hashed and compared with base.json before llama.cpp loads it (a file rewritten in its
place is refused, never loaded), and it is loaded once: a reload to another LoRA on the same
base swaps only the adapter on the loaded model (llama_adapter_lora_init +
llama_set_adapters_lora), the base stays in memory and no restart is needed; a LoRA that does
not load leaves the old one applied.

The prompt is rendered from the GGUF's embedded template (the same template the transformers
engines use), generation is greedy, and a reload loads the new file beside the serving one
before switching, so a file that does not load leaves the old release serving.
Layers are offloaded to the GPU where llama.cpp was built with CUDA (n_gpu_layers=-1 is a
no-op on a CPU build).

A staged gguf-lora release on the loaded base is checked beside the serving one (the service's
in-service pre-check): `load_candidate(path)` loads its LoRA against the loaded model (with the
serving lock held: a llama.cpp adapter is bound to its model, and a LoRA file is small),
`candidate()` makes it the context's one LoRA for the calls inside and puts the serving one
back after them, and `drop_candidate()` frees it.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterError
from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.engines.base import (
    LoadedRelease,
    NotBeside,
    SwappingEngine,
    Translation,
    chat_messages,
    describe_release,
    read_json,
    token_budget,
)

N_CTX = 2048
TOOLS_HINT = "GGUF releases need llama.cpp's tools (llama-cpp-python, gguf): not installed"
LORA_FILE = "adapter.gguf"  # a gguf-lora release: the LoRA ...
BASE_INFO = "base.json"  # ... and the base release it applies to
BASE_MODEL_SUFFIX = "-gguf-base"  # <adapter_dir>/<model>-gguf-base/releases/<id>/model.gguf
BASE_FILE = "model.gguf"
LORA_SCALE = 1.0  # PEFT's alpha / r is inside the LoRA file (adapter.lora.alpha)


def is_lora_release(release_dir: Path) -> bool:
    return (release_dir / BASE_INFO).is_file()


def base_gguf(release_dir: Path) -> Path:
    """The base GGUF a LoRA release names: on an endpoint the `<model>-gguf-base` release
    beside the model's releases; in the training side's conversion cache, the base entry
    beside the LoRA's."""
    info = read_json(release_dir / BASE_INFO)
    version_id, key = info.get("version_id"), info.get("key")
    model_dir = release_dir.parent.parent
    candidates = []
    if isinstance(version_id, str) and release_dir.parent.name == "releases":
        base_model = model_dir.parent / f"{model_dir.name}{BASE_MODEL_SUFFIX}"
        candidates.append(base_model / "releases" / Path(version_id).name / BASE_FILE)
    if isinstance(key, str):
        candidates.append(release_dir.parent / Path(key).name / BASE_FILE)
    size = info.get("size")
    for path in candidates:
        # The size is a cheap guard against another file in its place; the sha256 is
        # checked before the file is loaded (check_base).
        if path.is_file() and size in (None, path.stat().st_size):
            return path
    raise AdapterError(
        f"{release_dir}: the GGUF base it applies to ({version_id}) is not on this machine",
        fix="deploy the release again: a gguf-lora deploy sends its base before the pre-check",
    )


def base_sha256(release_dir: Path) -> str:
    """The sha256 of its base that a LoRA release's base.json records (signed with it)."""
    sha256 = read_json(release_dir / BASE_INFO).get("sha256")
    if not isinstance(sha256, str) or len(sha256) != 64:
        raise AdapterError(
            f"{release_dir / BASE_INFO} records no sha256 of its GGUF base",
            fix="convert and deploy the release again (make convert FORMAT=gguf-lora)",
        )
    return sha256


def check_base(release_dir: Path, base: Path) -> str:
    """Refuse a base GGUF whose contents are not the ones base.json records (a same-size
    rewrite passes the size guard): llama.cpp never loads it. Returns the sha256."""
    expected = base_sha256(release_dir)
    if sha256_file(base) != expected:
        raise AdapterError(
            f"{base}: the GGUF base is not the file {release_dir.name}/{BASE_INFO} records "
            f"(sha256 differs from {expected[:12]}...); llama.cpp did not load it",
            fix="deploy the release again to resend its base (or remove the damaged base "
            "release on the endpoint first)",
        )
    return expected


def gguf_file(release_dir: Path) -> Path:
    if is_lora_release(release_dir):
        return release_dir / LORA_FILE
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


def _apply_lora(llm: Any, lora: Path) -> Any:
    """Load `lora` against `llm`'s model and make it the one LoRA its context applies."""
    import llama_cpp

    adapter = _load_lora(llm, lora)
    try:
        _use_lora(llm, adapter)
    except AdapterError:
        llama_cpp.llama_adapter_lora_free(adapter)
        raise
    return adapter


def _load_lora(llm: Any, lora: Path) -> Any:
    """Load `lora` against `llm`'s model; nothing applies it yet."""
    import llama_cpp

    adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(lora).encode())
    if not adapter:
        raise AdapterError(
            f"llama.cpp cannot load the LoRA {lora} on its base",
            fix="convert and deploy the release again (its base must be the one it names)",
        )
    return adapter


def _use_lora(llm: Any, adapter: Any) -> None:
    """Make `adapter` the one LoRA `llm`'s context applies; its cached prompt state, computed
    under another LoRA, is never reused."""
    import ctypes

    import llama_cpp

    adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(LORA_SCALE)
    if llama_cpp.llama_set_adapters_lora(llm.ctx, adapters, 1, scales) != 0:
        raise AdapterError("llama.cpp cannot apply the LoRA", fix="deploy it again")
    llm.reset()


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
    """Translate with llama.cpp from a GGUF release; reload swaps the whole model, or only the
    LoRA where the new release is a LoRA on the base already loaded."""

    def __init__(self, release_path: str | Path, n_gpu_layers: int = -1) -> None:
        self.n_gpu_layers = n_gpu_layers  # -1: every layer on the GPU where there is one
        self._lock = threading.RLock()
        self._loaded: LoadedRelease | None = None
        self.llm: Any = None
        self._format: Any = None
        self.base_path: Path | None = None  # the base GGUF loaded, for a LoRA release
        self.base_sha256: str | None = None  # its contents, checked before it was loaded
        self._lora: Any = None  # the applied llama_adapter_lora_p
        self._candidate: tuple[Any, LoadedRelease] | None = None  # (its LoRA, its release)
        self._load(describe_release(release_path))

    @property
    def loaded(self) -> LoadedRelease | None:
        return self._loaded

    def _load(self, release: LoadedRelease) -> None:
        release_dir = Path(release.path)
        if not is_lora_release(release_dir):
            self._load_model(gguf_file(release_dir), release, None)
            return
        lora, base = release_dir / LORA_FILE, base_gguf(release_dir)
        lora_release = replace(release, kind="gguf-lora")
        same_base = self.llm is not None and self.base_path == base.resolve()
        if same_base and self.base_sha256 == base_sha256(release_dir):
            self._swap_lora(lora)  # the base in memory is the one this LoRA names
            self._loaded = lora_release
            return
        sha256 = check_base(release_dir, base)
        self._load_model(base, lora_release, lora)
        self.base_sha256 = sha256

    def _load_model(self, path: Path, release: LoadedRelease, lora: Path | None) -> None:
        """A fresh model (with its LoRA); what served is closed only once it has loaded."""
        llm = _open(path, self.n_gpu_layers)
        try:
            formatter = _prompt_formatter(llm, path)
            adapter = _apply_lora(llm, lora) if lora is not None else None
        except AdapterError:
            llm.close()
            raise
        old = self.llm
        self.llm, self._format, self._loaded = llm, formatter, release
        self._lora, self.base_path = adapter, path.resolve() if lora is not None else None
        self.base_sha256 = None
        if old is not None:
            old.close()  # its LoRA, if any, is freed with it

    def _swap_lora(self, lora: Path) -> None:
        """Apply `lora` in place of the current LoRA on the loaded base."""
        import llama_cpp

        adapter = _apply_lora(self.llm, lora)  # the cached prompt state is dropped there
        old, self._lora = self._lora, adapter
        if old is not None:
            llama_cpp.llama_adapter_lora_free(old)

    # --- a candidate beside the serving LoRA (the in-service pre-check) -------------------
    def candidate_refusal(self, adapter_path: str | Path) -> str | None:
        """Why the release cannot be checked beside the serving one (None: it can)."""
        release_dir = Path(adapter_path).resolve()
        if not is_lora_release(release_dir):
            return "a whole GGUF release needs its own model, not a LoRA on this one's base"
        if self._lora is None or self.base_path is None:
            return "this engine serves no LoRA on a base to load a candidate beside"
        base = base_gguf(release_dir)
        if base.resolve() != self.base_path or base_sha256(release_dir) != self.base_sha256:
            return "its base is not the base this engine has loaded"
        return None

    def load_candidate(self, adapter_path: str | Path) -> LoadedRelease:
        """Load the release's LoRA against the loaded base; it applies to nothing yet."""
        with self._lock:
            self.drop_candidate()
            why = self.candidate_refusal(adapter_path)
            release = replace(describe_release(adapter_path), kind="gguf-lora")
            if why:
                raise NotBeside(f"cannot check {release.version_id} in place: {why}")
            adapter = _load_lora(self.llm, Path(release.path) / LORA_FILE)
            self._candidate = (adapter, release)
            return release

    @contextmanager
    def candidate(self) -> Iterator[LoadedRelease]:
        """Apply the candidate's LoRA for the calls inside; the serving one is put back."""
        with self._lock:
            if self._candidate is None:
                raise AdapterError("no candidate is loaded", fix="load_candidate() first")
            adapter, release = self._candidate
            _use_lora(self.llm, adapter)
            try:
                yield release
            finally:
                _use_lora(self.llm, self._lora)

    def drop_candidate(self) -> None:
        """Free the candidate's LoRA (nothing when none is loaded)."""
        import llama_cpp

        with self._lock:
            if self._candidate is not None:
                adapter, _ = self._candidate
                self._candidate = None
                llama_cpp.llama_adapter_lora_free(adapter)

    def translate(self, text: str, max_new_tokens: int | None = None) -> Translation:
        with self._lock:
            start = time.perf_counter()
            prompt = self._format(messages=chat_messages(text)).prompt
            tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
            n_text = len(self.llm.tokenize(text.encode(), add_bos=False, special=False))
            out = self.llm.create_completion(
                tokens,
                max_tokens=token_budget(n_text, max_new_tokens),
                temperature=0.0,
                top_k=1,
                top_p=1.0,
                min_p=0.0,
                repeat_penalty=1.0,
            )
            choice = out["choices"][0]
            ended = "length" if choice.get("finish_reason") == "length" else "stop"
            return Translation(choice["text"].strip(), time.perf_counter() - start, ended)
