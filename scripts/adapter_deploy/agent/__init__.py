"""The endpoint side of a deploy, run as `python -m adapter_deploy.agent session ...`.

Owns the endpoint's on-disk layout (releases, active/previous links, bad and
accepted records, status.json). Depends on common, protocol, signing, engines and
health only.
"""
