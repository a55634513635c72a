"""On a pulling endpoint: fetch and deploy what `make promote` assigned it.

Thin entry point: the code is `adapter_deploy.cli.pull` (--help for usage)."""

from adapter_deploy.cli.pull import entry

if __name__ == "__main__":
    entry()
