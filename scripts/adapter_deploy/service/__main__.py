"""`python -m adapter_deploy.service --params params.yaml --endpoint mac-dev`: the service."""

from adapter_deploy.service.serve import entry

entry()
