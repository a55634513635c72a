"""The README stays true: every script and every make target is documented there."""

from __future__ import annotations

import re
import subprocess

from fixtures_repo import ROOT

README = (ROOT / "README.md").read_text()


def test_every_script_is_in_the_readme() -> None:
    scripts = [p.name for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_")]
    missing = [s for s in scripts if f"scripts/{s}" not in README]
    assert not missing, f"scripts missing from README.md: {missing}"


def test_every_make_target_is_in_the_readme() -> None:
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True).stdout
    targets = [t for line in out.splitlines() for t in re.findall(r"make ([a-z-]+)", line)]
    targets += re.findall(r"^([a-z][a-z-]*)(?: [a-z -]+)?:", (ROOT / "Makefile").read_text(), re.M)
    missing = sorted({t for t in targets if f"make {t}" not in README})
    assert not missing, f"make targets missing from README.md: {missing}"


def test_readme_names_the_two_setup_commands() -> None:
    assert "make demo" in README and "make test" in README
