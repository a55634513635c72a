"""Copy this project's code to an endpoint's project_dir and install it there.

Thin entry point: the code is `adapter_deploy.cli.bootstrap` (--help for usage)."""

from adapter_deploy.cli.bootstrap import entry

if __name__ == "__main__":
    entry()
