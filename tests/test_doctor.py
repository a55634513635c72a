"""make doctor: a live preflight per endpoint over the real sshd, each fault planted for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from adapter_deploy import protocol as p
from adapter_deploy import signing
from adapter_deploy.kit.net import free_port
from fixtures_fleet import Fleet, agent_wrapper
from fixtures_repo import run_script
from test_serve import Service

HEALTHY = ["ssh", "agent", "python", "rsync", "base_model gemma_4b", "disk", "reload"]
HEALTHY += ["signing", "clock"]


def doctor(fleet: Fleet, endpoint: str = "ep1") -> tuple[int, dict[str, dict[str, Any]]]:
    """Exit code and the endpoint's rows by check name (from --json)."""
    proc = run_script("doctor.py", "--endpoints", endpoint, "--json", params=fleet.params)
    assert proc.stdout, proc.stderr
    report = json.loads(proc.stdout)
    assert report["exit_code"] == proc.returncode
    [entry] = report["endpoints"]
    assert entry["endpoint"] == endpoint and entry["exit_code"] == proc.returncode
    rows = {row["check"]: row for row in entry["checks"]}
    assert len(rows) == len(entry["checks"]), "one row per check"
    return proc.returncode, rows


def failed(rows: dict[str, dict[str, Any]]) -> list[str]:
    return [name for name, row in rows.items() if row["status"] == "FAIL"]


@pytest.fixture
def one_model(fleet: Fleet) -> Fleet:
    """ep1 serves gemma_4b only (its base is the kit's local dir)."""
    fleet.set_endpoint("ep1", models=["gemma_4b"])
    return fleet


def test_healthy_endpoint_passes_every_check(one_model: Fleet) -> None:
    code, rows = doctor(one_model)
    assert code == 0, rows
    assert list(rows) == HEALTHY
    assert {row["status"] for row in rows.values()} == {"ok"}, rows
    assert f"protocol {p.PROTOCOL_VERSION}" in rows["agent"]["detail"]
    proc = run_script("doctor.py", "--endpoints", "ep1", params=one_model.params)
    assert proc.returncode == 0, proc.stderr
    assert "[ep1] a deploy would work" in proc.stdout and "base_model gemma_4b" in proc.stdout
    assert not one_model.endpoints["ep1"].exists(), "the doctor created nothing there"


