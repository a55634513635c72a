"""Benchmark: the deployer's CPU cost per endpoint as a fleet grows (1, 4, 8, 16 endpoints).

Usage:
    python bench/bench_fleet.py [--sizes 1 4 8 16] [--mb 10]

Deploys one synthetic adapter (--mb MB) over loopback ssh to N fresh endpoints at once
(release.parallel = N), then deploys it again unchanged, through the project's own code: the
steps of deploy/fleet.py's deploy_endpoint (hello, one rsync, sha256-verified staging,
activate, record verified) without the health checks, which run on the endpoints.

What is counted is the deployer's side only, as it would be with real endpoints on other
machines: this process (RUSAGE_SELF), its reaped children (RUSAGE_CHILDREN: rsync senders,
their ssh clients, the session's ssh client) and the backgrounded ssh ControlMaster of each
endpoint (read from /proc before it is closed; ssh detaches it, so it is nobody's child).
The endpoint side (sshd's per-connection processes, the agent, the receiving rsync) runs
under the sshd this process started but does not reap until the end, so it never enters
RUSAGE_CHILDREN. Prints per-endpoint CPU for each N, its growth from 1 to 16, then BENCH
lines (goals: linear growth, i.e. per-endpoint CPU at 16 within 1.5x of 1; an unchanged
re-deploy under 0.1 CPU s per endpoint). Figures only: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from adapter_deploy import protocol as p
from adapter_deploy.config import Params, load_params
from adapter_deploy.deploy import fleet, records
from adapter_deploy.deploy.plan import EndpointOutcome, ModelOutcome, Release
from adapter_deploy.deploy.remote import SshConnection
from adapter_deploy.kit.sshd import SSHServer, running_sshd
from bench_deploy import MB, make_releases

GROWTH_GOAL, REDEPLOY_GOAL = 1.5, 0.1
_TICK = os.sysconf("SC_CLK_TCK")


def deployer_cpu() -> float:
    """CPU seconds of this process and every child it has reaped so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def master_cpu(control_path: Path) -> float:
    """CPU seconds of the ssh ControlMaster serving `control_path` (0 when none runs)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if str(control_path).encode() not in cmdline or b"[mux]" not in cmdline:
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return 0.0


class MasterMeter:
    """Adds each endpoint's ControlMaster CPU, read just before the connection closes (inside
    the run, where its control socket still exists); the /proc scan's own CPU is left out."""

    def __init__(self) -> None:
        self.original = SshConnection.close
        self.masters = 0.0
        self.scanning = 0.0
        self.lock = threading.Lock()

    def __enter__(self) -> MasterMeter:
        def close(conn: SshConnection) -> None:
            t0 = time.thread_time()
            cpu = master_cpu(conn.control_path)
            with self.lock:
                self.masters += cpu
                self.scanning += time.thread_time() - t0
            self.original(conn)

        SshConnection.close = close  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        SshConnection.close = self.original  # type: ignore[method-assign]


