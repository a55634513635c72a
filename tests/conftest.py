"""Shared pytest fixtures live in plugin modules beside this file."""

from pathlib import Path

_HERE = Path(__file__).parent
pytest_plugins = [
    name
    for name in (
        "plugin_budget",  # first: fixtures_kit imports it (its kit-build clock)
        "fixtures_repo",
        "fixtures_kit",
        "fixtures_sshd",
        "fixtures_fleet",
        "fixtures_convert",
    )
    if (_HERE / f"{name}.py").exists()
]