def _unknown_host_key(fleet: Fleet, sshd, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(sshd.ssh_config.read_text().replace(str(sshd.known_hosts), str(empty)))
    fleet.set_endpoint("ep1", ssh_config=str(config))


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def _changed_host_key(fleet: Fleet, sshd, tmp_path: Path) -> None:
    impostor = _keygen(tmp_path / "impostor")
    kind, key = (impostor.with_suffix(".pub")).read_text().split()[:2]
    pinned = tmp_path / "known_hosts"
    pinned.write_text(f"[127.0.0.1]:{sshd.port} {kind} {key}\n")
    config = tmp_path / "ssh_config"
    config.write_text(sshd.ssh_config.read_text().replace(str(sshd.known_hosts), str(pinned)))
    fleet.set_endpoint("ep1", ssh_config=str(config))


def _refused_login(fleet: Fleet, sshd, tmp_path: Path) -> None:
    stranger = _keygen(tmp_path / "stranger")
    config = tmp_path / "ssh_config"
    config.write_text(sshd.ssh_config.read_text().replace(str(sshd.identity), str(stranger)))
    fleet.set_endpoint("ep1", ssh_config=str(config))


def _unreachable(fleet: Fleet, sshd, tmp_path: Path) -> None:
    config = tmp_path / "ssh_config"
    config.write_text(
        sshd.ssh_config.read_text().replace(f"Port {sshd.port}", f"Port {free_port()}")
    )
    fleet.set_endpoint("ep1", ssh_config=str(config))


def _old_protocol(fleet: Fleet, sshd, tmp_path: Path) -> None:
    old = p.PROTOCOL_VERSION - 1
    preamble = f"import adapter_deploy.protocol as p; p.PROTOCOL_VERSION = {old}"
    fleet.set_endpoint("ep1", python=str(agent_wrapper(tmp_path, preamble)))


def _missing_base_model(fleet: Fleet, sshd, tmp_path: Path) -> None:
    fleet.set_endpoint("ep1", base_models={"gemma_4b": str(tmp_path / "no-such-model")})


def _full_disk(fleet: Fleet, sshd, tmp_path: Path) -> None:
    fleet.set_endpoint("ep1", min_free_bytes=1 << 60)


def _missing_restart_binary(fleet: Fleet, sshd, tmp_path: Path) -> None:
    command = [str(tmp_path / "no-such-restart"), "adapter-serve"]
    fleet.set_endpoint("ep1", reload_method="restart", restart_command=command)


def _missing_python(fleet: Fleet, sshd, tmp_path: Path) -> None:
    fleet.set_endpoint("ep1", python="python3-not-installed")


def _missing_rsync(fleet: Fleet, sshd, tmp_path: Path) -> None:
    fleet.set_endpoint("ep1", rsync_path=str(tmp_path / "no-rsync"))


def _untrusted_key(fleet: Fleet, sshd, tmp_path: Path) -> None:
    signing.generate(tmp_path / "keys" / "signing.pem")
    data = yaml.safe_load(fleet.params.read_text())
    data["store"]["signing_key"] = str(tmp_path / "keys" / "signing.pem")
    fleet.params.write_text(yaml.safe_dump(data))


# fault -> (exit code, the FAIL row, what its detail says, what its fix says)
FAULTS = {
    "unknown host key": (
        _unknown_host_key, 3, "ssh", "host key of adapter-test is unknown", "known_hosts"
    ),
    "changed host key": (
        _changed_host_key, 3, "ssh", "host key of adapter-test has changed", "ssh-keygen -R"
    ),
    "refused login": (
        _refused_login, 3, "ssh", "ssh login to adapter-test was refused", "ssh-copy-id"
    ),
    "unreachable": (_unreachable, 3, "ssh", "refused the ssh connection", "start sshd"),
    "old protocol": (
        _old_protocol, 2, "agent", f"runs protocol {p.PROTOCOL_VERSION - 1}",
        "make bootstrap ENDPOINT=ep1",
    ),
    "python missing there": (
        _missing_python, 3, "python", "python3-not-installed is missing on the endpoint",
        "sudo apt-get install -y python3 (Debian/Ubuntu) or brew install python@3.11 (macOS)",
    ),
    "rsync missing there": (
        _missing_rsync, 3, "rsync", "rsync is missing on the endpoint at",
        "sudo apt-get install -y rsync (Debian/Ubuntu) or brew install rsync (macOS)",
    ),
    "missing base model": (
        _missing_base_model, 3, "base_model gemma_4b", "no-such-model is not a directory",
        "base_models.gemma_4b",
    ),
    "too little disk": (_full_disk, 3, "disk", "min_free_bytes", "lower min_free_bytes"),
    "restart binary missing": (
        _missing_restart_binary, 5, "restart", "no-such-restart is not installed",
        "restart_command",
    ),
    "untrusted signing key": (
        _untrusted_key, 2, "signing", "does not trust signing key", "make trust ENDPOINT=ep1"
    ),
}  # fmt: skip


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.e2e
def test_each_planted_fault_fails_its_row_with_its_fix(
    one_model: Fleet, sshd, tmp_path: Path, fault: str
) -> None:
    plant, exit_code, check, detail, fix = FAULTS[fault]
    plant(one_model, sshd, tmp_path)
    code, rows = doctor(one_model)
    assert code == exit_code, rows
    assert failed(rows) == [check], rows
    assert detail in rows[check]["detail"] and fix in rows[check]["fix"], rows[check]
    assert rows[check]["exit_code"] == exit_code
    assert set(rows) >= set(HEALTHY) - {"reload"}, "every check has its row"
    after = list(rows)[list(rows).index(check) + 1 :]
    if check in ("ssh", "agent"):  # nothing further can be asked of the endpoint
        assert {rows[c]["status"] for c in after} == {"skip"}, rows


@pytest.mark.e2e
def test_make_trust_clears_the_signing_row(one_model: Fleet, sshd, tmp_path: Path) -> None:
    _untrusted_key(one_model, sshd, tmp_path)
    assert failed(doctor(one_model)[1]) == ["signing"]
    proc = run_script("trust.py", "--endpoints", "ep1", params=one_model.params)
    assert proc.returncode == 0, proc.stderr
    code, rows = doctor(one_model)
    assert code == 0 and rows["signing"]["status"] == "ok", rows["signing"]


def _hold_pidfile(path: Path) -> subprocess.Popen:
    """Another live process holding a pidfile of its own (the pid a reload would signal)."""
    code = (
        "import sys, time; from pathlib import Path; from adapter_deploy.common import pidfile; "
        "pidfile.hold(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


@pytest.mark.e2e
def test_sigusr1_endpoint_needs_its_own_service_running(
    one_model: Fleet, kit, tmp_path: Path
) -> None:
    adapter_dir, pidfile = one_model.endpoints["ep1"], tmp_path / "serve.pid"
    adapter_dir.mkdir(parents=True)
    args = ["--adapter-dir", str(adapter_dir), "--models", "gemma_4b", "--platform", "cpu"]
    args += ["--base-model", f"gemma_4b={kit.base}", "--pidfile", str(pidfile)]
    service = Service(tmp_path, args, free_port())
    stranger = _hold_pidfile(tmp_path / "other.pid")
    try:
        service.wait(200)
        one_model.set_endpoint(
            "ep1", reload_method="sigusr1", service_url=service.url, pidfile=str(pidfile)
        )
        code, rows = doctor(one_model)
        assert code == 0, rows
        assert rows["service"]["status"] == rows["pidfile"]["status"] == "ok", rows
        assert f"pid {service.proc.pid}" in rows["pidfile"]["detail"]

        one_model.set_endpoint("ep1", pidfile=str(tmp_path / "other.pid"))
        code, rows = doctor(one_model)
        assert code == 5 and failed(rows) == ["pidfile"], rows
        assert f"names pid {stranger.pid}" in rows["pidfile"]["detail"]
        assert f"is pid {service.proc.pid}" in rows["pidfile"]["detail"]
        assert "--pidfile" in rows["pidfile"]["fix"]

        one_model.set_endpoint("ep1", pidfile=str(pidfile))
        service.stop()
        code, rows = doctor(one_model)
        assert code == 5 and failed(rows) == ["service", "pidfile"], rows
        assert "unreachable" in rows["service"]["detail"]
        assert "scripts/service.py start --endpoint ep1" in rows["service"]["fix"]
        assert "no service pidfile" in rows["pidfile"]["detail"]
    finally:
        service.stop()
        stranger.kill()
        stranger.wait()


def test_local_endpoint_finds_hub_ids_in_the_hf_cache(
    one_model: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transport local (the demo's): no ssh; a hub id counts only when the endpoint's HF
    cache holds a snapshot with config.json."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    data = yaml.safe_load(one_model.params.read_text())
    local = {"transport": "local", "adapter_dir": str(tmp_path / "local" / "adapters")}
    data["endpoints"]["local"] = {**local, "platform": "cpu", "models": ["gemma_4b", "whisper"]}
    one_model.params.write_text(yaml.safe_dump(data))
    code, rows = doctor(one_model, "local")
    assert code == 3 and failed(rows) == ["base_model whisper"], rows
    assert "kit/tiny-whisper is not in the HF cache" in rows["base_model whisper"]["detail"]
    assert "hf download kit/tiny-whisper" in rows["base_model whisper"]["fix"]
    assert rows["ssh"]["detail"] == "transport local: no ssh"

    snapshot = cache / "models--kit--tiny-whisper" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    code, rows = doctor(one_model, "local")
    assert code == 0 and {r["status"] for r in rows.values()} == {"ok"}, rows


def test_missing_tools_are_worded_from_the_prerequisite_table(tmp_path: Path) -> None:
    """The rows for a tool missing on the endpoint (or here) say how to install it as
    `make prereqs` does (common/prereqs.py), without an endpoint to ask."""
    from adapter_deploy.common.errors import RemoteError
    from adapter_deploy.common.prereqs import install_hint
    from adapter_deploy.config import EndpointParams
    from adapter_deploy.deploy.doctor import python_missing
    from adapter_deploy.deploy.doctor_checks import check_python, check_rsync
    from adapter_deploy.deploy.remote import connect

    ep = EndpointParams(adapter_dir="/srv/a", host="box")
    row = check_rsync(ep, {"rsync_version": None}, needs_endpoint_rsync=True)
    assert (row.status, row.exit_code) == ("FAIL", 3) and install_hint("rsync") in row.fix
    old = check_python({"python": [3, 9, 6], "python_executable": "/usr/bin/python3"})
    assert old.status == "FAIL" and install_hint("python3") in old.fix

    conn = connect("box", ep, tmp_path)
    for said in ("bash: line 1: python3: command not found", "sh: 1: python3: not found",
                 "zsh:1: command not found: python3"):  # fmt: skip
        row = python_missing(conn, RemoteError(f"box: endpoint command failed: {said}"))
        assert row is not None and row.check == "python" and install_hint("python3") in row.fix
    assert python_missing(conn, RemoteError("box: ssh login to box was refused")) is None
    venv = connect("box", ep.model_copy(update={"project_dir": "/srv/p"}), tmp_path)
    assert python_missing(venv, RemoteError("box: the project is not installed on box")) is None
