"""pytest plugin: the suite's time as a budget.

Every run prints its wall time and its CPU time (this process plus every subprocess it waited
for: the deployer CLIs, sshd and the endpoint agents it forked, the services). With
`--budget tests/budget.json --tier default` the run fails when its CPU time exceeds that tier's
`cpu_seconds`: growth is caught by the change that causes it, not by CI's time limit. CPU time
rather than wall time, because wall time on a shared 2-core machine moves with whatever else
runs there; CPU time moves with the work the tests do.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Clock:
    wall: float
    cpu_self: float
    cpu_children: float

    @classmethod
    def now(cls) -> Clock:
        t = os.times()
        return cls(time.monotonic(), t.user + t.system, t.children_user + t.children_system)

    def since(self, start: Clock) -> Clock:
        return Clock(
            self.wall - start.wall,
            self.cpu_self - start.cpu_self,
            self.cpu_children - start.cpu_children,
        )

    @property
    def cpu(self) -> float:
        return self.cpu_self + self.cpu_children


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("budget", "the suite's CPU-time budget")
    group.addoption("--budget", type=Path, help="JSON file of tier -> {cpu_seconds: N}")
    group.addoption("--tier", help="which tier of --budget this run is held to")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_START] = Clock.now()


# CPU seconds spent building cached fixtures (kits) in this run: a once-per-machine cost that
# the next run finds in the cache, so it is printed but not held to the budget (which is for
# what the tests themselves do).
CACHE_BUILDS: list[float] = []


def building() -> Clock:
    """Start timing a cached fixture's build; pass the result to `built`."""
    return Clock.now()


def built(start: Clock) -> None:
    CACHE_BUILDS.append(Clock.now().since(start).cpu)


_START = pytest.StashKey[Clock]()
_SPENT = pytest.StashKey[Clock]()
_VERDICT = pytest.StashKey[str]()


def tier_budget(path: Path, tier: str) -> float:
    """The tier's CPU budget in seconds; a missing tier is an error, never "no budget"."""
    budgets = json.loads(path.read_text(encoding="utf-8"))
    if tier not in budgets:
        raise pytest.UsageError(f"{path} has no tier {tier!r} (tiers: {', '.join(budgets)})")
    return float(budgets[tier]["cpu_seconds"])


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Session fixtures (sshd, services) are torn down and waited for by now, so their CPU
    # time is in the children's figure.
    config = session.config
    spent = Clock.now().since(config.stash[_START])
    config.stash[_SPENT] = spent
    path, tier = config.getoption("--budget"), config.getoption("--tier")
    if path is None or tier is None or getattr(config.option, "collectonly", False):
        return
    budget = tier_budget(path, tier)
    held = spent.cpu - sum(CACHE_BUILDS)
    if held > budget:
        config.stash[_VERDICT] = (
            f"CPU budget exceeded: tier {tier!r} used {held:.0f} s of CPU, its budget is "
            f"{budget:.0f} s ({path}): make the new tests cheaper, or move the slow story "
            "to the e2e tier (pytest.mark.e2e); raise the budget only with a reason"
        )
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        config.stash[_VERDICT] = f"CPU budget: tier {tier!r} used {held:.0f} of {budget:.0f} s"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    spent = config.stash.get(_SPENT, None)
    if spent is None:
        return
    terminalreporter.write_sep("=", "time")
    terminalreporter.write_line(
        f"wall {spent.wall:.0f} s, CPU {spent.cpu:.0f} s "
        f"(pytest {spent.cpu_self:.0f} s + subprocesses {spent.cpu_children:.0f} s)"
    )
    if sum(CACHE_BUILDS) >= 1:
        terminalreporter.write_line(
            f"of which {sum(CACHE_BUILDS):.0f} CPU s built cached test kits (not budgeted: the "
            "next run finds them in the cache)"
        )
    verdict = config.stash.get(_VERDICT, None)
    if verdict:
        terminalreporter.write_line(verdict, red=verdict.startswith("CPU budget exceeded"))
