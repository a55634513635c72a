"""Health-check one release with the 5-sentence smoke test (the operator's plan).

Thin entry point: the code is `adapter_deploy.cli.health_check` (--help for usage)."""

from adapter_deploy.cli.health_check import entry

if __name__ == "__main__":
    entry()
