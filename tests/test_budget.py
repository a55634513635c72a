"""The suite's time plugin (tests/plugin_budget.py): figures printed, a budget that fails."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

BUSY = """
import time

def test_busy():
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
"""


def _run(pytester: pytest.Pytester, cpu_seconds: float) -> pytest.RunResult:
    pytester.makepyfile(test_busy=BUSY)
    budget = pytester.path / "budget.json"
    budget.write_text(json.dumps({"default": {"cpu_seconds": cpu_seconds}}))
    return pytester.runpytest("-p", "plugin_budget", "--budget", str(budget), "--tier", "default")


def test_a_run_within_its_budget_passes_and_prints_its_time(pytester: pytest.Pytester) -> None:
    result = _run(pytester, 3600)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*wall * s, CPU * s (pytest * s + subprocesses * s)*"])
    result.stdout.fnmatch_lines(["*CPU budget: tier 'default' used * of 3600 s*"])


def test_a_budget_below_the_measured_cpu_time_fails_the_run(pytester: pytest.Pytester) -> None:
    result = _run(pytester, 0.1)  # the one test alone burns 0.3 s of CPU
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*CPU budget exceeded: tier 'default' used * of CPU*"])
    result.assert_outcomes(passed=1)  # every test passed; the budget alone failed the run


def test_a_tier_missing_from_the_budget_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_busy=BUSY)
    budget = pytester.path / "budget.json"
    budget.write_text(json.dumps({"e2e": {"cpu_seconds": 1}}))
    result = pytester.runpytest("-p", "plugin_budget", "--budget", str(budget), "--tier", "default")
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_the_default_tier_has_a_budget_in_the_repo() -> None:
    from pathlib import Path

    budgets = json.loads((Path(__file__).parent / "budget.json").read_text())
    assert 0 < budgets["default"]["cpu_seconds"] <= 15 * 60 * 2  # 2 cores for 15 minutes
