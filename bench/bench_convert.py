"""Benchmark conversion on the test kit: time per format, and the cache-hit time.

Usage:
    python bench/bench_convert.py [--kit DIR] [--repeat N]

Builds the kit into DIR (default .kit/, reused when complete), versions kit.good into a
scratch store (manifest only; no git/DVC needed to convert) and times `convert_release`:
each format from an empty cache (after one untimed warm-up that pays the imports), bitsandbytes
again with the merged release already cached (it links those weights), and a repeat of the same
inputs (cache hit), and gguf per type (F16 by llama.cpp's converter; Q8_0 and Q4_K_M by llama.cpp's
quantizer; each from an empty cache, so the merge is included). gguf is reported as skipped
while llama.cpp's tools are missing (`make gguf-tools`).
Goals: merged and bitsandbytes <= 2 s each on the kit model, cache hit <= 0.25 s.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from adapter_deploy.common.fsutil import atomic_write_json, sha256_file
from adapter_deploy.config import Params
from adapter_deploy.convert.gguf import GGUF_TYPES, tools_available
from adapter_deploy.kit.gemma import build_kit
from adapter_deploy.store.conversions import CACHE_DIR, convert_release

ROOT = Path(__file__).resolve().parents[1]

GOAL_MERGED_S = 2.0
GOAL_HIT_S = 0.25


def scratch_store(adapters: Path, adapter: Path, base: Path) -> tuple[Params, str]:
    """An adapters dir holding `adapter` as gemma_4b cycle 1, and params pointing at it."""
    sha = sha256_file(adapter / "adapter_model.safetensors")
    version_id = f"cycle1_20260101_{sha[:8]}"
    dest = adapters / "gemma_4b" / version_id
    shutil.copytree(adapter, dest)
    files = {p.name: {"sha256": sha256_file(p), "size": p.stat().st_size} for p in dest.iterdir()}
    entry = {"version_id": version_id, "cycle": 1, "created": "2026-01-01T00:00:00Z"}
    entry.update(sha256=sha, files=files)
    atomic_write_json(adapters / "manifest.json", {"versions": {"gemma_4b": [entry]}})
    params = Params.model_validate(
        {
            "store": {"adapters_dir": str(adapters)},
            "models": {"gemma_4b": {"base_model": str(base)}},
        }
    )
    return params, version_id


def timed_convert(
    params: Params, version_id: str, fmt: str, fresh: bool, hit: bool, gguf_type: str = "Q4_K_M"
) -> float:
    """Seconds for one conversion; `fresh` empties the cache first, `hit` is what to expect."""
    if fresh:
        shutil.rmtree(params.adapters_dir / CACHE_DIR, ignore_errors=True)
    start = time.perf_counter()
    result = convert_release(params, "gemma_4b", version_id, fmt, gguf_type=gguf_type)
    elapsed = time.perf_counter() - start
    assert result.cache_hit is hit, (fmt, result.cache_hit)
    return elapsed


def median_of(repeat: int, fn) -> float:
    return statistics.median(fn() for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=ROOT / ".kit")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    kit = build_kit(args.kit)
    with tempfile.TemporaryDirectory() as tmp:
        params, vid = scratch_store(Path(tmp) / "adapters", kit.good, kit.base)
        timed_convert(params, vid, "merged", True, False)  # warm-up: imports, first-call costs
        n = args.repeat
        merged = median_of(n, lambda: timed_convert(params, vid, "merged", True, False))
        bnb = median_of(n, lambda: timed_convert(params, vid, "bitsandbytes", True, False))
        timed_convert(params, vid, "merged", True, False)
        bnb_linked = timed_convert(params, vid, "bitsandbytes", False, False)
        hit = median_of(n, lambda: timed_convert(params, vid, "merged", False, True))
        gguf = {
            t: median_of(n, lambda t=t: timed_convert(params, vid, "gguf", True, False, t))
            for t in GGUF_TYPES
            if tools_available(t)
        }
    print(f"convert kit model (median of {n}):")
    print(f"  merged                          {merged * 1000:9.1f} ms")
    print(f"  bitsandbytes (from scratch)     {bnb * 1000:9.1f} ms")
    print(f"  bitsandbytes (merged cached)    {bnb_linked * 1000:9.1f} ms")
    print(f"  same inputs again (cache hit)   {hit * 1000:9.1f} ms")
    for gguf_type in GGUF_TYPES:
        took = (
            f"{gguf[gguf_type] * 1000:9.1f} ms" if gguf_type in gguf else "skipped: tools missing"
        )
        print(f"  gguf {gguf_type:<7}(from scratch)    {took}")
    print(f"BENCH convert_merged_s {merged:.3f} {GOAL_MERGED_S} <=")
    print(f"BENCH convert_bitsandbytes_s {bnb:.3f} {GOAL_MERGED_S} <=")
    print(f"BENCH convert_cache_hit_s {hit:.4f} {GOAL_HIT_S} <=")
    for gguf_type, took in gguf.items():
        print(f"BENCH convert_gguf_{gguf_type.lower()}_s {took:.3f} {GOAL_MERGED_S} <=")


if __name__ == "__main__":
    main()
