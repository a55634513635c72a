"""Install the inference service on endpoints (systemd user unit / launchd agent).

Thin entry point: the code is `adapter_deploy.cli.service_install` (--help for usage)."""

from adapter_deploy.cli.service_install import entry

if __name__ == "__main__":
    entry()
