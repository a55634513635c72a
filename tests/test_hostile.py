"""Security and reliability round 2: each attack or fault reproduced, each held."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from adapter_deploy import protocol as p
from adapter_deploy.common.errors import UsageError
from adapter_deploy.common.names import check_file_names, check_name, check_version_id
from adapter_deploy.config import load_params
from adapter_deploy.deploy.remote import Session, connect
from fixtures_fleet import Fleet, agent_wrapper
from fixtures_repo import ROOT, run_script, run_script_here


@pytest.mark.parametrize("value", ["gemma_4b\n", "gemma_4b\nx", "ep1\n"])
def test_names_with_a_trailing_newline_are_refused(value: str) -> None:
    with pytest.raises(UsageError):
        check_name("model", value)


def test_version_ids_with_a_trailing_newline_are_refused() -> None:
    check_version_id("cycle1_20260101_abcdef12")
    with pytest.raises(UsageError):
        check_version_id("cycle1_20260101_abcdef12\n")


@pytest.mark.parametrize(
    "name", ["../../../../outside.txt", "/etc/passwd", "a/b", "..", ".hidden", "x\x00y", ""]
)
def test_release_file_names_must_be_plain(name: str) -> None:
    with pytest.raises(UsageError, match="release file names refused"):
        check_file_names({name: {"sha256": "0" * 64, "size": 1}})


def test_endpoint_refuses_a_file_name_outside_the_release(fleet: Fleet, tmp_path: Path) -> None:
    """The endpoint itself checks: a crafted request over a real session writes nothing."""
    params = load_params(fleet.params)
    outside = fleet.endpoints["ep1"].parent / "outside.txt"
    files = {"../../../../outside.txt": {"sha256": "0" * 64, "size": 1}}
    version_id = fleet.versions["cycle1"]
    with tempfile.TemporaryDirectory() as control:
        conn = connect("ep1", params.endpoint("ep1"), Path(control))
        session = Session(conn, str(fleet.endpoints["ep1"]))
        try:
            for request in (
                p.Prepare("gemma_4b", version_id, files, 1),
                p.Stage("gemma_4b", version_id, files),
            ):
                with pytest.raises(UsageError, match="release file names refused"):
                    session.call(request)
        finally:
            session.close()
            conn.close()
    assert not outside.exists()
    assert not (fleet.endpoints["ep1"] / "gemma_4b" / "files.json").exists()


@pytest.mark.e2e
def test_one_endpoints_bug_does_not_stop_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    """ep1's agent answers hello with a malformed reply; ep2 still deploys, and the run is
    logged for both."""
    broken = agent_wrapper(
        tmp_path,
        "import adapter_deploy.agent.operations as o; "
        "o.EndpointSide.hello = lambda self, req: {'models': 42}",
    )
    fleet.set_endpoint("ep1", python=str(broken))
    args = ("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1", "ep2", "--json")
    proc = fleet.deploy(*args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected error" in proc.stderr
    outcome = {e["endpoint"]: e for e in json.loads(proc.stdout)["endpoints"]}
    assert outcome["ep1"]["exit_code"] == 1 and outcome["ep2"]["exit_code"] == 0
    assert fleet.links("ep2")[0] == fleet.versions["cycle1"]
    assert fleet.links("ep1") == (None, None)
    logged = {e["endpoint"]: e["status"] for e in fleet.log()}
    assert logged == {"ep1": "failed", "ep2": "success"}
    assert sys.executable  # the wrapper ran the real agent with the real interpreter


def test_a_private_key_inside_the_repo_must_be_gitignored(fleet: Fleet) -> None:
    repo = fleet.store.repo
    for relative, expect in (("signing.pem", 2), ("keys/signing.pem", 0)):
        data = yaml.safe_load(fleet.params.read_text())
        data["store"]["signing_key"] = relative
        fleet.params.write_text(yaml.safe_dump(data))
        if expect == 0:
            (repo / ".gitignore").write_text("keys/\n")
        proc = run_script("keygen.py", params=fleet.params)
        assert proc.returncode == expect, proc.stderr
        assert (repo / relative).exists() == (expect == 0)
    assert (
        "inside the git repository"
        in run_script("keygen.py", "--out", str(repo / "k.pem"), params=fleet.params).stderr
    )
    assert "keys/" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.e2e
def test_state_files_of_the_wrong_shape_fail_closed(fleet: Fleet) -> None:
    v1, v2 = fleet.versions["cycle1"], fleet.versions["cycle2"]
    for cycle in ("1", "2"):
        proc = fleet.deploy("--cycle", cycle, "--models", "gemma_4b", "--endpoints", "ep1")
        assert proc.returncode == 0, proc.stderr
    model_dir = fleet.endpoints["ep1"] / "gemma_4b"
    # bad.json guards rollbacks: unreadable means no rollback at all, never "nothing is bad".
    (model_dir / "bad.json").write_text("[]")
    rollback = ("--rollback", "--endpoints", "ep1", "--models", "gemma_4b")
    proc = fleet.deploy(*rollback)
    assert proc.returncode == 2 and "bad.json is corrupt" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and fleet.links("ep1") == (v2, v1)
    (model_dir / "bad.json").write_text("{}")
    # The endpoint's status.json as a list: a clear error naming it, not an AttributeError.
    status = fleet.endpoints["ep1"] / "status.json"
    whole = status.read_text()
    status.write_text("[]")
    proc = run_script("status.py", "--endpoints", "ep1", params=fleet.params)
    assert proc.returncode == 2 and "status.json is corrupt" in proc.stdout + proc.stderr
    status.write_text(whole)
    # A stray line in the deploy log is skipped with a warning; the log stays usable.
    with (fleet.store.adapters / "deploy_log.jsonl").open("a") as log:
        log.write("42\n")
    proc = fleet.deploy("--rollback")  # bare: undo the last deploy in the log
    assert proc.returncode == 0, proc.stderr
    assert "not JSON objects" in proc.stderr and fleet.links("ep1")[0] == v1


def test_a_torn_accepted_record_refuses_signed_releases(tmp_path: Path) -> None:
    from adapter_deploy.agent import trust
    from adapter_deploy.agent.releases import ModelReleases
    from adapter_deploy.common.errors import CorruptState

    kept = ModelReleases(tmp_path, "gemma_4b")
    kept.root.mkdir(parents=True)
    (kept.root / "accepted.json").write_text('{"version_id": "cycle2_2026')
    signed = {"version_id": "cycle1_20260101_abcdef12", "cycle": 1, "created": "x"}
    with pytest.raises(CorruptState, match="accepted.json is corrupt"):
        trust.check_not_older(kept, signed, None)


def test_endpoint_paths_that_a_shell_would_read_are_refused(tmp_path: Path) -> None:
    for key, value in (
        ("adapter_dir", "/tmp/`touch /tmp/pwned`"),
        ("project_dir", "/srv/$(id)"),
        ("python", "python3; rm -rf ~"),
        ("adapter_dir", "-e sh"),
        ("adapter_dir", "~root/x"),
    ):
        endpoint = {"adapter_dir": "/srv/adapters", key: value}
        path = tmp_path / "p.yaml"
        path.write_text(
            yaml.safe_dump({"models": {"m": {"base_model": "b"}}, "endpoints": {"e": endpoint}})
        )
        proc = run_script_here("versions.py", params=path)
        assert proc.returncode == 2 and f"endpoints.e.{key}" in proc.stderr, (key, proc.stderr)
    assert not Path("/tmp/pwned").exists()


def test_a_home_relative_path_is_the_endpoints_home_not_a_literal_tilde() -> None:
    from adapter_deploy.config import EndpointParams

    ep = EndpointParams(adapter_dir="~/adapters", project_dir="~/adapter-deploy", host="h")
    conn = connect("e", ep, Path("/tmp"))
    assert conn.remote_path("~/adapters") == "adapters"  # ssh starts in the home directory
    assert conn.remote_path("~") == "." and conn.remote_path("/abs/x") == "/abs/x"
    assert conn.endpoint_python() == "adapter-deploy/.venv/bin/python"
    local = connect("e", EndpointParams(adapter_dir="~/a", transport="local"), Path("/tmp"))
    assert local.remote_path("~/a") == str(Path.home() / "a")


@pytest.mark.e2e
def test_symlinks_never_enter_a_release(fleet: Fleet, tmp_path: Path) -> None:
    """A store whose files are symlinks (DVC cache.type symlink) sends the files' contents;
    a symlink that does arrive is refused at verification, and nothing is changed through it."""
    from adapter_deploy.agent.releases import file_problems
    from adapter_deploy.common.fsutil import sha256_file

    v1 = fleet.versions["cycle1"]
    local = fleet.store.adapters / "gemma_4b" / v1 / "adapter_model.safetensors"
    cache = tmp_path / "dvc-cache-file"
    local.replace(cache)
    local.symlink_to(cache)
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 0, proc.stderr
    staged = fleet.endpoints["ep1"] / "gemma_4b" / "releases" / v1 / "adapter_model.safetensors"
    assert staged.is_file() and not staged.is_symlink()
    # A symlink (or a hard link) in a transfer is never verified through.
    landing = tmp_path / "incoming"
    landing.mkdir()
    (landing / "adapter_model.safetensors").symlink_to(cache)
    info = {"sha256": sha256_file(cache), "size": cache.stat().st_size}
    assert file_problems(landing, {"adapter_model.safetensors": info}) == [
        "adapter_model.safetensors: a symlink, not the file's contents"
    ]
    (landing / "adapter_model.safetensors").unlink()
    os.link(cache, landing / "adapter_model.safetensors")
    assert "hard-linked" in file_problems(landing, {"adapter_model.safetensors": info})[0]
    assert cache.stat().st_mode & 0o222  # the store's file was never made read-only


@pytest.mark.e2e
def test_a_compat_link_name_taken_by_a_real_folder_changes_nothing(fleet: Fleet) -> None:
    adapter_dir = fleet.endpoints["ep1"]
    v1 = fleet.versions["cycle1"]
    proc = fleet.deploy("--cycle", "1", "--models", "gemma_4b", "--endpoints", "ep1")
    assert proc.returncode == 0, proc.stderr
    link = adapter_dir.parent / "fine_tuned_gemma_mi_A"
    link.unlink()
    link.mkdir()  # the app's old adapter folder, with the user's files in it
    (link / "adapter_model.safetensors").write_bytes(b"the user's old weights")
    for _ in range(2):  # a retry changes nothing either
        proc = fleet.deploy("--cycle", "2", "--models", "gemma_4b", "--endpoints", "ep1")
        assert proc.returncode == 2, proc.stderr
        assert "is taken by a real directory" in proc.stderr
        assert fleet.links("ep1") == (v1, None)
    assert (link / "adapter_model.safetensors").read_bytes() == b"the user's old weights"
    assert not list(adapter_dir.parent.glob(".*tmp-*")) and not list(adapter_dir.rglob(".*tmp-*"))
    status = json.loads((adapter_dir / "status.json").read_text())
    assert status["models"]["gemma_4b"]["active_version"] == v1


@pytest.mark.e2e
def test_a_failed_dvc_push_is_a_remote_failure(store, tmp_path: Path) -> None:
    """The DVC remote is away (a file where its folder should be): exit 3, not usage."""
    from fixtures_repo import dvc, make_adapter

    blocked = tmp_path / "remote-is-a-file"
    blocked.write_text("not a folder")
    dvc(store.repo, "remote", "add", "-f", "-d", "away", str(blocked / "store"))
    src = make_adapter(tmp_path / "adapter")
    proc = run_script(
        "version.py", "--model", "gemma_4b", "--cycle", "1", "--src", str(src), params=store.params
    )
    assert proc.returncode == 3, proc.stderr
    assert "dvc push failed" in proc.stderr and "DVC remote" in proc.stderr


# --- issue #27 hole 7: the landing path and a release dir are real directories -------------

VID = "cycle1_20260101_abcdef12"
WEIGHTS = b"the release's weights"


def _landing_side(tmp_path: Path, below: str = ""):
    """An endpoint's agent on a fresh adapter_dir, the files of one small release, and a
    directory outside the endpoint holding those very files at `below` (the rest of a
    landing path a planted link would be followed into)."""
    from adapter_deploy.agent.operations import EndpointSide
    from adapter_deploy.common.fsutil import sha256_file

    adapter_dir = tmp_path / "adapters"
    adapter_dir.mkdir()
    outside = tmp_path / "outside"
    (outside / below).mkdir(parents=True)
    weights = outside / below / "adapter_model.safetensors"
    weights.write_bytes(WEIGHTS)
    files = {"adapter_model.safetensors": {"sha256": sha256_file(weights), "size": len(WEIGHTS)}}
    return EndpointSide(adapter_dir), adapter_dir, outside, files


def _tree(root: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every path under root (root included) with its mode and a file's contents."""
    paths = [root, *sorted(root.rglob("*"))]
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.read_bytes() if p.is_file() else None)
        for p in paths
    }


