"""Pull mode (issue #30): `make promote` records the desired state as GTO stage tags on a real
git remote (a bare repo), and pulling endpoints (temp dirs, the real agent) fetch the tags and
exactly the promoted release from the real local DVC remote, deploy it with the push deploy's
steps, and leave a report that `make status` reads without reaching them. A pushed endpoint
over the real sshd runs beside them in the same cycle."""

from __future__ import annotations

import json
import plistlib
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from adapter_deploy.common.errors import ConfigError
from adapter_deploy.common.fsutil import file_lock
from adapter_deploy.config import EndpointParams, load_params
from adapter_deploy.deploy.fleet_status import pulled_status
from adapter_deploy.deploy.service_install import pull_timer_files, start_script
from adapter_deploy.kit.net import free_port
from adapter_deploy.signing import generate
from adapter_deploy.store.stages import current
from fixtures_repo import Store, copy_store, run_script, run_script_here

GEMMA = ("--models", "gemma_4b")


# --- the default tier: settings and the stage-tag rule, no process started -----------------


def test_pull_settings_are_checked_and_push_commands_refuse_a_pulling_endpoint(
    store: Store,
) -> None:
    data = yaml.safe_load(store.params.read_text())
    data["store"]["remote"] = str(store.remote)
    data["endpoints"] = {"pushed": {"adapter_dir": "/tmp/y", "pull": {"interval_s": 5}}}
    store.params.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="endpoints.pushed has pull: settings but mode: push"):
        load_params(store.params)
    data["endpoints"] = {"box": {"adapter_dir": "/tmp/x", "mode": "pull"}}
    store.params.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"box \(mode: pull\) has no git remote") as err:
        load_params(store.params)
    assert "set store.git_remote" in err.value.one_line()
    data["store"]["git_remote"] = str(store.repo.parent / "remote.git")
    store.params.write_text(yaml.safe_dump(data))
    params = load_params(store.params)
    assert params.endpoints["box"].mode == "pull"
    assert pulled_status(params, "box")["reported"] == "never (pull mode)"
    report = {"reported_at": "2026-03-01T10:00:00Z", "result": "success", "models": {}}
    (store.remote / "reports").mkdir()
    (store.remote / "reports" / "box.json").write_text(json.dumps(report))
    at = datetime(2026, 3, 1, 10, 4, tzinfo=UTC)
    assert pulled_status(params, "box", at)["reported"] == "4 min ago: success"
    skewed = pulled_status(params, "box", at - timedelta(minutes=5))["reported"]
    assert skewed == "in the future (clock skew): success"

    before = store.state()
    for argv in (
        ("deploy_adapters.py", "--cycle", "1", *GEMMA, "--endpoints", "box"),
        ("deploy_adapters.py", "--rollback", "--endpoints", "box"),
        ("phase.py", "transfer", "--cycle", "1", "--endpoints", "box"),
    ):
        proc = run_script_here(*argv, params=store.params)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        assert "box pulls its releases (mode: pull)" in lines[-1]
        assert 'make promote CYCLE=N ENDPOINT="box"' in lines[-1]
    assert store.state() == before

    # GTO's rule: the highest number wins, an unassignment (`!`) withdraws
    tags = ["m#box#1", "m#box#3", "m#box!#2", "m#boxer#9", "m#box#x"]
    assert current(tags, "m", "box").tag == "m#box#3"
    assert current([*tags, "m#box!#4"], "m", "box") is None
    assert current(tags, "m", "other") is None


def test_service_install_gives_a_pulling_endpoint_a_jittered_timer() -> None:
    pulling = {"mode": "pull", "project_dir": "/srv/ad", "pull": {"interval_s": 120}}
    service, timer = pull_timer_files("box", EndpointParams(adapter_dir="/a", **pulling))
    assert "ExecStart=/srv/ad/.venv/bin/python /srv/ad/scripts/pull.py --params " in service.text
    assert "--endpoint box" in service.text and "Type=oneshot" in service.text
    assert "OnUnitActiveSec=120\nRandomizedDelaySec=24\n" in timer.text
    assert start_script(timer).endswith("enable --now adapter-pull.timer")
    (agent,) = pull_timer_files("mac", EndpointParams(adapter_dir="/a", platform="mlx", **pulling))
    plist = plistlib.loads(agent.text.encode())
    assert plist["StartInterval"] == 120 and plist["ProgramArguments"][-2:] == ["--jitter", "24"]


