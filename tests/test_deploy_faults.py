"""Faults and bad input during a deploy: a clear error, a documented exit code, nothing changed."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml
from adapter_deploy.config import Params
from adapter_deploy.deploy import alerts
from adapter_deploy.deploy.plan import EndpointOutcome, ModelOutcome
from fixtures_fleet import Fleet, inflated_adapter, version
from fixtures_repo import ROOT


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_dry_run_touches_nothing(fleet: Fleet) -> None:
    proc = fleet.deploy("--cycle", "1", "--all-adapters", "--endpoints", "ep1", "--dry-run")
    # --all-adapters: the models cycle 1 has; whisper has no cycle-1 version and is listed
    assert proc.returncode == 0, proc.stderr
    assert "not in this cycle (left as they are): whisper" in proc.stdout
    assert "[ep1] gemma_4b" in proc.stdout and "whisper" not in proc.stdout.split("\n", 1)[1]
    proc = fleet.deploy("--cycle", "9", "--all-adapters", "--endpoints", "ep1", "--json")
    assert proc.returncode == 2 and "cycle 9 has no version of any model" in proc.stderr
    proc = fleet.deploy(
        "--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "ep2", "--dry-run"
    )
    assert proc.returncode == 0, proc.stderr
    assert "[ep1] gemma_4b" in proc.stdout and "[ep2] gemma_4b" in proc.stdout
    assert not fleet.endpoints["ep1"].exists() and not fleet.endpoints["ep2"].exists()
    assert fleet.log() == []


def test_bad_input_exits_2_before_anything_moves(fleet: Fleet) -> None:
    cases = [
        (("--cycle", "1", "--models", "gemma_4b", "--endpoints", "nowhere"), "unknown endpoint"),
        (("--cycle", "1", "--models", "llama", "--endpoints", "ep1"), "unknown model 'llama'"),
        (("--cycle", "9", "--models", "gemma_4b", "--endpoints", "ep1"), "no version in cycle 9"),
        (("--cycle", "1", "--models", "gemma_4b"), "no endpoint given"),
        (("--models", "gemma_4b", "--endpoints", "ep1"), "nothing to deploy"),
    ]
    for args, message in cases:
        proc = fleet.deploy(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr
    assert not fleet.endpoints["ep1"].exists()
    assert fleet.log() == []


def test_unreachable_host_and_unknown_host_key(fleet: Fleet, sshd, tmp_path: Path) -> None:
    closed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    fleet.set_endpoint(
        "ep1", ssh_config=None, host="127.0.0.1", port=int(closed), identity_file=str(sshd.identity)
    )
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 3, proc.stderr
    assert "refused the ssh connection" in proc.stdout + proc.stderr

    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    config = tmp_path / "ssh_config"
    config.write_text(sshd.ssh_config.read_text().replace(str(sshd.known_hosts), str(empty)))
    fleet.set_endpoint("ep2", ssh_config=str(config))
    started = time.monotonic()
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep2")
    assert proc.returncode == 3, proc.stderr
    assert "host key of adapter-test is unknown or has changed" in proc.stdout + proc.stderr
    assert time.monotonic() - started < 30  # no prompt, no hang
    assert not (fleet.endpoints["ep2"] / "gemma_4b").exists()
    assert [e["status"] for e in fleet.log()] == ["failed", "failed"]


def test_rsync_missing_on_endpoint(fleet: Fleet) -> None:
    fleet.set_endpoint("ep1", rsync_path="/nonexistent/rsync")
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 3
    assert "rsync is missing on the endpoint" in proc.stdout + proc.stderr
    assert fleet.links("ep1") == (None, None)


@pytest.mark.e2e
def test_disk_full_on_endpoint(fleet: Fleet) -> None:
    fleet.set_endpoint("ep1", min_free_bytes=1 << 60)
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 3
    assert "endpoint disk is full" in proc.stdout + proc.stderr
    assert fleet.links("ep1") == (None, None)
    # the rsync that starts before the session checks the reserve too: nothing landed
    landing = fleet.endpoints["ep1"] / "incoming"
    assert not [p for p in landing.rglob("*") if p.is_file()] if landing.exists() else True


def test_checksum_mismatch_is_refused_and_quarantined(fleet: Fleet) -> None:
    vid = fleet.versions["cycle1"]
    local = fleet.store.adapters / "gemma_4b" / vid / "adapter_model.safetensors"
    data = bytearray(local.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: what a flipped bit in transit looks like
    local.chmod(0o644)
    local.write_bytes(bytes(data))
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 3, proc.stderr
    assert "sha256 differs from the manifest" in proc.stdout + proc.stderr
    assert fleet.links("ep1") == (None, None)
    assert not (fleet.endpoints["ep1"] / "gemma_4b" / "releases" / vid).exists()
    assert len(list((fleet.endpoints["ep1"] / "quarantine").iterdir())) == 1


@pytest.mark.e2e
def test_cut_transfer_resumes(fleet: Fleet) -> None:
    """A transfer cut midway leaves a partial file; the next run sends only the rest."""
    vid = fleet.versions["cycle1"]
    local = fleet.store.adapters / "gemma_4b" / vid / "adapter_model.safetensors"
    partial = fleet.endpoints["ep1"] / "incoming" / "gemma_4b" / "releases" / vid / ".rsync-partial"
    partial.mkdir(parents=True)
    whole = local.read_bytes()
    (partial / local.name).write_bytes(whole[: len(whole) * 3 // 4])
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "--json")
    assert proc.returncode == 0, proc.stderr
    sent = json.loads(proc.stdout)["endpoints"][0]["models"][0]["bytes_sent"]
    assert 0 < sent < len(whole) // 2
    assert fleet.links("ep1")[0] == vid


def test_two_deploys_at_once_one_exits_7(fleet: Fleet) -> None:
    env_params = {"PARAMS": str(fleet.params)}
    import os

    first = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "scripts" / "deploy_adapters.py"),
            "--cycle",
            "1",
            "--models",
            "gemma_4b",
            "--endpoints",
            "ep1",
        ],
        env={**os.environ, **env_params},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = fleet.endpoints["ep1"] / ".deploy.lock"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (lock.exists() and lock.read_text()):
        time.sleep(0.05)
    second = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 7, second.stderr
    assert "is locked by deploy by" in second.stdout + second.stderr


def test_dead_service_on_reload_rolls_back(fleet: Fleet, tmp_path: Path) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    assert (
        fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1").returncode == 0
    )
    pidfile = tmp_path / "service.pid"
    pidfile.write_text("999999\n")  # left behind by a dead service: nobody holds it
    fleet.set_endpoint("ep1", reload_method="sigusr1", pidfile=str(pidfile))
    proc = fleet.deploy("--cycle", "2", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 5, proc.stderr
    assert "is stale: no running service holds it" in proc.stdout + proc.stderr
    assert fleet.links("ep1")[0] == v1
    bad = json.loads((fleet.endpoints["ep1"] / "gemma_4b" / "bad.json").read_text())
    assert v2 in bad


@pytest.fixture
def alert_receiver():
    """A real HTTP receiver on loopback: (its URL, the JSON bodies POSTed, their headers)."""
    received: list[dict] = []
    headers: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            headers.append(dict(self.headers))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alert", received, headers
    server.shutdown()


@pytest.mark.e2e
def test_alert_hooks_get_a_json_summary_and_never_change_the_outcome(
    fleet: Fleet, tmp_path, alert_receiver
):
    url, received, _ = alert_receiver
    out = tmp_path / "alert.json"
    data = yaml.safe_load(fleet.params.read_text())
    data["alert_url"] = url
    data["alert_fields"] = {"topic": "church-deploys", "priority": 4}  # ntfy's JSON publish
    data["alert_command"] = [
        sys.executable,
        "-c",
        f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())",
    ]
    fleet.params.write_text(yaml.safe_dump(data))
    proc = fleet.deploy("--cycle", "3", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 4
    # the endpoint's worker thread and the alert name the endpoint and model on each line
    assert "Z WARNING [ep1] [gemma_4b] ABORTED: pre-activation health check" in proc.stderr
    assert "Z WARNING [ep1] [gemma_4b] ALERT deploy aborted on ep1 — gemma_4b" in proc.stderr
    alert = json.loads(out.read_text())
    assert alert["status"] == "aborted" and alert["phase"] == "pre-check"
    assert alert["version"] == fleet.versions["cycle3"]
    assert any(
        "Jacobo" in f["reason"] or "santiago" in f["reason"].lower()
        for f in alert["failing_sentences"]
    )
    line = f"Adapter Deploy: deploy aborted on ep1 — gemma_4b {fleet.versions['cycle3']} "
    assert alert["text"] == line + "failed the pre-check, nothing changed"
    # the HTTP body: the same summary, the line where Slack/Mattermost (text), Discord
    # (content) and ntfy (message, title) read it, and alert_fields merged in
    [body] = received
    assert {k: body[k] for k in alert} == alert
    assert body["text"] == body["content"] == body["message"] == alert["text"]
    assert body["title"] == "Adapter Deploy"
    assert body["topic"] == "church-deploys" and body["priority"] == 4
    # a broken hook is logged and the outcome stays the same
    data["alert_command"] = ["/nonexistent/alert"]
    data["alert_url"] = "http://127.0.0.1:9/unreachable"
    fleet.params.write_text(yaml.safe_dump(data))
    proc = fleet.deploy("--cycle", "3", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 4 and "alert_command failed" in proc.stderr


def test_alert_text_for_a_rollback_and_an_unreachable_endpoint(alert_receiver, caplog) -> None:
    url, received, headers = alert_receiver
    rolled = ModelOutcome("gemma_4b", "cycle2_b", status="rolled_back", previous="cycle1_a")
    rolled.error = "post-activation health check failed: 'Buenos días': no 'buen'"
    outcomes = [
        EndpointOutcome("church-rtx2070-1", [rolled]),
        EndpointOutcome("mac-dev", error="mac-dev: ssh login to mac was refused", exit_code=3),
    ]
    params = Params.model_validate({"models": {"gemma_4b": {"base_model": "b"}}, "alert_url": url})
    assert alerts.send_alerts(params, "deploy", outcomes) == 2
    assert [body["text"] for body in received] == [
        "Adapter Deploy: rollback on church-rtx2070-1 — gemma_4b cycle2_b failed verify, "
        "back on cycle1_a",
        "Adapter Deploy: deploy failed on mac-dev (connect): ssh login to mac was refused",
    ]
    assert [body["content"] for body in received] == [body["text"] for body in received]
    assert received[0]["status"] == "rolled_back" and received[0]["serving"] == "cycle1_a"
    assert received[1]["phase"] == "connect" and "topic" not in received[1]
    # our own User-Agent: some webhook hosts' CDNs refuse Python-urllib's default one
    assert {h["Content-Type"] for h in headers} == {"application/json"}
    assert {h["User-Agent"] for h in headers} == {"adapter-deploy-alerts/1"}
    # a webhook URL's path is its secret: a failed post logs the host only
    params.alert_url = "http://127.0.0.1:9/hooks/T000/SECRET"
    with caplog.at_level(logging.WARNING, logger="adapter_deploy.deploy.alerts"):
        assert alerts.send_alerts(params, "deploy", outcomes[1:]) == 1
    assert "alert_url http://127.0.0.1:9/… failed" in caplog.text
    assert "SECRET" not in caplog.text


@pytest.mark.e2e
def test_refused_login_fails_fast_without_prompt(fleet: Fleet, sshd, tmp_path: Path) -> None:
    """A key the server does not accept (a password-only account, say): no prompt, no retry."""
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)  # fmt: skip
    config = tmp_path / "ssh_config"
    config.write_text(sshd.ssh_config.read_text().replace(str(sshd.identity), str(stranger)))
    fleet.set_endpoint("ep1", ssh_config=str(config))
    started = time.monotonic()
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 3
    assert "ssh login to adapter-test was refused" in proc.stdout + proc.stderr
    assert time.monotonic() - started < 30


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 448 KiB tmpfs: a real full disk (skipped where this machine refuses the mount)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=448k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.e2e
def test_real_full_disk_mid_transfer_leaves_nothing_behind(
    fleet: Fleet, kit, small_disk: Path
) -> None:
    """Two ~280 KB releases in one transfer: each fits the free space the endpoint checks
    up front, together they fill the disk mid-rsync (ENOSPC for real)."""
    data = yaml.safe_load(fleet.params.read_text())
    data["models"]["gemma_12b"] = {**data["models"]["gemma_4b"], "base_model": str(kit.base)}
    fleet.params.write_text(yaml.safe_dump(data))
    adapter = inflated_adapter(kit.good, small_disk.parent / "big", rank=12)
    ids = [version(fleet.store, fleet.params, adapter, 4, model=m) for m in MODELS_12_4]
    fleet.set_endpoint("ep1", adapter_dir=str(small_disk / "adapters"), min_free_bytes=0)
    proc = fleet.deploy("--cycle", "4", "--models", *MODELS_12_4, "--endpoints", "ep1")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "disk of" in proc.stderr and "is full" in proc.stderr, proc.stderr
    adapters = small_disk / "adapters"
    for model, vid in zip(MODELS_12_4, ids, strict=True):
        assert not (adapters / model / "active").exists()
        assert not (adapters / model / "releases" / vid).exists()
        landing = adapters / "incoming" / model / "releases" / vid
        assert not landing.exists()  # partials removed too
    again = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert again.returncode == 0, again.stdout + again.stderr  # the space came back


MODELS_12_4 = ("gemma_4b", "gemma_12b")


@pytest.mark.e2e
def test_damaged_release_is_never_rolled_back_to_and_a_redeploy_repairs_it(fleet: Fleet) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    for cycle in ("1", "2"):
        proc = fleet.deploy("--cycle", cycle, "--models", "gemma_4b", "--endpoints", "ep1")
        assert proc.returncode == 0, proc.stderr
    weights = fleet.endpoints["ep1"] / "gemma_4b" / "releases" / v1 / "adapter_model.safetensors"
    whole = weights.read_bytes()
    weights.chmod(0o644)
    weights.write_bytes(whole[: len(whole) // 2])  # truncated on the endpoint after transfer
    back = fleet.deploy("--rollback", "--models", "gemma_4b", "--endpoints", "ep1")
    assert back.returncode == 3, back.stdout + back.stderr
    assert f"{v1} is damaged on the endpoint" in back.stderr
    assert fleet.links("ep1") == (v2, v1)  # nothing changed
    assert v2 not in json.loads(_read(fleet.endpoints["ep1"] / "gemma_4b" / "bad.json", "{}"))
    again = fleet.deploy("--version", v1, "--models", "gemma_4b", "--endpoints", "ep1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert fleet.links("ep1")[0] == v1 and weights.read_bytes() == whole
    assert len(list((fleet.endpoints["ep1"] / "quarantine").iterdir())) == 1


def _read(path: Path, default: str) -> str:
    return path.read_text() if path.exists() else default


def test_rsync_missing_is_recognised_whichever_way_rsync_reports_it() -> None:
    """rsync says code 127 or code 12 for a missing remote rsync, depending on timing."""
    from adapter_deploy.deploy.remote import _rsync_missing

    shell = "bash: line 1: /opt/rsync: No such file or directory\n"
    assert _rsync_missing(
        12, shell + "rsync error: error in rsync protocol data stream", "/opt/rsync"
    )
    assert _rsync_missing(127, "rsync error: remote command not found (code 127)", "rsync")
    assert _rsync_missing(12, "sh: 1: rsync: not found\n", "rsync")
    receiver = 'rsync: [receiver] mkstemp "/a/.b" failed: No such file or directory (2)\n'
    assert not _rsync_missing(23, receiver, "rsync")  # a missing target dir, not rsync
