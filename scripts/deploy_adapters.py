"""Deploy adapter versions to endpoints, or roll back (the operator's plan).

Thin entry point: the code is `adapter_deploy.cli.deploy_adapters` (--help for usage)."""

from adapter_deploy.cli.deploy_adapters import entry

if __name__ == "__main__":
    entry()