def test_only_a_refusal_that_is_the_release_s_own_marks_it_bad_here(tmp_path: Path) -> None:
    """A bad signature marks the version bad here; an expiry does not (it is judged by this
    machine's clock, which may be what is wrong), nor does a remote that was away."""
    from adapter_deploy.deploy.plan import EndpointOutcome, ModelOutcome
    from adapter_deploy.deploy.pull import _remember
    from adapter_deploy.store.pull_source import Desired

    errors = {
        "tampered": ("gemma_4b v2: signature does not match its metadata (tampered)", 2),
        "expired": ("gemma_4b v2: signed metadata expired at 2026-01-01T00:00:00Z (...)", 2),
        "away": ("cannot fetch ... from the DVC remote", 3),
    }
    for case, (error, code) in errors.items():
        want = Desired("gemma_4b", "gemma_4b#pa#2", "c0ffee", "v2", 2, {}, {}, "0" * 32)
        outcome = EndpointOutcome("pa")
        outcome.models.append(ModelOutcome("gemma_4b", "v2", "failed", error=error, exit_code=code))
        state: dict = {}
        _remember(tmp_path, state, {"gemma_4b": want}, outcome)
        assert bool(state["bad"]) == (case == "tampered"), case


# --- the end-to-end tier -------------------------------------------------------------------


