"""Adapter Deploy core: config, errors, manifest, registry, remote, releases, health.

The core never prints to stdout and never exits; scripts do that through
`deploycore.runner`.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
