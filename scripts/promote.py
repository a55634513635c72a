"""Record which version each pulling endpoint should run (GTO stage tags in git).

Thin entry point: the code is `adapter_deploy.cli.promote` (--help for usage)."""

from adapter_deploy.cli.promote import entry

if __name__ == "__main__":
    entry()
