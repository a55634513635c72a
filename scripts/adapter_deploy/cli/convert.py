"""Phase 2, CONVERT: merge a versioned adapter into its base for NVIDIA endpoints.

Usage:
    python scripts/convert.py --model gemma_4b --cycle 1 --format merged [--json]
    python scripts/convert.py --model gemma_4b --version cycle1_20260315_a4b2c8d1 \\
        --format bitsandbytes

Formats: merged (fp16 transformers model dir), bitsandbytes (the same weights plus a
quantization.json that loads them 4-bit nf4 where CUDA is present), gguf (one model.gguf for
llama.cpp, --gguf-type Q4_K_M (default), Q8_0 or F16; needs llama.cpp's tools: pip install
llama-cpp-python gguf, or `make gguf-tools`). The newest version of --cycle is converted unless
--version names one. Results are cached by content under <adapters_dir>/.conversions/<key>/:
the same inputs again recompute nothing. Each conversion is recorded in adapters/manifest.json.
"""

import argparse
import json

from adapter_deploy.common.errors import UsageError
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import check_version_id, load_params
from adapter_deploy.store.conversions import FORMATS, convert_release
from adapter_deploy.store.manifest import find_version, load_manifest, newest_of_cycle


def pick_version(params, model: str, cycle: int | None, version: str | None) -> str:
    """--version (checked against --cycle when both are given), else the cycle's newest."""
    params.model(model)
    manifest = load_manifest(params.adapters_dir)
    if version is None:
        if cycle is None:
            raise UsageError("name a version", fix="pass --cycle N or --version ID")
        return newest_of_cycle(manifest, model, cycle)["version_id"]
    entry = find_version(manifest, model, check_version_id(version))
    if cycle is not None and entry["cycle"] != cycle:
        raise UsageError(
            f"{version} belongs to cycle {entry['cycle']}, not {cycle}",
            fix="drop --cycle or pass the matching one",
        )
    return version


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    version_id = pick_version(params, args.model, args.cycle, args.version)
    result = convert_release(
        params, args.model, version_id, args.format, dtype=args.dtype, gguf_type=args.gguf_type
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        how = "cache hit" if result.cache_hit else f"converted in {result.seconds:.1f} s"
        print(
            f"{result.model} {result.version_id} -> {result.format}"
            f"{' ' + result.gguf_type if result.gguf_type else ''}: {result.path} "
            f"({len(result.files)} files, {result.size / 1e6:.1f} MB, {how})"
        )
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="model name from params.yaml")
    parser.add_argument("--cycle", type=int, help="convert the newest version of this cycle")
    parser.add_argument("--version", help="convert this version id instead")
    parser.add_argument("--format", required=True, choices=FORMATS, help="target format")
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16"),
        help="merged weights dtype (default float16)",
    )
    parser.add_argument(
        "--gguf-type",
        default="Q4_K_M",
        choices=("Q4_K_M", "Q8_0", "F16"),
        help="GGUF quantization for --format gguf (default Q4_K_M)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def entry() -> None:
    run(main, cli())


if __name__ == "__main__":
    entry()