def write_params(path: Path, store: Path, endpoints: dict[str, dict], parallel: int) -> Params:
    data = {
        "store": {"adapters_dir": str(store)},
        "models": {"gemma_4b": {"base_model": "none"}},
        "release": {"keep": 3, "parallel": parallel},
        "endpoints": endpoints,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_params(path)


def deploy_job(params: Params, name: str, control: Path, chosen: list[Release]):
    """deploy_endpoint's steps without the endpoint-side health checks."""
    farm = control / f"{name}.landing"
    with fleet.endpoint_run(params, name, control) as (run, outcome):
        session = run.open(fleet.early_releases(params, name, chosen), farm)
        hello = session.call(p.Hello(models=[r.model for r in chosen]))
        todo = [r for r in chosen if fleet._needs_transfer(r, hello["models"][r.model])]
        run.push_all(todo, params.adapters_dir, farm)
        for release in todo:
            out = ModelOutcome(release.model, release.version_id)
            run.transfer(release, out)
            if not run.activate(release, out):
                raise RuntimeError(f"{name}: activate failed: {out.error}")
            run.mark_verified(release.model, release.version_id)
            out.status = "success"
            outcome.models.append(out)
    return outcome


def measured(params: Params, names: list[str], chosen: list[Release]) -> tuple[float, float, int]:
    """(deployer CPU seconds, wall seconds, bytes sent) of one deploy to `names`."""
    with MasterMeter() as meter:
        cpu0, t0 = deployer_cpu(), time.perf_counter()
        outcomes: list[EndpointOutcome] = fleet.run_parallel(
            params, names, lambda name, control: deploy_job(params, name, control, chosen)
        )
        # the run's record, as a real deploy writes it: the next run's early rsync skips
        # what it shows active and healthy there
        records._update_status(params.adapters_dir, outcomes)
        cpu = deployer_cpu() - cpu0 - meter.scanning + meter.masters
        wall = time.perf_counter() - t0
    failed = [o.error for o in outcomes if o.error]
    if failed:
        raise RuntimeError(f"deploy failed: {failed[:3]}")
    sent = sum(m.bytes_sent for o in outcomes for m in o.models)
    return cpu, wall, sent


def run_bench(sshd: SSHServer, tmp: Path, sizes: list[int], megabytes: int) -> None:
    store = tmp / "store"
    chosen = make_releases(store, {"gemma_4b": (megabytes * MB, np.float16)}, cycle=1)
    size = chosen[0].size
    print(f"one adapter of {size / 1e6:.1f} MB; deployer-side CPU only ({os.cpu_count()} cores)")
    rows = []
    for n in sizes:
        names = [f"n{n}-ep{i}" for i in range(n)]  # no records of earlier rounds apply
        endpoints = {name: sshd.endpoint(tmp / f"fleet{n}" / name / "adapters") for name in names}
        params = write_params(tmp / "params.yaml", store, endpoints, parallel=n)
        first, first_wall, sent = measured(params, names, chosen)
        again, again_wall, resent = measured(params, names, chosen)
        rows.append((n, first / n, again / n))
        print(
            f"  {n:2d} endpoints: first deploy {first:6.2f} CPU s ({first / n:.3f}/endpoint, "
            f"{first_wall:5.1f} s wall, {sent / 1e6:.0f} MB sent); unchanged re-deploy "
            f"{again:5.2f} CPU s ({again / n:.3f}/endpoint, {again_wall:4.1f} s wall, {resent} B)"
        )
    # The ssh key exchange dominates a re-deploy: OpenSSH 9.0-9.8 default to the post-quantum
    # hybrid sntrup761x25519 (costly on the client; 9.9+ prefer the cheap mlkem768x25519).
    # The same re-deploy with classic curve25519 (an operator's ssh_config choice) shows the
    # project's own share.
    classic = tmp / "ssh_config_curve25519"
    classic.write_text(sshd.ssh_config.read_text() + "  KexAlgorithms curve25519-sha256\n")
    n = sizes[-1]
    names = [f"n{n}-ep{i}" for i in range(n)]  # the endpoints just deployed to
    endpoints = {
        name: {**sshd.endpoint(tmp / f"fleet{n}" / name / "adapters"), "ssh_config": str(classic)}
        for name in names
    }
    params = write_params(tmp / "params.yaml", store, endpoints, parallel=n)
    classic_again = measured(params, names, chosen)[0] / n
    print(
        f"  {n:2d} endpoints, unchanged re-deploy with KexAlgorithms curve25519-sha256: "
        f"{classic_again:.3f} CPU s/endpoint"
    )
    _, first_1, again_1 = rows[0]
    n_last, first_n, again_n = rows[-1]
    first_growth, again_growth = first_n / first_1, again_n / again_1
    print(
        f"\nper-endpoint CPU from {rows[0][0]} to {n_last} endpoints: first deploy x"
        f"{first_growth:.2f}, re-deploy x{again_growth:.2f} (goal: <= {GROWTH_GOAL}, linear)"
        f"\nper endpoint: {again_n:.3f} CPU s fixed (session, ssh) + "
        f"{(first_n - again_n) / (size / 1e6):.4f} CPU s per MB sent"
    )
    print(f"BENCH fleet_first_cpu_growth_{n_last}_vs_1 {first_growth:.3f} {GROWTH_GOAL} <=")
    print(f"BENCH fleet_redeploy_cpu_growth_{n_last}_vs_1 {again_growth:.3f} {GROWTH_GOAL} <=")
    print(f"BENCH fleet_redeploy_cpu_s_per_endpoint {again_n:.4f} {REDEPLOY_GOAL} <=")
    print(
        f"BENCH fleet_redeploy_cpu_s_per_endpoint_curve25519 {classic_again:.4f} {REDEPLOY_GOAL} <="
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--mb", type=int, default=10, help="adapter size in MB")
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        sys.exit("rsync is missing: apt-get install rsync")
    print(f"load average {os.getloadavg()[0]:.2f} (other load skews wall times, not CPU s)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        with running_sshd(tmp / "sshd") as sshd:
            run_bench(sshd, tmp, sorted(args.sizes), args.mb)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
