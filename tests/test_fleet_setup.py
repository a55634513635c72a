"""Day one on the user's fleet: the shipped params.yaml, the Whisper clips, and services an
operator installs and forgets (systemd user unit, launchd agent, make service-install)."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import pytest
import yaml
from adapter_deploy.common.errors import UsageError
from adapter_deploy.config import DEFAULT_RESTART_COMMAND, EndpointParams, load_params
from adapter_deploy.deploy.service_install import service_files
from adapter_deploy.health import load_clips
from fixtures_repo import ROOT, run_script, write_params

SHIPPED = ROOT / "params.yaml"


def test_shipped_params_describe_the_plans_fleet_completely() -> None:
    params = load_params(SHIPPED)
    assert set(params.endpoints) == {"mac-dev", "church-rtx2070-1"}
    for name, ep in params.endpoints.items():
        assert ep.models and set(ep.models) <= set(params.models), name
        assert ep.project_dir and ep.python, name
        # The verify goes through the running service on both kinds of endpoint.
        assert ep.service_url and ep.pidfile, name
        if ep.reload_method == "restart":
            assert ep.restart_command is None  # the default, which matches the shipped unit
    mac, rtx = params.endpoint("mac-dev"), params.endpoint("church-rtx2070-1")
    assert (mac.platform, mac.reload_method) == ("mlx", "sigusr1")
    assert (rtx.platform, rtx.reload_method) == ("cuda", "restart")
    # the plan's phase 2: the NVIDIA box gets merged, requantized weights, not the plain adapter.
    assert rtx.formats["gemma_4b"] == "gguf" and rtx.gguf_type == "Q4_K_M"


def test_shipped_whisper_clips_are_real_speech_files_with_expected_words() -> None:
    params = load_params(SHIPPED)
    whisper = params.models["whisper"]
    assert whisper.task == "transcription" and whisper.sentences
    clips = load_clips(params.resolve(whisper.sentences))
    assert len(clips) >= 3 and all(c.any_of or c.all_of for c in clips)
    total = 0
    for clip in clips:
        with wave.open(str(clip.audio), "rb") as fh:
            assert (fh.getnchannels(), fh.getsampwidth(), fh.getframerate()) == (1, 2, 16_000)
            assert 1.0 < fh.getnframes() / 16_000 < 6.0, clip.name
        total += clip.audio.stat().st_size
    assert total < 600_000  # a few hundred KB in the repo, no more


def test_shipped_service_files_are_what_service_install_writes() -> None:
    params = load_params(SHIPPED)
    unit = service_files("church-rtx2070-1", params.endpoint("church-rtx2070-1"))
    assert (ROOT / "systemd" / unit.filename).read_text() == unit.text
    agent = service_files("mac-dev", params.endpoint("mac-dev"))
    assert (ROOT / "launchd" / agent.filename).read_text() == agent.text
    # The default restart command restarts the unit that is shipped.
    assert DEFAULT_RESTART_COMMAND == ["systemctl", "--user", "restart", "adapter-serve"]
    assert unit.filename == DEFAULT_RESTART_COMMAND[-1] + ".service"


def _endpoint(tmp_path: Path, **extra: object) -> EndpointParams:
    return EndpointParams(
        adapter_dir=str(tmp_path / "adapters"),
        project_dir=str(tmp_path),
        python=sys.executable,
        **extra,
    )


def _verify(unit: Path, **env_extra: str) -> subprocess.CompletedProcess:
    runtime = unit.parent / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), **env_extra}
    cmd = ["systemd-analyze", "verify", "--user", str(unit)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies_with_systemd_analyze_not_running_as_pid1(tmp_path: Path) -> None:
    """systemd cannot run as PID 1 here: `systemd-analyze verify --user` parses the unit as a
    user manager would; a broken unit makes it complain, so the check can fail."""
    files = service_files("ep1", _endpoint(tmp_path, platform="cuda"))
    unit = tmp_path / "units" / files.filename
    unit.parent.mkdir()
    unit.write_text(files.text)
    proc = _verify(unit)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "ExecReload=/bin/kill -USR1 $MAINPID" in files.text
    assert "User=" not in files.text and "WantedBy=default.target" in files.text
    unit.write_text(files.text.replace("Restart=on-failure", "Restart=sometimes"))
    assert "restart specifier" in _verify(unit).stderr


def test_launchd_agent_keeps_the_service_alive_and_logs_to_a_file(tmp_path: Path) -> None:
    files = service_files("mac", _endpoint(tmp_path, platform="mlx"))
    agent = plistlib.loads(files.text.encode())
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] is True
    assert agent["ProgramArguments"] == [
        sys.executable,
        "-m",
        "adapter_deploy.service",
        "--params",
        f"{tmp_path}/params.yaml",
        "--endpoint",
        "mac",
    ]
    assert (
        agent["StandardErrorPath"]
        == agent["StandardOutPath"]
        == f"{tmp_path}/logs/adapter-serve.log"
    )
    assert files.path.startswith("~/Library/LaunchAgents/")


def test_service_files_refuse_a_home_relative_project_dir(tmp_path: Path) -> None:
    ep = _endpoint(tmp_path).model_copy(update={"project_dir": "~/adapter-deploy"})
    with pytest.raises(Exception, match="starts with ~") as err:
        service_files("ep1", ep)
    assert "absolute" in err.value.fix


def _unescaped(line: str) -> str:
    """A unit line as systemd reads it when no specifier is left in it: %% -> %."""
    assert "%" not in line.replace("%%", ""), f"a systemd specifier is left in {line!r}"
    return line.replace("%%", "%")


def test_a_percent_in_a_path_stays_that_literal_path_in_the_service_files() -> None:
    """Issue #27 hole 6: `project_dir: /srv/proj%h` passes the path allowlist; in a unit `%h`
    is the user's home, so systemd would run another interpreter. Every value is escaped."""
    ep = EndpointParams(adapter_dir="/srv/a", project_dir="/srv/proj%h", platform="cuda")
    unit = service_files("ep1", ep).text
    fields = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0] != "#"
    )
    assert _unescaped(fields["WorkingDirectory"]) == "/srv/proj%h"
    assert _unescaped(fields["ExecStart"]).split() == [
        "/srv/proj%h/.venv/bin/python",
        "-m",
        "adapter_deploy.service",
        "--params",
        "/srv/proj%h/params.yaml",
        "--endpoint",
        "ep1",
    ]
    for line in unit.splitlines():
        if line and line[0] != "#":
            _unescaped(line)
    mac = service_files("mac", ep.model_copy(update={"platform": "mlx"}))
    agent = plistlib.loads(mac.text.encode())  # launchd expands nothing: the path as given
    assert agent["ProgramArguments"][0] == "/srv/proj%h/.venv/bin/python"
    assert agent["WorkingDirectory"] == "/srv/proj%h"
    # systemd reads a leading @ + - : ! of ExecStart as a prefix: only absolute paths.
    with pytest.raises(UsageError, match="not an absolute path"):
        service_files("ep1", ep.model_copy(update={"python": "+python3"}))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_reads_a_percent_path_as_the_literal_interpreter(
    tmp_path: Path,
) -> None:
    """`systemd-analyze verify` checks that ExecStart's interpreter exists: it exists only at
    the literal path (a `%h` read as a specifier names one under an empty home instead)."""
    project = tmp_path / "proj%h"
    (project / ".venv" / "bin").mkdir(parents=True)
    (project / ".venv" / "bin" / "python").symlink_to(sys.executable)
    ep = EndpointParams(adapter_dir=str(tmp_path / "a"), project_dir=str(project))
    unit = tmp_path / "units" / "adapter-serve.service"
    unit.parent.mkdir()
    unit.write_text(service_files("ep1", ep).text)
    (tmp_path / "home").mkdir()
    proc = _verify(unit, HOME=str(tmp_path / "home"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_service_install_over_ssh_writes_each_kind_and_dry_run_writes_nothing(
    sshd, tmp_path: Path
) -> None:
    """Over the real sshd; --no-start because neither systemd nor launchd runs here."""
    endpoints = {
        "linux": sshd.endpoint(
            tmp_path / "a1",
            platform="cuda",
            project_dir=str(tmp_path / "p1"),
            service_dir=str(tmp_path / "units"),
        ),
        "mac": sshd.endpoint(
            tmp_path / "a2",
            platform="mlx",
            project_dir=str(tmp_path / "p2"),
            service_dir=str(tmp_path / "agents"),
        ),
    }
    params = write_params(tmp_path / "params.yaml", tmp_path / "adapters", endpoints)
    args = ("--endpoints", "linux", "mac")
    proc = run_script("service_install.py", *args, "--dry-run", params=params)
    assert proc.returncode == 0, proc.stderr
    assert "would write" in proc.stdout and "systemctl --user enable --now" in proc.stdout
    assert not (tmp_path / "units").exists() and not (tmp_path / "agents").exists()

    proc = run_script("service_install.py", *args, "--no-start", params=params)
    assert proc.returncode == 0, proc.stderr
    loaded = load_params(params)
    unit = (tmp_path / "units" / "adapter-serve.service").read_text()
    assert unit == service_files("linux", loaded.endpoint("linux")).text
    plist = (tmp_path / "agents" / "org.adapter-deploy.serve.plist").read_bytes()
    assert plistlib.loads(plist)["ProgramArguments"][-1] == "mac"
    assert "installed (not started)" in proc.stdout and "launchctl bootstrap" in proc.stdout


def test_service_install_names_an_unknown_endpoint(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tmp_path / "adapters")
    data = yaml.safe_load(params.read_text())
    assert "nowhere" not in data.get("endpoints", {})
    proc = run_script("service_install.py", "--endpoints", "nowhere", params=params)
    assert proc.returncode == 2 and "unknown endpoint" in proc.stderr
