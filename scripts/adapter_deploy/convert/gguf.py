"""Merged transformers model dir -> one GGUF file for llama.cpp endpoints.

Two steps, both run with llama.cpp's own tools at the pinned version (nothing of llama.cpp is
copied into this project):
    F16     llama.cpp's converter, `convert_hf_to_gguf.py --outtype f16`, run as a subprocess
            with this project's python from the source tree `make gguf-tools` extracts from the
            llama-cpp-python sdist (LLAMA_CPP_VERSION) into
            ~/.cache/adapter-deploy/llama.cpp-<version>/ ($ADAPTER_DEPLOY_LLAMA_CPP puts
            it elsewhere; the same pins hold there). The converter writes the tokenizer as
            llama.cpp reads Gemma's: SentencePiece (`tokenizer.model`), its special tokens,
            chat template and hparams.
            Gemma 3 text-only (Gemma3ForCausalLM) or the multimodal TranslateGemma layout
            (Gemma3ForConditionalGeneration), whose language model is written and whose
            vision tower is left out (llama.cpp keeps vision in a separate mmproj file, and
            translation needs none)
    Q8_0, Q4_K_M
            the F16 file requantized by llama.cpp's `llama_model_quantize` (llama-cpp-python)

The converter reads the merged dir through a staging dir of links: transformers 5 saves a
tokenizer_config.json without `added_tokens_decoder`, the field the converter types Gemma's
special tokens (`<start_of_turn>` ...) from, so the staged copy gets it back from the dir's own
tokenizer.json (the same list transformers loads); the merged dir itself is never changed.

Only safetensors are read. K-quants (Q4_K_M) need tensor rows in multiples of 256; llama.cpp
falls back to a legacy quant type for narrower tensors, so tiny models still convert. The
converter's version (llama-cpp-python release, llama.cpp commit, gguf-py version) is part of
the conversion key (`tool_versions()`), so a new converter reconverts.

The converter tree lies in a user-writable cache, so it runs only as the bytes this repository
pins (`converter_tree`: the sdist's sha256 and the sha256 of the tree's file list): every run
is from a private copy of files checked as they were read, and a changed or planted tree is
refused before anything of it runs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from adapter_deploy.common.errors import AdapterDeployError, AdapterError
from adapter_deploy.convert import converter_tree
from adapter_deploy.convert.converter_tree import CONVERTER_INFO, LLAMA_CPP_VERSION
from adapter_deploy.engines.base import read_json
from adapter_deploy.engines.llamacpp_engine import TOOLS_HINT

log = logging.getLogger(__name__)

GGUF_TYPES = ("Q4_K_M", "Q8_0", "F16")
DEFAULT_GGUF_TYPE = "Q4_K_M"
GGUF_FILE = "model.gguf"
CONVERTER_ENV = "ADAPTER_DEPLOY_LLAMA_CPP"  # the pinned converter tree elsewhere than the cache
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
SENTENCEPIECE_MODEL = "tokenizer.model"
LLAMA_CPP_GEMMA3_SWA_PATTERN = 6  # every 6th layer full attention (see layer_pattern_mismatch)
CONVERT_TIMEOUT_S = 3600
# What this project serves as GGUF: Gemma 3, text-only or the multimodal TranslateGemma layout.
_MODEL_TYPES = ("gemma3_text", "gemma3")
_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
_INSTALL_FIX = f"run `make gguf-tools` (with {CONVERTER_ENV} set, it extracts there)"


def converter_dir() -> Path:
    """The llama.cpp source tree the converter runs from (see the module docstring)."""
    named = os.environ.get(CONVERTER_ENV)
    if named:
        return Path(named).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "adapter-deploy" / f"llama.cpp-{LLAMA_CPP_VERSION}"


def converter_info() -> dict[str, Any] | None:
    """The converter's version record, or None where no complete, pinned source tree is."""
    try:
        return _converter_record()
    except AdapterDeployError:
        return None


