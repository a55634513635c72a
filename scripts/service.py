"""Start, stop or restart the inference service of an endpoint (no systemd needed).

Thin entry point: the code is `adapter_deploy.cli.service` (--help for usage)."""

from adapter_deploy.cli.service import entry

if __name__ == "__main__":
    entry()