LANDING_PATH = ("incoming", "gemma_4b", "releases", VID)


@pytest.mark.parametrize("depth", [1, 2, 3, 4], ids=LANDING_PATH)
def test_a_symlinked_landing_path_is_refused_and_the_outside_dir_is_untouched(
    tmp_path: Path, depth: int
) -> None:
    """A symlink to a directory outside the endpoint planted at the landing dir
    incoming/<model>/releases/<id> (or at any dir above it under adapter_dir): prepare,
    stage and drop refuse before claiming, renaming, chmodding or removing anything, and
    nothing becomes a release or active."""
    from adapter_deploy.common.errors import RemoteError

    below = "/".join(LANDING_PATH[depth:])
    side, adapter_dir, outside, files = _landing_side(tmp_path, below)
    link = adapter_dir.joinpath(*LANDING_PATH[:depth])
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    before = _tree(outside)
    requests = [
        p.Prepare("gemma_4b", VID, files, size=len(WEIGHTS)),
        p.Stage("gemma_4b", VID, files),
        p.DropIncoming("gemma_4b", VID),
    ]
    for request in requests:
        with pytest.raises(RemoteError, match="is a symlink") as refused:
            side.handle(request)
        assert str(link) in refused.value.message and "nothing was claimed" in refused.value.message
        assert "remove" in refused.value.fix
    with pytest.raises(UsageError, match="not a verified release"):
        side.handle(p.Activate("gemma_4b", VID))
    assert _tree(outside) == before  # the outside dir's modes and contents are untouched
    assert link.is_symlink()
    release = adapter_dir / "gemma_4b" / "releases" / VID
    assert not release.exists() and not release.is_symlink()
    assert not (adapter_dir / "gemma_4b" / "active").is_symlink()


