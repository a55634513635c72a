"""Benchmark the HF and MLX engines on the test kit: load, per-sentence latency, reload.

Usage:
    python bench/bench_engines.py [--kit DIR] [--engines hf,mlx] [--repeat N]

Builds the kit into DIR (default .kit/, reused when complete) and prints one table per engine.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

from adapter_deploy.engines.factory import make_engine
from adapter_deploy.health import DEFAULT_SENTENCES
from adapter_deploy.kit.gemma import KitPaths, build_kit

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def bench_engine(kind: str, kit: KitPaths, repeat: int) -> None:
    engine, load_s = timed(make_engine, kind, adapter_path=kit.good, base_model=kit.base)
    print(f"\n== {kind} engine ==")
    print(f"load (base + adapter)     {load_s * 1000:9.1f} ms")
    engine.translate(DEFAULT_SENTENCES[0].input)  # warm-up, as the health check does
    for i, sentence in enumerate(DEFAULT_SENTENCES, 1):
        runs = [engine.translate(sentence.input).latency_s for _ in range(repeat)]
        print(f"sentence {i} latency median {statistics.median(runs) * 1000:9.1f} ms")
    _, reload_s = timed(engine.reload, kit.good2)
    _, noop_s = timed(engine.reload, kit.good2)
    print(f"reload (good -> good2)    {reload_s * 1000:9.1f} ms")
    print(f"reload (same, no-op)      {noop_s * 1000:9.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kit", type=Path, default=ROOT / ".kit")
    parser.add_argument("--engines", default="hf,mlx")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    kit, build_s = timed(build_kit, args.kit)
    print(f"kit ready in {build_s:.1f} s ({args.kit})")
    for kind in args.engines.split(","):
        bench_engine(kind.strip(), kit, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
