"""List the versions in the adapter store, per model.

Thin entry point: the code is `adapter_deploy.cli.versions` (--help for usage)."""

from adapter_deploy.cli.versions import entry

if __name__ == "__main__":
    entry()
