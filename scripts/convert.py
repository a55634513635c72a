"""Phase 2, CONVERT: merge a versioned adapter into its base for NVIDIA endpoints.

Thin entry point: the code is `adapter_deploy.cli.convert` (--help for usage)."""

from adapter_deploy.cli.convert import entry

if __name__ == "__main__":
    entry()