def _converter_record() -> dict[str, Any]:
    """The checked tree's version record (without its file list); AdapterError where no tree
    is, TamperedTool where its files are not the pinned ones."""
    src = converter_dir()
    if not (src / CONVERTER_SCRIPT).is_file() or not (src / CONVERTER_INFO).is_file():
        raise AdapterError(
            f"llama.cpp's GGUF converter ({CONVERTER_SCRIPT}, llama-cpp-python "
            f"{LLAMA_CPP_VERSION}) is not in {src}",
            fix=_INSTALL_FIX + ", or use format merged",
        )
    record = converter_tree.verify(src)
    info = {k: v for k, v in record.items() if k != "files"}
    try:
        project = tomllib.loads((src / "gguf-py" / "pyproject.toml").read_text())
        info["gguf-py"] = project["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        info["gguf-py"] = None
    return info


def tools_available(gguf_type: str = DEFAULT_GGUF_TYPE) -> bool:
    """The converter's source tree always; llama-cpp-python only to requantize."""
    if converter_info() is None:
        return False
    return gguf_type == "F16" or importlib.util.find_spec("llama_cpp") is not None


def check_tools(gguf_type: str = DEFAULT_GGUF_TYPE) -> None:
    """Raise with the fix where the tools `gguf_type` needs are missing or not the pinned ones."""
    _converter_record()
    if gguf_type != "F16" and importlib.util.find_spec("llama_cpp") is None:
        raise AdapterError(TOOLS_HINT, fix="run `make gguf-tools`, or use format merged")


def tool_versions() -> dict[str, Any]:
    """The converter's and the quantizer's versions: part of a gguf conversion's key."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        quantizer = version("llama-cpp-python")
    except PackageNotFoundError:
        quantizer = None
    return {"llama-cpp-python": quantizer, "gguf_converter": converter_info()}


def convert_to_gguf(
    merged_dir: str | Path, out_dir: str | Path, gguf_type: str = DEFAULT_GGUF_TYPE
) -> Path:
    """Write `out_dir/model.gguf` of type `gguf_type` from a merged model dir; return its path."""
    if gguf_type not in GGUF_TYPES:
        raise AdapterError(f"unknown GGUF type {gguf_type!r}", fix="use " + ", ".join(GGUF_TYPES))
    # Absolute before anything: the converter runs in a temporary working directory.
    merged_dir, out_dir = Path(merged_dir).resolve(), Path(out_dir).resolve()
    check_supported(merged_dir)
    check_tools(gguf_type)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / GGUF_FILE
    if gguf_type == "F16":
        return write_f16(merged_dir, target)
    f16 = out_dir / ".model-f16.gguf"
    try:
        write_f16(merged_dir, f16)
        quantize(f16, target, gguf_type)
    finally:
        f16.unlink(missing_ok=True)
    return target


def check_supported(model_dir: Path) -> None:
    """Refuse what this project does not serve as GGUF, before the converter runs."""
    config = read_json(model_dir / "config.json")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in _MODEL_TYPES or not set(archs) & set(_ARCHITECTURES):
        raise AdapterError(
            f"{model_dir}: gguf conversion does not support model_type {model_type!r} "
            f"({', '.join(archs) or 'no architectures'})",
            fix="gguf conversion supports Gemma 3 models (" + ", ".join(_ARCHITECTURES) + "); "
            "use format merged",
        )
    if not (model_dir / SENTENCEPIECE_MODEL).is_file():
        raise AdapterError(
            f"{model_dir} has no {SENTENCEPIECE_MODEL} (Gemma's SentencePiece model, which "
            "llama.cpp's converter reads)",
            fix="merge again from a base model that ships tokenizer.model",
        )
    if not any(model_dir.glob("*.safetensors")):
        raise AdapterError(f"{model_dir} holds no safetensors weights", fix="merge it again")
    mismatch = layer_pattern_mismatch(config)
    if mismatch:
        log.warning("%s: %s; llama.cpp will not attend as transformers does", model_dir, mismatch)


def layer_pattern_mismatch(config: dict[str, Any]) -> str | None:
    """How a config's sliding/full layers differ from the ones llama.cpp gives a Gemma 3 GGUF.

    llama.cpp's converter writes no per-layer pattern for Gemma 3, so llama.cpp assumes
    Gemma 3's own: every 6th layer full attention, the other five sliding (global rope base on
    the full layers, the local one on the sliding). Hub checkpoints have exactly that; a
    config with another pattern converts, but the GGUF runs a different model.
    """
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    layers = text.get("layer_types")
    if not isinstance(layers, list):
        return None
    assumed = [
        "full_attention" if (i + 1) % LLAMA_CPP_GEMMA3_SWA_PATTERN == 0 else "sliding_attention"
        for i in range(len(layers))
    ]
    if layers == assumed:
        return None
    return f"layer_types {layers} are not Gemma 3's 5 sliding : 1 full ({assumed})"


def write_f16(model_dir: Path, out_file: Path) -> Path:
    """The merged model as an F16 GGUF file, written by llama.cpp's own converter."""
    model_dir, out_file = model_dir.resolve(), out_file.resolve()
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=out_file.parent) as tmp:
        staged = _stage(model_dir, Path(tmp) / model_dir.name)
        run_converter(
            CONVERTER_SCRIPT,
            ["--outtype", "f16", "--outfile", out_file, staged],
            tool="llama.cpp's converter",
            source=model_dir,
            out_file=out_file,
            cwd=Path(tmp),
            fix=f"{_INSTALL_FIX} if its own imports failed, or use format merged",
        )
    return out_file


