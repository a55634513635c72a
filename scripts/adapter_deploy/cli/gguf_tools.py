"""llama.cpp's GGUF converter, checked against this repository's pins (`make gguf-tools` runs
this; see adapter_deploy/convert/converter_tree.py).

Usage:
    python -m adapter_deploy.cli.gguf_tools check-sdist SDIST   the download is the pinned one
    python -m adapter_deploy.cli.gguf_tools install SDIST       extract the converter, recorded
    python -m adapter_deploy.cli.gguf_tools verify              exit 1 (saying why) unless the
                                                                converter tree is the pinned one

The tree goes where the converter runs from: ~/.cache/adapter-deploy/llama.cpp-<version>/, or
$ADAPTER_DEPLOY_LLAMA_CPP. A sdist whose sha256 is not the pinned one is deleted and refused.
"""

import argparse
from pathlib import Path

from adapter_deploy.common.errors import AdapterDeployError, UsageError
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.convert import converter_tree, gguf


def main(args: argparse.Namespace) -> int:
    tree = gguf.converter_dir()
    if args.command != "verify" and not args.sdist:
        raise UsageError(f"{args.command} needs the sdist's path", fix="pass SDIST")
    if args.command == "check-sdist":
        converter_tree.check_sdist(Path(args.sdist))
        return 0
    if args.command == "install":
        record = converter_tree.install(Path(args.sdist), tree)
        print(
            f"llama.cpp's converter ({len(record['files'])} files, llama.cpp "
            f"{record['llama.cpp']}) extracted into {tree}, every file checked"
        )
        return 0
    try:
        gguf.check_tools("F16")  # the converter tree only; llama-cpp-python is pip's
    except AdapterDeployError as err:
        print(f"{err.message}: extracting the pinned converter again")
        return 1
    return 0


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("command", choices=("check-sdist", "install", "verify"))
    parser.add_argument("sdist", nargs="?", help="the llama-cpp-python sdist (.tar.gz)")
    return parser


def entry() -> None:
    run(main, cli())


if __name__ == "__main__":
    entry()
