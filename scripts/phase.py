"""Run one deploy phase on its own: transfer, precheck, activate or verify.

Thin entry point: the code is `adapter_deploy.cli.phase` (--help for usage)."""

from adapter_deploy.cli.phase import entry

if __name__ == "__main__":
    entry()
