"""The whole story on a tiny local model and a local endpoint (make demo).

Thin entry point: the code is `adapter_deploy.cli.demo` (--help for usage)."""

from adapter_deploy.cli.demo import entry

if __name__ == "__main__":
    entry()
