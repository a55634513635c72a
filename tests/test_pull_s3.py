"""Pulling over s3:// (issue #30): the DVC remote and the reports location on S3, through a
real S3 API on loopback (moto's server, bound to 127.0.0.1), reached with the same botocore
client dvc-s3 uses and the standard AWS settings (AWS_ENDPOINT_URL for a server not AWS's)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import test_pull
import yaml
from adapter_deploy.common.errors import RemoteError, UsageError
from adapter_deploy.config import load_params
from adapter_deploy.deploy.fleet_status import pulled_status, report_place
from adapter_deploy.kit.net import free_port
from adapter_deploy.store import pull_source
from adapter_deploy.store.pull_source import Desired, Place
from fixtures_repo import write_params

ROOT = Path(__file__).resolve().parents[1]
PULL_DOC = ROOT / "docs" / "pull.md"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@dataclass
class S3:
    url: str  # the server's endpoint URL
    bucket: str
    client: Any  # botocore's, as the operator's own tools would be

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def keys(self, prefix: str = "") -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listed.get("Contents", []))


def aws_env(monkeypatch: pytest.MonkeyPatch, tmp: Path, url: str) -> None:
    """Only these AWS settings: test keys, the loopback server, never ~/.aws or the
    instance metadata address."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3:
    import botocore.session

    aws_env(monkeypatch, tmp_path, s3_server)
    client = botocore.session.get_session().create_client("s3", endpoint_url=s3_server)
    bucket = f"dvc-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3(s3_server, bucket, client)


# --- Place over s3:// ------------------------------------------------------------------------


def test_an_s3_place_reads_copies_and_knows_a_missing_object(s3: S3, tmp_path: Path) -> None:
    big = os.urandom((2 << 20) + 123)  # more than one streamed chunk
    s3.put("dvc/files/md5/ab/cdef", b"hello")
    s3.put("dvc/files/md5/ab/big", big)
    root = Place.parse(f"s3://{s3.bucket}/dvc/", "DVC remote")
    assert (root.path, root.host, root.s3) == (f"s3://{s3.bucket}/dvc", None, True)
    obj = root.child("files", "md5", "ab", "cdef")
    assert obj.where == f"s3://{s3.bucket}/dvc/files/md5/ab/cdef"
    assert obj.read_text() == "hello"
    root.child("files", "md5", "ab", "big").copy_to(tmp_path / "big")
    assert (tmp_path / "big").read_bytes() == big
    bucket_root = Place.parse(f"s3://{s3.bucket}", "DVC remote").child("dvc", "files")
    assert bucket_root.child("md5", "ab", "cdef").read_text() == "hello"

    missing = root.child("files", "md5", "ab", "nothing")
    with pytest.raises(FileNotFoundError):
        missing.read_text()
    with pytest.raises(FileNotFoundError):
        missing.copy_to(tmp_path / "nothing")

    for url in ("s3:///dvc", "s3://Bad_Bucket/dvc", "s3://-x/dvc"):
        with pytest.raises(UsageError, match="is not an S3 bucket name"):
            Place.parse(url, "DVC remote")
    with pytest.raises(UsageError, match="git cannot fetch tags from S3") as err:
        pull_source.sync_tags(tmp_path / "mirror", f"s3://{s3.bucket}/git")
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="must be a path here"):
        pull_source.local_path(f"s3://{s3.bucket}/dvc", "DVC remote")


def test_the_report_object_is_written_whole_with_one_put(s3: S3) -> None:
    place = Place.parse(f"s3://{s3.bucket}/dvc/reports", "reports location").child("pa.json")
    calls: list[str] = []

    def seen(model: Any, **_: Any) -> None:
        calls.append(model.name)

    client = pull_source._s3_client(None)  # the one Place uses with these settings
    client.meta.events.register("before-call.s3", seen)
    try:
        place.write_atomic(b'{"result": "failed"}\n')
        place.write_atomic(b'{"result": "success"}\n')
    finally:
        client.meta.events.unregister("before-call.s3", seen)
    assert calls == ["PutObject", "PutObject"]  # no temp object, no copy, no rename
    assert s3.keys() == ["dvc/reports/pa.json"]
    assert json.loads(place.read_text()) == {"result": "success"}


