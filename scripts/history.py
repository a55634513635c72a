"""Versions and deployments per model, with training metrics per cycle.

Thin entry point: the code is `adapter_deploy.cli.history` (--help for usage)."""

from adapter_deploy.cli.history import entry

if __name__ == "__main__":
    entry()