class Pulls:
    """The store, its git remote (bare), two pulling endpoints (pa, pb) and a pushed one."""

    def __init__(self, template: Path, versions: dict[str, str], sshd, tmp: Path) -> None:
        self.store = copy_store(template, tmp)
        self.versions = versions
        self.git_remote = tmp / "remote.git"
        subprocess.run(["git", "init", "-q", "--bare", str(self.git_remote)], check=True)
        self.dirs = {name: tmp / name / "adapters" for name in ("pa", "pb", "ep1")}
        data = yaml.safe_load(self.store.params.read_text())
        data["store"].update(
            adapters_dir=str(self.store.adapters),
            remote=str(self.store.remote),
            git_remote=str(self.git_remote),
            signing_key=str(template / "keys" / "signing.pem"),
        )
        pulling = {"mode": "pull", "python": sys.executable, "platform": "cpu"}
        data["endpoints"] = {
            "pa": {**pulling, "adapter_dir": str(self.dirs["pa"])},
            "pb": {**pulling, "adapter_dir": str(self.dirs["pb"])},
            "ep1": sshd.endpoint(self.dirs["ep1"]),
        }
        self.params = self.store.params
        self.params.write_text(yaml.safe_dump(data))
        self.public_key = template / "keys" / "signing.pem.pub"

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess:
        return run_script(script, *args, params=self.params, timeout=240)

    def pull(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return self.run("pull.py", "--endpoint", name, "--json", *args)

    def active(self, name: str) -> str | None:
        link = self.dirs[name] / "gemma_4b" / "active"
        return link.resolve().name if link.is_symlink() else None

    def report(self, name: str) -> dict:
        return json.loads((self.store.remote / "reports" / f"{name}.json").read_text())

    def log(self, name: str) -> list[dict]:
        path = self.dirs[name] / "deploy_log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def pulls(signed_template, sshd, tmp_path: Path) -> Pulls:
    return Pulls(*signed_template, sshd, tmp_path)


def _trust(pulls: Pulls, name: str, key: Path | None = None) -> None:
    proc = pulls.run("pull.py", "--endpoint", name, "--trust", str(key or pulls.public_key))
    assert proc.returncode == 0 and f"{name} trusts signing key" in proc.stdout, proc.stderr


@pytest.mark.e2e
def test_promote_then_pull_beside_a_pushed_endpoint(pulls: Pulls, tmp_path: Path) -> None:
    v1 = pulls.versions["cycle1"]
    proc = pulls.run("promote.py", "--cycle", "1", *GEMMA, "--endpoints", "pa", "pb", "--json")
    assert proc.returncode == 0, proc.stderr
    promoted = json.loads(proc.stdout)["assignments"]
    assert {(a["endpoint"], a["tag"]) for a in promoted} == {
        ("pa", "gemma_4b#pa#1"),
        ("pb", "gemma_4b#pb#1"),
    }
    assert not pulls.dirs["pa"].exists()  # nothing was sent to an endpoint
    again = pulls.run("promote.py", "--cycle", "1", *GEMMA, "--endpoints", "pa", "--json")
    assert json.loads(again.stdout)["assignments"][0]["tag"] is None  # already assigned

    # stock gto reads the desired state from a clone of the git remote
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(pulls.git_remote), str(clone)], check=True)
    subprocess.run(["git", "fetch", "-q", "--tags"], cwd=clone, check=True)
    gto = Path(sys.executable).with_name("gto")
    shown = subprocess.run(
        [str(gto), "show", "gemma_4b", "--json"], cwd=clone, capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    shown_text = json.dumps(json.loads(shown.stdout))
    assert '"ref": "gemma_4b#pa#1"' in shown_text and '"ref": "gemma_4b#pb#1"' in shown_text
    assert '"ref": "gemma_4b@v1.0.0"' in shown_text

    # the pushed endpoint in the same cycle, as always; a push to a pulling one is refused
    pushed = pulls.run("deploy_adapters.py", "--cycle", "1", *GEMMA, "--endpoints", "ep1")
    assert pushed.returncode == 0, pushed.stderr
    refused = pulls.run("deploy_adapters.py", "--cycle", "1", *GEMMA, "--endpoints", "pa")
    assert refused.returncode == 2 and "make promote" in refused.stderr

    refused = pulls.pull("pa")  # no trusted key: a pulling endpoint takes signed releases only
    assert refused.returncode == 2, refused.stderr
    assert "trusts no signing key" in json.loads(refused.stdout)["outcome"]["error"]
    assert pulls.active("pa") is None
    assert "trusts no signing key" in pulls.report("pa")["error"]

    _trust(pulls, "pa")
    proc = pulls.pull("pa")
    assert proc.returncode == 0, proc.stderr
    assert pulls.active("pa") == v1
    entry = pulls.log("pa")[-1]
    assert entry["action"] == "pull" and entry["status"] == "success", entry
    assert entry["phases_completed"] == ["transfer", "health_check", "activate", "verify"]
    status = json.loads((pulls.dirs["pa"] / "status.json").read_text())
    assert status["models"]["gemma_4b"]["active_version"] == v1
    report = pulls.report("pa")
    assert report["result"] == "success" and report["desired"] == {"gemma_4b": v1}
    assert report["models"]["gemma_4b"]["active_version"] == v1
    assert not (pulls.dirs["pa"] / ".pull" / "cache" / "gemma_4b").exists()

    again = pulls.pull("pa")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["outcome"]["models"][0]["status"] == "unchanged"

    listed = json.loads(pulls.run("status.py", "--json").stdout)["endpoints"]
    by_name = {e["endpoint"]: e for e in listed}
    assert by_name["pa"]["reported"].endswith("s ago: unchanged"), by_name["pa"]
    assert by_name["pa"]["models"]["gemma_4b"]["active_version"] == v1
    assert by_name["pb"]["reported"] == "never (pull mode)"
    assert by_name["ep1"]["models"]["gemma_4b"]["active_version"] == v1
    table = pulls.run("status.py").stdout
    assert "s ago: unchanged" in table and "live" in table


@pytest.mark.e2e
def test_a_version_that_fails_here_is_not_retried_until_a_newer_one(pulls: Pulls) -> None:
    v1, v2, v3 = (pulls.versions[f"cycle{n}"] for n in (1, 2, 3))
    _trust(pulls, "pa")
    for cycle in ("1", "3"):
        assert pulls.run("promote.py", "--cycle", cycle, "--endpoints", "pa").returncode == 0
        pulled = pulls.pull("pa")
    assert pulled.returncode == 4, pulled.stdout + pulled.stderr  # cycle 3 fails its pre-check
    assert pulls.active("pa") == v1
    assert pulls.report("pa")["result"] == "aborted"
    assert "pre-activation health check failed" in pulls.report("pa")["error"]

    skipped = pulls.pull("pa")
    assert skipped.returncode == 0, skipped.stderr
    note = json.loads(skipped.stdout)["notes"]["gemma_4b"]
    assert note.startswith(f"{v3} failed here") and "newer version is promoted" in note
    assert [e["status"] for e in pulls.log("pa")][-1] == "success"  # nothing was tried

    assert pulls.run("promote.py", "--cycle", "2", "--endpoints", "pa").returncode == 0
    assert pulls.pull("pa").returncode == 0
    assert pulls.active("pa") == v2


@pytest.mark.e2e
def test_pull_failures_keep_the_last_good_release_and_say_why(pulls: Pulls, tmp_path) -> None:
    v1 = pulls.versions["cycle1"]
    _trust(pulls, "pa")
    assert pulls.run("promote.py", "--cycle", "1", "--endpoints", "pa").returncode == 0
    assert pulls.pull("pa").returncode == 0 and pulls.active("pa") == v1
    assert pulls.run("promote.py", "--cycle", "2", "--endpoints", "pa").returncode == 0

    # the git remote is away: nothing changes, the report says why, retried next time
    moved = pulls.git_remote.with_name("away.git")
    pulls.git_remote.rename(moved)
    down = pulls.pull("pa")
    assert down.returncode == 3, down.stderr
    report = pulls.report("pa")
    assert "cannot fetch the desired state from the git remote" in report["error"]
    assert report["models"]["gemma_4b"]["active_version"] == v1  # what still runs here
    moved.rename(pulls.git_remote)

    # the DVC remote lacks the promoted version: refused, not marked bad
    objects = pulls.store.remote / "files"
    shutil.move(objects, tmp_path / "objects")
    lacking = pulls.pull("pa")
    assert lacking.returncode == 3, lacking.stderr
    assert f"lacks gemma_4b {pulls.versions['cycle2']}" in pulls.report("pa")["error"]
    assert pulls.active("pa") == v1
    shutil.move(tmp_path / "objects", objects)

    # a half-written object on the DVC remote (a push cut off): refused, nothing half-fetched
    # becomes a release, and the version is not marked bad: the next pull retries it
    weights = _remote_object(pulls, "cycle2", "adapter_model.safetensors")
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    damaged = pulls.pull("pa")
    assert damaged.returncode == 3, damaged.stderr
    assert "from the DVC remote is damaged" in pulls.report("pa")["error"]
    assert pulls.active("pa") == v1
    assert not (pulls.dirs["pa"] / "gemma_4b" / "releases" / pulls.versions["cycle2"]).exists()
    weights.write_bytes(whole)

    # two pulls at once: the second exits at once, naming the first
    with file_lock(pulls.dirs["pa"] / ".pull" / "lock", "pull by the timer", "pull on pa"):
        second = pulls.run("pull.py", "--endpoint", "pa")
    assert second.returncode == 7, second.stderr
    assert "pull on pa is locked by pull by the timer" in second.stderr

    # a key it does not trust signed this release: refused before it can become a release
    (pulls.dirs["pa"] / "trusted_keys").rename(tmp_path / "old_keys")
    other = tmp_path / "other" / "key.pem"
    generate(other)
    _trust(pulls, "pa", Path(str(other) + ".pub"))
    wrong = pulls.pull("pa")
    assert wrong.returncode == 2, wrong.stderr
    assert "untrusted key" in pulls.report("pa")["error"]
    assert pulls.active("pa") == v1
    assert not (pulls.dirs["pa"] / "gemma_4b" / "releases" / pulls.versions["cycle2"]).exists()


def _remote_object(pulls: Pulls, cycle: str, name: str) -> Path:
    """Where the DVC remote keeps file `name` of `cycle`'s version (through its dir listing)."""
    dvc_file = pulls.store.adapters / "gemma_4b" / f"{pulls.versions[cycle]}.dvc"
    dir_md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    objects = pulls.store.remote / "files" / "md5"
    listing = json.loads((objects / dir_md5[:2] / dir_md5[2:]).read_text())
    md5 = next(e["md5"] for e in listing if e["relpath"] == name)
    return objects / md5[:2] / md5[2:]


@pytest.mark.e2e
def test_a_pulling_endpoint_hot_reloads_its_real_service_and_verifies_through_it(
    pulls: Pulls, tmp_path: Path
) -> None:
    v1, v2 = pulls.versions["cycle1"], pulls.versions["cycle2"]
    _trust(pulls, "pb")
    assert pulls.run("promote.py", "--cycle", "1", "--endpoints", "pb").returncode == 0
    assert pulls.pull("pb").returncode == 0 and pulls.active("pb") == v1
    url, pid = f"http://127.0.0.1:{free_port()}", tmp_path / "serve.pid"
    data = yaml.safe_load(pulls.params.read_text())
    data["endpoints"]["pb"].update(
        reload_method="sigusr1", service_url=url, pidfile=str(pid), models=["gemma_4b"]
    )
    pulls.params.write_text(yaml.safe_dump(data))
    started = pulls.run("service.py", "start", "--endpoint", "pb")
    assert started.returncode == 0, started.stderr
    try:
        deadline = time.monotonic() + 90
        while _get(f"{url}/health") != 200:
            assert time.monotonic() < deadline, "the service never became healthy"
            time.sleep(0.1)
        assert pulls.run("promote.py", "--cycle", "2", "--endpoints", "pb").returncode == 0
        proc = pulls.pull("pb")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        model = json.loads(proc.stdout)["outcome"]["models"][0]
        post = model["health"]["post_activation"]
        assert post["all_passed"] and post["release"]["version_id"] == v2, post
        assert model["health"]["pre_activation"]["via"] == "service"
        assert pulls.report("pb")["models"]["gemma_4b"]["active_version"] == v2
    finally:
        pulls.run("service.py", "stop", "--endpoint", "pb")


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except OSError:
        return 0


@pytest.mark.e2e
def test_a_pulling_endpoint_reaches_both_remotes_over_ssh_with_host_keys_checked(
    pulls: Pulls, sshd, tmp_path: Path
) -> None:
    v1 = pulls.versions["cycle1"]
    data = yaml.safe_load(pulls.params.read_text())
    data["endpoints"]["pb"].update(
        ssh_config=str(sshd.ssh_config),
        pull={
            "git_remote": f"ssh://{sshd.host_alias}{pulls.git_remote}",
            "dvc_remote": f"ssh://{sshd.host_alias}{pulls.store.remote}",
        },
    )
    pulls.params.write_text(yaml.safe_dump(data))
    _trust(pulls, "pb")
    assert pulls.run("promote.py", "--cycle", "1", "--endpoints", "pb").returncode == 0
    proc = pulls.pull("pb")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pulls.active("pb") == v1
    assert json.loads(proc.stdout)["report_at"].startswith(f"{sshd.host_alias}:")
    assert pulls.report("pb")["result"] == "success"  # left over ssh, read here as a path

    # a host whose key this endpoint's known_hosts does not hold: refused, nothing fetched
    stranger = tmp_path / "ssh_config"
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    stranger.write_text(sshd.ssh_config.read_text().replace(str(sshd.known_hosts), str(empty)))
    data["endpoints"]["pb"]["ssh_config"] = str(stranger)
    pulls.params.write_text(yaml.safe_dump(data))
    assert pulls.run("promote.py", "--cycle", "2", "--endpoints", "pb").returncode == 0
    refused = pulls.pull("pb")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert f"host key of {sshd.host_alias} is unknown or has changed" in refused.stderr
    assert pulls.active("pb") == v1


@pytest.mark.e2e
def test_a_pull_killed_mid_way_leaves_a_serving_endpoint_and_the_next_pull_finishes(
    pulls: Pulls, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2 = pulls.versions["cycle1"], pulls.versions["cycle2"]
    _trust(pulls, "pa")
    assert pulls.run("promote.py", "--cycle", "1", "--endpoints", "pa").returncode == 0
    assert pulls.pull("pa").returncode == 0
    assert pulls.run("promote.py", "--cycle", "2", "--endpoints", "pa").returncode == 0
    for point, serving in (("deploy.after_transfer", v1), ("deploy.after_activate", v2)):
        monkeypatch.setenv("ADAPTER_DEPLOY_FAILPOINT", point)
        killed = pulls.pull("pa")
        assert killed.returncode == -9, killed.stderr  # kill -9, as an operator's
        assert pulls.active("pa") == serving
    monkeypatch.delenv("ADAPTER_DEPLOY_FAILPOINT")
    # the lock died with the killed pull; the next pull verifies what it left active
    proc = pulls.pull("pa")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pulls.active("pa") == v2
    report = pulls.report("pa")
    assert report["result"] == "success"
    assert report["models"]["gemma_4b"]["verified"] == v2


@pytest.mark.e2e
def test_an_endpoint_whose_clock_is_behind_deploys_and_says_so(
    pulls: Pulls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clock skew is relative: the training machine's clock two days ahead (git's own
    GIT_COMMITTER_DATE on its promote) is this endpoint's two days behind. The pull still
    deploys, says so, and `make status` (by the training machine's clock) puts the age right."""
    v2, skew = pulls.versions["cycle2"], timedelta(days=2)
    _trust(pulls, "pa")
    monkeypatch.setenv(
        "GIT_COMMITTER_DATE", f"@{int((datetime.now(UTC) + skew).timestamp())} +0000"
    )
    assert pulls.run("promote.py", "--cycle", "2", "--endpoints", "pa").returncode == 0
    monkeypatch.delenv("GIT_COMMITTER_DATE")
    proc = pulls.pull("pa")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert pulls.active("pa") == v2
    assert "this machine's clock is at least" in proc.stderr
    assert pulls.report("pa")["clock_behind_s"] > 47 * 3600
    training_now = datetime.now(UTC) + skew
    reported = pulled_status(load_params(pulls.params), "pa", training_now)["reported"]
    assert reported.split(" s ago ")[0].isdigit(), reported  # seconds, not two days
    assert "(its clock >= 4" in reported and "h behind): success" in reported, reported