def test_s3_failures_are_one_line_remote_errors(
    s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    no_bucket = Place.parse(f"s3://{s3.bucket}-gone/dvc", "DVC remote").child("x")
    with pytest.raises(RemoteError, match="does not exist") as err:
        no_bucket.read_text()
    assert err.value.exit_code == 3 and "\n" not in err.value.one_line()
    with pytest.raises(RemoteError, match="does not exist"):
        no_bucket.write_atomic(b"{}")

    place = Place.parse(f"s3://{s3.bucket}/dvc/x", "DVC remote")
    away = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", away)
    with pytest.raises(RemoteError, match=f"cannot read s3://{s3.bucket}/dvc/x at {away}") as err:
        place.read_text()
    assert err.value.exit_code == 3 and "AWS_ENDPOINT_URL" in err.value.one_line()
    # an explicit endpoint (make status: dvc's `endpointurl`) wins over the environment
    explicit = Place.parse(f"s3://{s3.bucket}/dvc", "DVC remote", endpoint_url=s3.url)
    with pytest.raises(FileNotFoundError):
        explicit.child("x").read_text()

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(RemoteError, match="no AWS credentials to read") as err:
        place.read_text()
    assert "AWS_PROFILE" in err.value.one_line()


def test_an_endpoint_finds_its_s3_server_and_keys_in_its_aws_files(
    s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the pull timer runs with: no AWS_* environment, only ~/.aws/config and
    ~/.aws/credentials (here at AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE)."""
    config, credentials = tmp_path / "aws-config", tmp_path / "aws-credentials"
    config.write_text(f"[default]\nregion = us-east-1\nendpoint_url = {s3.url}\n")
    credentials.write_text("[default]\naws_access_key_id = k\naws_secret_access_key = s\n")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    s3.put("dvc/reports/pa.json", b"{}")
    assert Place.parse(f"s3://{s3.bucket}/dvc/reports/pa.json", "r").read_text() == "{}"
    with pytest.raises(UsageError, match="the S3 endpoint URL is not usable"):
        Place.parse(f"s3://{s3.bucket}/dvc", "r", endpoint_url="not a url").read_text()


def _doc_policy(bucket: str, endpoint: str) -> dict:
    """The IAM policy docs/pull.md gives an endpoint, for this bucket and endpoint."""
    block = re.search(r"```json\n(.*?)```", PULL_DOC.read_text(), re.S)
    assert block, "docs/pull.md lost its IAM policy example"
    text = block.group(1).replace("my-bucket", bucket).replace("church-box", endpoint)
    return json.loads(text)


def test_the_documented_policy_reads_the_remote_and_writes_only_its_own_report(
    s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import botocore.session

    s3.put("dvc/files/md5/ab/cdef", b"hello")
    s3.put("dvc/reports/pb.json", b"{}")
    iam = botocore.session.get_session().create_client("iam", endpoint_url=s3.url)
    iam.create_user(UserName="pa")
    policy = _doc_policy(s3.bucket, "pa")
    iam.put_user_policy(UserName="pa", PolicyName="pull", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="pa")["AccessKey"]

    def enforce(count: str) -> None:  # moto checks IAM policies from now on ("inf": no more)
        url, headers = f"{s3.url}/moto-api/reset-auth", {"Content-Type": "text/plain"}
        request = urllib.request.Request(url, count.encode(), headers)
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    root = Place.parse(f"s3://{s3.bucket}/dvc", "DVC remote")
    enforce("0")
    try:
        assert root.child("files", "md5", "ab", "cdef").read_text() == "hello"
        root.child("reports", "pa.json").write_atomic(b'{"result": "success"}\n')
        for other in (("reports", "pb.json"), ("files", "md5", "ab", "cdef"), ("pa.json",)):
            with pytest.raises(RemoteError, match="access denied to write") as err:
                root.child(*other).write_atomic(b"{}")
            assert err.value.exit_code == 3 and "s3:PutObject" in err.value.one_line()
        with pytest.raises(RemoteError, match="access denied to read"):
            Place.parse(f"s3://{s3.bucket}/elsewhere/x", "DVC remote").read_text()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000")
        with pytest.raises(RemoteError, match="access denied to read"):
            root.child("files", "md5", "ab", "cdef").read_text()
    finally:
        enforce("inf")
    assert json.loads(root.child("reports", "pa.json").read_text()) == {"result": "success"}
    assert s3.client.get_object(Bucket=s3.bucket, Key="dvc/reports/pb.json")["Body"].read() == b"{}"


# --- fetch() from an S3 DVC remote ----------------------------------------------------------


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _upload_release(s3: S3, files: dict[str, bytes], prefix: str = "dvc") -> Desired:
    """A DVC remote's layout for one directory output: each file at files/md5/<2>/<30>, the
    listing at <md5>.dir; what the endpoint's stage tag would point at."""
    listing = json.dumps([{"md5": _md5(d), "relpath": n} for n, d in sorted(files.items())])
    dir_md5 = _md5(listing.encode())
    for data in files.values():
        md5 = _md5(data)
        s3.put(f"{prefix}/files/md5/{md5[:2]}/{md5[2:]}", data)
    s3.put(f"{prefix}/files/md5/{dir_md5[:2]}/{dir_md5[2:]}.dir", listing.encode())
    meta = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    return Desired("gemma_4b", "gemma_4b#pa#1", "0" * 40, "cycle1_x", 1, meta, None, dir_md5)


def test_fetch_copies_a_release_from_s3_and_refuses_a_damaged_or_missing_one(
    s3: S3, tmp_path: Path
) -> None:
    files = {"adapter_model.safetensors": os.urandom(50_000), "adapter_config.json": b"{}\n"}
    want = _upload_release(s3, files)
    remote = f"s3://{s3.bucket}/dvc"
    pull_source.fetch(remote, want, tmp_path / "release")
    got = {p.name: p.read_bytes() for p in (tmp_path / "release").iterdir()}
    assert got == files

    md5 = _md5(files["adapter_model.safetensors"])
    s3.put(f"dvc/files/md5/{md5[:2]}/{md5[2:]}", b"x" * 50_000)  # same size, other bytes
    with pytest.raises(RemoteError, match="adapter_model.safetensors from the DVC remote is dam"):
        pull_source.fetch(remote, want, tmp_path / "damaged")
    assert not (tmp_path / "damaged").exists()

    s3.client.delete_object(Bucket=s3.bucket, Key=f"dvc/files/md5/{md5[:2]}/{md5[2:]}")
    with pytest.raises(RemoteError, match=f"the DVC remote {remote} lacks gemma_4b cycle1_x"):
        pull_source.fetch(remote, want, tmp_path / "missing")
    other = _upload_release(s3, {"adapter_config.json": b"{}\n"}, prefix="elsewhere")
    with pytest.raises(RemoteError, match="lacks gemma_4b") as err:
        pull_source.fetch(remote, other, tmp_path / "never-pushed")
    assert err.value.exit_code == 3
    with pytest.raises(RemoteError, match="does not exist"):
        pull_source.fetch(f"s3://{s3.bucket}-gone/dvc", want, tmp_path / "no-bucket")


def test_make_status_reads_an_s3_report_at_dvc_s_endpointurl(
    s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    params_file = write_params(tmp_path / "params.yaml", tmp_path / "adapters")
    data = yaml.safe_load(params_file.read_text())
    data["store"].update(
        remote=f"s3://{s3.bucket}/dvc",
        remote_config={"endpointurl": s3.url},  # as `dvc remote modify ... endpointurl`
        git_remote=str(tmp_path / "remote.git"),
    )
    data["endpoints"] = {"pa": {"adapter_dir": str(tmp_path / "pa"), "mode": "pull"}}
    params_file.write_text(yaml.safe_dump(data))
    params = load_params(params_file)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the training machine: dvc's own setting only
    assert report_place(params, "pa").where == f"s3://{s3.bucket}/dvc/reports/pa.json"
    assert pulled_status(params, "pa")["reported"] == "never (pull mode)"
    report = {"reported_at": "2026-03-01T10:00:00Z", "result": "success", "models": {}}
    s3.put("dvc/reports/pa.json", json.dumps(report).encode())
    at = datetime(2026, 3, 1, 10, 4, tzinfo=UTC)
    assert pulled_status(params, "pa", at)["reported"] == "4 min ago: success"
    s3.put("dvc/reports/pa.json", b"not json")
    broken = pulled_status(params, "pa", at + timedelta(minutes=1))
    assert f"s3://{s3.bucket}/dvc/reports/pa.json is unreadable" in broken["error"]


# --- the end-to-end tier ---------------------------------------------------------------------


@pytest.mark.e2e
def test_dvc_pushes_to_s3_and_a_pulling_endpoint_deploys_from_it(
    s3: S3, signed_template, tmp_path: Path
) -> None:
    pulls = test_pull.Pulls(*signed_template, _LocalEndpoints(), tmp_path)
    remote = f"s3://{s3.bucket}/dvc"
    dvc = [sys.executable, "-m", "dvc"]
    for argv in (
        ["remote", "add", "s3", remote],
        ["remote", "modify", "s3", "endpointurl", s3.url],
        ["fetch", "--quiet", "-r", "local", "--all-tags"],  # every version into the cache
        ["push", "--quiet", "-r", "s3", "--all-tags"],
    ):
        done = subprocess.run([*dvc, *argv], cwd=pulls.store.repo, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    data = yaml.safe_load(pulls.params.read_text())
    data["store"].update(remote=remote, remote_config={"endpointurl": s3.url})
    pulls.params.write_text(yaml.safe_dump(data))

    v1 = pulls.versions["cycle1"]
    proc = pulls.run("promote.py", "--cycle", "1", *test_pull.GEMMA, "--endpoints", "pa", "--json")
    assert proc.returncode == 0, proc.stderr
    test_pull._trust(pulls, "pa")
    proc = pulls.pull("pa")  # the endpoint: AWS_ENDPOINT_URL and the test keys
    assert proc.returncode == 0, proc.stderr
    assert pulls.active("pa") == v1
    report = json.loads(Place.parse(remote, "r").child("reports", "pa.json").read_text())
    assert report["result"] == "success" and report["desired"] == {"gemma_4b": v1}
    listed = json.loads(pulls.run("status.py", "--json").stdout)["endpoints"]
    by_name = {e["endpoint"]: e for e in listed}
    assert by_name["pa"]["reported"].endswith("s ago: success"), by_name["pa"]

    # a version whose objects never reached the bucket: exit 3, the endpoint keeps v1
    v2 = pulls.versions["cycle2"]
    for key in s3.keys("dvc/files/md5/"):
        s3.client.delete_object(Bucket=s3.bucket, Key=key)
    proc = pulls.run("promote.py", "--cycle", "2", *test_pull.GEMMA, "--endpoints", "pa", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = pulls.pull("pa")
    assert proc.returncode == 3, proc.stderr
    assert pulls.active("pa") == v1
    report = json.loads(Place.parse(remote, "r").child("reports", "pa.json").read_text())
    assert f"the DVC remote {remote} lacks gemma_4b {v2}" in report["error"]


class _LocalEndpoints:
    """Stands in for the sshd fixture where Pulls' pushed endpoint is not used."""

    def endpoint(self, adapter_dir: Path) -> dict:
        return {"transport": "local", "adapter_dir": str(adapter_dir), "platform": "cpu"}