def test_a_symlink_in_releases_is_never_a_release(tmp_path: Path) -> None:
    """releases/<id> is made by the agent's own rename: a link there is refused at stage
    (its chmod and quarantine would follow it) and at activate."""
    from adapter_deploy.common.errors import RemoteError

    side, adapter_dir, outside, files = _landing_side(tmp_path)
    release = adapter_dir / "gemma_4b" / "releases" / VID
    release.parent.mkdir(parents=True)
    release.symlink_to(outside)
    before = _tree(outside)
    with pytest.raises(RemoteError, match="is a symlink"):
        side.handle(p.Stage("gemma_4b", VID, files))
    with pytest.raises(UsageError, match="not a verified release"):
        side.handle(p.Activate("gemma_4b", VID))
    assert _tree(outside) == before
    assert not (adapter_dir / "gemma_4b" / "active").is_symlink()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_an_rsync_partial_entry_never_stays_in_a_release(tmp_path: Path, kind: str) -> None:
    """`.rsync-partial` is rsync's partial dir (--partial-dir): staging removes it whatever
    it is, never through a link, and a kept release holding one is not intact."""
    from adapter_deploy.agent.releases import RSYNC_PARTIAL, ModelReleases, file_problems

    side, adapter_dir, outside, files = _landing_side(tmp_path)
    prep = side.handle(p.Prepare("gemma_4b", VID, files, size=len(WEIGHTS)))
    incoming = Path(prep["incoming"])
    (incoming / "adapter_model.safetensors").write_bytes(WEIGHTS)
    if kind == "file":
        (incoming / RSYNC_PARTIAL).write_bytes(b"not rsync's")
    else:
        (incoming / RSYNC_PARTIAL).symlink_to(outside)
    before = _tree(outside)
    assert side.handle(p.Stage("gemma_4b", VID, files))["result"] == "staged"
    release = ModelReleases(adapter_dir, "gemma_4b").release(VID)
    assert sorted(x.name for x in release.iterdir()) == ["adapter_model.safetensors"]
    assert _tree(outside) == before
    # One left in a kept release (by an older agent) makes it damaged: sent and checked again.
    release.chmod(0o755)
    (release / RSYNC_PARTIAL).write_bytes(b"left behind")
    assert file_problems(release, files) == [f"{RSYNC_PARTIAL}: not in the manifest"]
    assert side.handle(p.Prepare("gemma_4b", VID, files, size=len(WEIGHTS)))["damaged"]
