"""The inference service, as the plan names it: `python -m engines.serve` from the checkout.

Thin entry point for endpoints (systemd units, Mac launch agents): the engines and the
service are `adapter_deploy.engines` and `adapter_deploy.service` in the installed package;
`python -m adapter_deploy.service` is the same command from any directory.
"""

from adapter_deploy.service.serve import entry

if __name__ == "__main__":
    entry()
