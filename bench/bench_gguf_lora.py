"""Format gguf-lora against full gguf: bytes sent per cycle, and the reload pause.

Usage:
    python bench/bench_gguf_lora.py [--kit DIR] [--gguf-type Q4_K_M] [--swaps 10] [--restarts 3]

On the test kit (built into DIR, default .kit/, reused when complete), in one run:
  bytes   each cycle sends the release's files into a fresh incoming dir (rsync finds nothing to
          reuse: a re-quantized model shares no blocks with the last one): full gguf sends
          model.gguf every cycle; gguf-lora sends adapter.gguf + base.json + conversion.json
          (its base once, on the first cycle, not counted per cycle). Goal: <= 1/2 on the kit,
          whose base is tiny; the same ratio on paper for TranslateGemma 4B (README: r=16 LoRA,
          29,802,496 parameters, at F16 in GGUF; the model at Q4_K_M about 2.5 GB) <= 1/20.
  pause   a hot reload of gguf-lora swaps the LoRA on the loaded base (LlamaCppEngine.reload,
          max of --swaps alternating swaps between two cycles' LoRAs) against what a full gguf
          release costs, a restart: a new process that loads model.gguf and answers once
          (median of --restarts). Goal: max swap <= 1/20 of a restart.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adapter_deploy.common.fsutil import atomic_write_json, sha256_file
from adapter_deploy.config import Params
from adapter_deploy.convert.gguf import tools_available
from adapter_deploy.kit.gemma import build_kit
from adapter_deploy.store.conversions import convert_release

ROOT = Path(__file__).resolve().parents[1]

BYTES_GOAL_KIT = 0.5
BYTES_GOAL_PAPER = 0.05
PAUSE_GOAL = 0.05
# TranslateGemma 4B (README "Your checkpoints"): r=16 on every linear module of the language model
PAPER_LORA_PARAMS = 29_802_496
PAPER_Q4_K_M_BYTES = 2.5e9
GGUF_F16_BYTES = 2  # the LoRA converter's --outtype f16

RESTART = (
    "import sys; from adapter_deploy.engines.llamacpp_engine import LlamaCppEngine; "
    "LlamaCppEngine(sys.argv[1]).translate('Amen.')"
)


def scratch_store(adapters: Path, adapters_by_cycle: dict[int, Path], base: Path) -> Params:
    """An adapters dir holding each adapter as gemma_4b of its cycle, and params for it."""
    entries = []
    for cycle, adapter in adapters_by_cycle.items():
        sha = sha256_file(adapter / "adapter_model.safetensors")
        version_id = f"cycle{cycle}_20260101_{sha[:8]}"
        dest = adapters / "gemma_4b" / version_id
        shutil.copytree(adapter, dest)
        files = {
            p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in dest.iterdir()
        }
        entry = {"version_id": version_id, "cycle": cycle, "created": "2026-01-01T00:00:00Z"}
        entries.append({**entry, "sha256": sha, "files": files})
    atomic_write_json(adapters / "manifest.json", {"versions": {"gemma_4b": entries}})
    return Params.model_validate(
        {
            "store": {"adapters_dir": str(adapters)},
            "models": {"gemma_4b": {"base_model": str(base)}},
        }
    )


def release_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def swap_pauses(lora_paths: list[Path], swaps: int) -> list[float]:
    from adapter_deploy.engines.llamacpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(lora_paths[0])
    engine.translate("Amen.")
    pauses = []
    for i in range(1, swaps + 1):
        start = time.perf_counter()
        assert engine.reload(lora_paths[i % 2])
        pauses.append(time.perf_counter() - start)
        engine.translate("Amen.")
    return pauses


def restart_seconds(full_path: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", RESTART, str(full_path)], check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=ROOT / ".kit")
    parser.add_argument("--gguf-type", default="Q4_K_M", choices=("Q4_K_M", "Q8_0", "F16"))
    parser.add_argument("--swaps", type=int, default=10)
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # llama.cpp's fallback-quant notes, unsigned
    if not tools_available(args.gguf_type):
        print("skipped: llama.cpp's tools are missing (make gguf-tools)")
        return 0
    kit = build_kit(args.kit)
    with tempfile.TemporaryDirectory() as tmp:
        params = scratch_store(Path(tmp) / "adapters", {1: kit.good, 2: kit.good2}, kit.base)
        versions = [e["version_id"] for e in _versions(params)]
        loras = [convert_release(params, "gemma_4b", v, "gguf-lora", gguf_type=args.gguf_type)
                 for v in versions]  # fmt: skip
        fulls = [convert_release(params, "gemma_4b", v, "gguf", gguf_type=args.gguf_type)
                 for v in versions]  # fmt: skip
        lora_cycle = max(release_bytes(r.path) for r in loras)
        full_cycle = min(release_bytes(r.path) for r in fulls)
        base_once = loras[0].base.to_dict()["size"] if loras[0].base else 0
        pauses = swap_pauses([r.path for r in loras], args.swaps)
        restarts = [restart_seconds(fulls[0].path) for _ in range(args.restarts)]
    restart = statistics.median(restarts)
    kit_ratio = lora_cycle / full_cycle
    paper_lora = PAPER_LORA_PARAMS * GGUF_F16_BYTES
    paper_ratio = paper_lora / PAPER_Q4_K_M_BYTES
    pause_ratio = max(pauses) / restart
    print(f"bytes per cycle on the kit ({args.gguf_type} base):")
    print(f"  full gguf (model.gguf every cycle)      {full_cycle:12,d} B")
    print(f"  gguf-lora (the LoRA release)            {lora_cycle:12,d} B")
    print(f"  gguf-lora base, sent once               {base_once:12,d} B")
    print("on paper, TranslateGemma 4B (r=16 LoRA at F16 vs the model at Q4_K_M):")
    print(f"  {paper_lora / 2**20:.1f} MiB per cycle vs {PAPER_Q4_K_M_BYTES / 1e9:.1f} GB")
    swap_ms, median_ms = max(pauses) * 1000, statistics.median(pauses) * 1000
    print(f"reload pause: LoRA swap max {swap_ms:.1f} ms (median {median_ms:.1f} ms, "
          f"{args.swaps} swaps); restart with the full GGUF {restart * 1000:.0f} ms "
          f"(median of {args.restarts})")  # fmt: skip
    print(f"BENCH gguf_lora_vs_gguf_bytes_per_cycle_kit {kit_ratio:.4f} {BYTES_GOAL_KIT} <=")
    print(
        f"BENCH gguf_lora_vs_gguf_bytes_per_cycle_4b_paper {paper_ratio:.4f} {BYTES_GOAL_PAPER} <="
    )
    print(f"BENCH gguf_lora_swap_vs_gguf_restart_pause {pause_ratio:.4f} {PAUSE_GOAL} <=")
    return 0


def _versions(params: Params) -> list[dict]:
    import json

    manifest = json.loads((params.adapters_dir / "manifest.json").read_text())
    return manifest["versions"]["gemma_4b"]


if __name__ == "__main__":
    sys.exit(main())
