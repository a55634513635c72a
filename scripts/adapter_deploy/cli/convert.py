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

from adapter_deploy import api
from adapter_deploy.cli.progress import spinner
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.config import load_params
from adapter_deploy.store.conversions import FORMATS


def main(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    which = args.version or f"cycle {args.cycle}"
    with spinner(f"converting {args.model} {which} to {args.format}"):
        result = api.convert(
            params, args.model, args.cycle, args.version, args.format, args.dtype, args.gguf_type
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
