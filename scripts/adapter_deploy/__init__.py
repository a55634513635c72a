"""Adapter Deploy: versioned deployment of fine-tuned LoRA adapters to inference endpoints.

Layers, each importing only the ones below it (the import-linter contract in
pyproject.toml is the rule):

    cli                      parse, call api, render; one module per script
    api                      what every command does, returning result objects
    deploy                   plan, remote (ssh/rsync), session, steps, fleet, records, alerts
    store                    manifest, registry (git+DVC), versioning, conversions
    agent | service          endpoint side: the deploy agent, the inference service
    health | convert | kit   health-check rules; training-side converters; test kits
    engines | config | signing | protocol
    common                   errors, atomic fs, names, adapter format, clock, runner

The core never prints to stdout and never exits; entry points do, through
`adapter_deploy.common.runner`. Paths come from the params file's location.
"""

__version__ = "0.2.0"