def run_converter(
    script: str,
    args: list[str | Path],
    tool: str,
    source: Path,
    out_file: Path,
    cwd: Path,
    fix: str,
) -> None:
    """Run one of llama.cpp's converter scripts on `source`, from a private copy of the pinned
    tree checked as it is made (TamperedTool, before anything runs, where a file differs):
    `out_file` exists after, or AdapterError with the converter's last lines. The Path
    arguments are made absolute first: the converter runs in `cwd`, not in ours."""
    args = [str(arg.resolve()) if isinstance(arg, Path) else arg for arg in args]
    out_file, cwd = out_file.resolve(), cwd.resolve()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the converter reads dirs, nothing else
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, never another one
    with converter_tree.verified_copy(converter_dir()) as src:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(src / "gguf-py"), os.environ.get("PYTHONPATH")) if p
        )
        cmd = [sys.executable, str(src / script), *args]
        log.debug("running %s", " ".join(cmd))
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=CONVERT_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as err:
            raise AdapterError(
                f"{tool} ran past {CONVERT_TIMEOUT_S}s on {source}",
                fix="check the machine's load and memory, then convert again",
            ) from err
    log.debug("%s output:\n%s", tool, proc.stderr)
    if proc.returncode != 0 or not out_file.is_file():
        out_file.unlink(missing_ok=True)
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise AdapterError(
            f"{tool} failed on {source} (exit {proc.returncode}): {tail}",
            fix=f"see the converter's reason above; {fix}",
        )


def _stage(model_dir: Path, staged: Path) -> Path:
    """`model_dir` as links, with tokenizer_config.json's `added_tokens_decoder` restored."""
    staged.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.name != "tokenizer_config.json":
            (staged / path.name).symlink_to(path.resolve())
    config = read_json(model_dir / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        added = read_json(model_dir / "tokenizer.json").get("added_tokens") or []
        config["added_tokens_decoder"] = {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        }
    (staged / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return staged


def quantize(src: Path, dst: Path, gguf_type: str) -> Path:
    """Requantize an F16 GGUF file with llama.cpp's own quantizer."""
    import llama_cpp

    quiet_llama_cpp()
    ftypes = {
        "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    }
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[gguf_type]
    params.nthread = max(1, (os.cpu_count() or 1))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise AdapterError(
            f"llama.cpp could not quantize {src.name} to {gguf_type} (code {rc})",
            fix="try --gguf-type F16 or Q8_0; see the log for llama.cpp's reason",
        )
    log.debug("quantized %s -> %s (%s)", src, dst, gguf_type)
    return dst


def quiet_llama_cpp() -> None:
    """llama.cpp logs every tensor it quantizes; keep its errors only, unless debugging."""
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """Architecture, file type and tensor count of a GGUF file (read with the gguf package)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else None
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"architecture": arch, "tensors": len(reader.tensors), "tensor_types": types}
