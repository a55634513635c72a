"""Install the training machine's public signing key on endpoints (make trust).

Thin entry point: the code is `adapter_deploy.cli.trust` (--help for usage)."""

from adapter_deploy.cli.trust import entry

if __name__ == "__main__":
    entry()
