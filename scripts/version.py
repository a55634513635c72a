"""Phase 1, VERSION: put a trained PEFT adapter into the versioned store.

Thin entry point: the code is `adapter_deploy.cli.version` (--help for usage)."""

from adapter_deploy.cli.version import entry

if __name__ == "__main__":
    entry()
