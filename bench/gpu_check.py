"""CUDA check of the NVIDIA release formats on the test kit (run where a GPU is present).

Usage:
    python bench/gpu_check.py [--kit DIR] [--json FILE] [--allow-cpu]

Merges kit.good and kit.regressed into their base (fp16), loads each the way an NVIDIA endpoint
would, and runs the 5-sentence health check:
    bitsandbytes  the merged weights loaded 4-bit nf4 (quantization.json) on CUDA
    merged        the same weights in fp16 on CUDA, for the memory and latency baseline
    adapter       base + PEFT adapter on CUDA, then a hot reload to kit.good2
The regressed adapter must fail the same check in 4-bit (the gate still discriminates).
Prints one table and writes the figures as JSON. Exits 3 when CUDA is absent, unless
--allow-cpu (then every load is unquantized: useful only to try the script itself).

With --gguf DIR it checks GGUF releases instead (every DIR/<name>/model.gguf, as `make
convert FORMAT=gguf` writes them) with the llama.cpp engine: all layers on the GPU, then all
on the CPU for the baseline; llama-cpp-python must be built with CUDA
(CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from adapter_deploy.convert.merge import merge_adapter, write_bnb_quantization
from adapter_deploy.engines.hf_engine import HFEngine
from adapter_deploy.health import run_health_check
from adapter_deploy.kit.gemma import build_kit

ROOT = Path(__file__).resolve().parents[1]


def count_4bit(model: Any) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def measure(label: str, make: Any) -> dict[str, Any]:
    """Load an engine with `make()`, health-check it, and collect the figures."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    engine = make()
    load_s = time.perf_counter() - start
    result = run_health_check(engine)
    row = {
        "release": label,
        "device": str(next(engine.model.parameters()).device),
        "linear_4bit": count_4bit(engine.model),
        "footprint_bytes": int(engine.model.get_memory_footprint()),
        "load_s": round(load_s, 3),
        "passed": result.all_passed,
        "p50_s": result.latency_p50,
        "failures": result.failures(),
        "outputs": [r.output for r in result.results],
    }
    if torch.cuda.is_available():
        row["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return {"row": row, "engine": engine}


def reload_figures(engine: HFEngine, target: Path) -> dict[str, Any]:
    start = time.perf_counter()
    engine.reload(target)
    reload_s = time.perf_counter() - start
    result = run_health_check(engine)
    return {"reload_s": round(reload_s, 3), "passed_after_reload": result.all_passed}


def run(kit_dir: Path, work: Path) -> dict[str, Any]:
    kit = build_kit(kit_dir)
    merged = merge_adapter(kit.good, kit.base, work / "merged")
    bnb_good = Path(shutil.copytree(merged, work / "bnb-good"))
    write_bnb_quantization(bnb_good)
    bnb_bad = merge_adapter(kit.regressed, kit.base, work / "bnb-regressed")
    write_bnb_quantization(bnb_bad)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for label, path in (
        ("bitsandbytes good", bnb_good),
        ("bitsandbytes regressed", bnb_bad),
        ("merged fp16 good", merged),
    ):
        rows.append(measure(label, lambda p=path: HFEngine(p, device=device))["row"])
    adapter = measure("adapter good (PEFT)", lambda: HFEngine(kit.good, kit.base, device=device))
    adapter["row"].update(reload_figures(adapter["engine"], kit.good2))
    rows.append(adapter["row"])
    return {
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "transformers": _version("transformers"),
        "rows": rows,
    }


def run_gguf(releases: Path) -> dict[str, Any]:
    import llama_cpp
    from adapter_deploy.engines.llamacpp_engine import LlamaCppEngine

    rows = []
    for release in sorted(p.parent for p in releases.glob("*/model.gguf")):
        for layers, where in ((-1, "gpu"), (0, "cpu")):
            start = time.perf_counter()
            engine = LlamaCppEngine(release, n_gpu_layers=layers)
            load_s = time.perf_counter() - start
            result = run_health_check(engine)
            rows.append(
                {
                    "release": f"{release.name} ({where})",
                    "load_s": round(load_s, 3),
                    "passed": result.all_passed,
                    "p50_s": result.latency_p50,
                    "failures": result.failures(),
                    "outputs": [r.output for r in result.results],
                }
            )
    return {
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "llama-cpp-python": _version("llama-cpp-python"),
        "rows": rows,
    }


def gguf_table(report: dict[str, Any]) -> str:
    title = (
        f"gpu: {report['gpu']}  llama-cpp-python {report['llama-cpp-python']}  "
        f"GPU offload built in: {report['gpu_offload']}"
    )
    columns = {"GGUF release": "release", "load s": "load_s", "health": "health", "p50 s": "p50_s"}
    return _markdown(title, columns, report["rows"])


def _markdown(title: str, columns: dict[str, str], rows: list[dict[str, Any]]) -> str:
    """`title`, then one table row per result: column header -> row key ("health" reads
    `passed`)."""
    lines = [title, "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = {**r, "health": "pass" if r["passed"] else "FAIL"}
        lines.append("| " + " | ".join(str(cells[k]) for k in columns.values()) + " |")
    return "\n".join(lines)


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def table(report: dict[str, Any]) -> str:
    title = (
        f"gpu: {report['gpu']}  torch {report['torch']}  bitsandbytes {report['bitsandbytes']}"
        f"  transformers {report['transformers']}"
    )
    columns = {
        "release": "release",
        "device": "device",
        "4-bit layers": "linear_4bit",
        "footprint KiB": "footprint_kib",
        "load s": "load_s",
        "health": "health",
        "p50 s": "p50_s",
    }
    rows = [{**r, "footprint_kib": f"{r['footprint_bytes'] / 1024:.0f}"} for r in report["rows"]]
    return _markdown(title, columns, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=ROOT / ".kit", help="test kit dir")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--allow-cpu", action="store_true", help="run unquantized without CUDA")
    parser.add_argument("--gguf", type=Path, help="check the GGUF releases in this dir instead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device here; run it on an NVIDIA machine", file=sys.stderr)
        return 3
    if args.gguf:
        report = run_gguf(args.gguf)
        print(gguf_table(report))
        for r in report["rows"]:
            if r["failures"]:
                print(f"{r['release']}: " + "; ".join(r["failures"]))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args.kit, Path(tmp))
    print(table(report))
    for r in report["rows"]:
        if "reload_s" in r:
            print(
                f"hot reload on {r['device']}: {r['reload_s']} s, "
                f"health after reload: {'pass' if r['passed_after_reload'] else 'FAIL'}"
            )
        if r["failures"]:
            print(f"{r['release']}: " + "; ".join(r["failures"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
