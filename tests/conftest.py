"""Shared pytest fixtures live in plugin modules beside this file."""

from pathlib import Path

_HERE = Path(__file__).parent
pytest_plugins = [
    name
    for name in (
        "fixtures_repo",
        "fixtures_kit",
        "fixtures_sshd",
        "fixtures_fleet",
        "fixtures_convert",
        "plugin_budget",
    )
    if (_HERE / f"{name}.py").exists()
]
