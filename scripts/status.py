"""Which version runs where: endpoint x model, read live from each endpoint.

Thin entry point: the code is `adapter_deploy.cli.status` (--help for usage)."""

from adapter_deploy.cli.status import entry

if __name__ == "__main__":
    entry()
