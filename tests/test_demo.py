"""make demo when a step fails: the service it started is stopped, and one line names the
step, what failed and the log to read (no traceback); make demo-clean still cleans up.

The default tier runs the demo's own steps (cli/demo_steps.py) against the real service and
a real deploy that fails; the e2e tier runs the whole `scripts/demo.py` with an rsync that
fails, as on the machine of issue #26.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from adapter_deploy.cli import demo
from adapter_deploy.cli.demo_steps import DemoSteps, alive
from adapter_deploy.common.errors import StepFailed
from adapter_deploy.kit.net import free_port
from fixtures_repo import ROOT

PY = sys.executable


def script(name: str) -> str:
    return str(ROOT / "scripts" / name)


def test_a_failed_deploy_stops_the_service_and_names_the_step_and_log(
    kit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # paths in the line are shown relative to here
    root = tmp_path / "demo"
    root.mkdir()
    port = free_port()
    params = demo.write_params(root, kit.base, port)
    steps = DemoSteps(root, {**os.environ, "PARAMS": str(params)}, ROOT)
    url = f"http://127.0.0.1:{port}"
    deploy = ["--cycle", "9", "--models", "gemma_4b", "--endpoints", "local"]
    with pytest.raises(StepFailed) as failed, steps.stopping_service_on_failure():
        steps.step("1. Start the service")
        steps.start_service(PY, script("service.py"), "start", "--endpoint", "local", url=url)
        pid = steps.service_pid
        assert pid is not None and alive(pid)
        steps.step("2. Deploy cycle 9")  # never versioned: the deploy fails
        steps.sh(PY, script("deploy_adapters.py"), *deploy)

    assert not alive(pid), "the service the demo started is stopped"
    line = failed.value.one_line()
    assert line.startswith('demo step "2. Deploy cycle 9" failed: `python ')
    assert "deploy_adapters.py --cycle 9 " in line and "` exited 2 (usage or configuration" in line
    assert "log: demo/demo.log" in line and f"the demo service (pid {pid}) was stopped" in line
    assert failed.value.exit_code == 2
    assert "(exit 2)" in (root / "demo.log").read_text()
    assert (root / "endpoint" / "service.log").is_file()

    assert demo.clean(root) == 0 and not root.exists(), "make demo-clean still works"


def test_a_service_that_stops_answering_is_a_step_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's 404 from the service: one line naming the step and the service's log,
    exit 5, not an HTTPError traceback."""
    monkeypatch.chdir(tmp_path)
    steps = DemoSteps(tmp_path / "demo", dict(os.environ), ROOT)
    steps.step("2. Ask the service")
    with pytest.raises(StepFailed) as failed, steps.stopping_service_on_failure():
        steps.ask(f"http://127.0.0.1:{free_port()}", "gemma_4b", "hello")
    line = failed.value.one_line()
    assert line.startswith('demo step "2. Ask the service" failed: the service at http://')
    assert "log: demo/endpoint/service.log" in line and failed.value.exit_code == 5


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_make_demo_with_a_failing_rsync_stops_cleanly(tmp_path: Path) -> None:
    """Issue #26: the deploy of step 2 exits 3; the demo says so in one line, exits 3 and
    leaves no service running; demo-clean removes what is left."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "rsync").write_text("#!/bin/sh\necho 'rsync: connection closed' >&2\nexit 12\n")
    (fake / "rsync").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    where = tmp_path / "demo"
    run = [PY, script("demo.py"), "--dir", str(where)]
    proc = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert 'demo step "2. Version cycle 1 and deploy it: healthy" failed' in line, proc.stderr
    assert "deploy_adapters.py" in line and "exited 3 (remote error)" in line
    assert f"log: {where / 'demo.log'}" in line and "was stopped" in line
    assert "Traceback" not in proc.stderr
    assert not (where / "endpoint" / "serve.pid").exists(), "the service exited cleanly"
    clean = subprocess.run([*run, "--clean"], cwd=ROOT, capture_output=True, text=True)
    assert clean.returncode == 0 and not where.exists()
