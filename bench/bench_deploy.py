"""Benchmark: a deploy over loopback ssh against a raw `rsync -a` of the same files.

Usage:
    python bench/bench_deploy.py [--repeats 3]

Starts a private sshd on 127.0.0.1 (adapter_deploy.kit.sshd.running_sshd) and measures, through
the project's own code (EndpointRun over one endpoint session; no health check):
  1. three synthetic adapters (~60/80/120 MB safetensors + adapter_config.json) to one fresh
     endpoint: transfer + verify + activate, against `rsync -a` of the same files over the
     same ssh options into a fresh directory (goal: ratio <= 1.2);
  2. a re-deploy of the same releases: time and payload bytes sent (goal: 0 bytes);
  3. one small adapter (~10 MB) to 8 fresh endpoints at once through run_parallel
     (release.parallel = 8) against the same to 1 endpoint (goal: wall-time ratio <= 3).
Each figure is the best of --repeats runs (default 3). It also prints a per-step breakdown of
the first deploy and re-deploy, probes of the endpoint session's start-up and CPU seconds of the
fleet runs, then one `BENCH <name> <value> <goal> <op>` line per figure. Prints figures only:
nothing here asserts a time. Everything lives in one temp dir, removed at the end (sshd too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from adapter_deploy.common.fsutil import sha256_file
from adapter_deploy.config import Params, load_params
from adapter_deploy.deploy import remote
from adapter_deploy.deploy.fleet import run_parallel
from adapter_deploy.deploy.plan import ModelOutcome, Release
from adapter_deploy.deploy.remote import SshConnection
from adapter_deploy.deploy.steps import EndpointRun
from adapter_deploy.kit.sshd import SSHServer, running_sshd
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]

MB = 1024 * 1024
BIG = {"whisper": (60 * MB, np.float16), "gemma_4b": (80 * MB, np.float32)}
BIG["gemma_12b"] = (120 * MB, np.float16)
SMALL = {"gemma_4b": (10 * MB, np.float16)}
RATIO_GOAL, BYTES_GOAL, PARALLEL_GOAL = 1.2, 0, 3.0
LINK_KIB_S = 112_000  # ~940 Mbit/s: what a gigabit link carries as payload
FLEET = 8


def write_adapter(path: Path, size: int, dtype: type, seed: int) -> None:
    """A PEFT-shaped LoRA adapter of about `size` bytes: r=16 A/B pairs over 7 projections."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    itemsize, rank, hidden = np.dtype(dtype).itemsize, 16, 4096
    per_layer = 7 * 2 * rank * hidden * itemsize
    tensors = {}
    for layer in range(max(1, size // per_layer)):
        for proj in ("q", "k", "v", "o", "gate", "up", "down"):
            kind = "self_attn" if proj in "qkvo" else "mlp"
            name = f"base_model.model.model.layers.{layer}.{kind}.{proj}_proj"
            for ab, shape in (("A", (rank, hidden)), ("B", (hidden, rank))):
                data = rng.standard_normal(shape, dtype=np.float32) * 0.02
                tensors[f"{name}.lora_{ab}.weight"] = data.astype(dtype)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 32, "task_type": "CAUSAL_LM"}
    config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_releases(store: Path, spec: dict[str, tuple[int, type]], cycle: int) -> list[Release]:
    chosen = []
    for seed, (model, (size, dtype)) in enumerate(spec.items()):
        version_id = f"cycle{cycle}_20260101_{seed + 16 * cycle:08x}"
        local = store / model / version_id
        write_adapter(local, size, dtype, seed + 100 * cycle)
        files = {
            p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(local.iterdir())
        }
        chosen.append(Release(model, version_id, cycle, files, local))
    return chosen


def write_params(path: Path, store: Path, endpoints: dict[str, dict]) -> Params:
    data = {
        "store": {"adapters_dir": str(store)},
        "models": {m: {"base_model": "none"} for m in BIG},
        "release": {"keep": 3, "parallel": FLEET},
        "endpoints": endpoints,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_params(path)


class Steps:
    """Wall time per step of one EndpointRun (wraps its session and connection)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                step = name if name != "request" else f"request {args[0].op}"
                self.seconds[step] += time.perf_counter() - t0

        return wrapper


def deploy_one(
    params: Params, name: str, control: Path, chosen: list[Release], steps: Steps | None = None
) -> list[ModelOutcome]:
    """transfer + activate of every release over one session (a deploy minus health checks)."""
    run = EndpointRun(params, name, control)
    farm = control / f"{name}.landing"
    t0 = time.perf_counter()
    # what deploy_endpoint does: rsync starts once the ssh connection is up, while the
    # endpoint agent starts (the bench keeps no deploy records: every release goes early)
    session = run.open(chosen, farm)
    if steps:
        steps.seconds["open (ssh + agent start-up; rsync started)"] += time.perf_counter() - t0
        session.call = steps.timed("request", session.call)  # type: ignore[method-assign]
        run.conn.push = steps.timed("push (rsync)", run.conn.push)  # type: ignore[method-assign]
        if run.early:
            run.early.finish = steps.timed("rest of the early rsync", run.early.finish)  # type: ignore[method-assign]
    outcomes = []
    try:
        run.push_all(chosen, params.adapters_dir, farm)
        for release in chosen:
            out = ModelOutcome(release.model, release.version_id)
            run.transfer(release, out)
            if not run.activate(release, out):
                raise RuntimeError(f"{name}: activate failed: {out.error}")
            outcomes.append(out)
    finally:
        t0 = time.perf_counter()
        run.close()
        if steps:
            steps.seconds["close"] += time.perf_counter() - t0
    return outcomes


def cpu_seconds() -> float:
    """CPU time used by the whole machine so far (both sides of loopback ssh), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))  # not idle/iowait
    return busy / os.sysconf("SC_CLK_TCK")


CPU: dict[str, list[float]] = defaultdict(list)  # machine-wide CPU s per timed run, by kind


def timed_deploy(
    params: Params,
    name: str,
    chosen: list[Release],
    steps: Steps | None = None,
    link_kib_s: int | None = None,
    kind: str = "deploy",
) -> tuple[float, int]:
    os.sync()  # earlier runs' dirty pages must not be written back inside this one
    with tempfile.TemporaryDirectory(prefix="adeploy-bench-") as control, link_limit(link_kib_s):
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        outcomes = deploy_one(params, name, Path(control), chosen, steps)
        elapsed = time.perf_counter() - t0
        CPU[kind].append(cpu_seconds() - cpu0)
    return elapsed, sum(o.bytes_sent for o in outcomes)


def timed_rsync(
    params: Params,
    name: str,
    chosen: list[Release],
    dest: str,
    link_kib_s: int | None = None,
    kind: str = "rsync",
) -> float:
    """`rsync -a` of the same files over the same ssh argv (own ControlPath), fresh dest."""
    with tempfile.TemporaryDirectory(prefix="adeploy-bench-") as control:
        conn = SshConnection(name, params.endpoint(name), Path(control))
        sources = [str(r.local_dir) for r in chosen]
        argv = ["rsync", "-a", "-e", shlex.join(conn.ssh_argv())]
        argv += [f"--bwlimit={link_kib_s}"] if link_kib_s else []
        os.sync()
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        argv += [*sources, f"{conn.ep.host}:{dest}/"]
        subprocess.run(argv, check=True, capture_output=True)
        elapsed = time.perf_counter() - t0
        CPU[kind].append(cpu_seconds() - cpu0)
        conn.close()
    return elapsed


@contextlib.contextmanager
def link_limit(kib_s: int | None) -> Iterator[None]:
    """Every rsync the deployer starts sends at most `kib_s` KiB/s (rsync's own --bwlimit,
    as the raw rsync gets): a link slower than this machine's CPUs, as between two machines."""
    if not kib_s:
        yield
        return
    plain = remote._run_rsync

    def limited(argv: list[str], *args: Any, **kw: Any) -> Any:
        return plain([argv[0], f"--bwlimit={kib_s}", *argv[1:]], *args, **kw)

    remote._run_rsync = limited
    try:
        yield
    finally:
        remote._run_rsync = plain


def timed_fleet(params: Params, names: list[str], chosen: list[Release]) -> tuple[float, float]:
    """Wall time and CPU seconds (machine-wide, less the background rate just before) of one
    deploy to `names` through run_parallel."""
    os.sync()
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    time.sleep(0.5)
    cpu1, t1 = cpu_seconds(), time.perf_counter()
    background = (cpu1 - cpu0) / (t1 - t0)
    cpu0, t0 = cpu1, t1
    results = run_parallel(
        params, names, lambda name, control: deploy_one(params, name, control, chosen)
    )
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0 - background * elapsed
    assert all(len(r) == len(chosen) for r in results)
    return elapsed, cpu


def probe_startup(params: Params, name: str) -> dict[str, float]:
    """Where an endpoint session's start-up goes: ssh connect, a bare python, our imports."""
    ep = params.endpoint(name)
    with tempfile.TemporaryDirectory(prefix="adeploy-bench-") as control:
        conn = SshConnection(name, ep, Path(control))
        cold = ["ssh", "-F", ep.ssh_config or "", "-o", "BatchMode=yes", ep.host, "true"]
        probes = {
            "ssh connect + true (no mux)": cold,
            "ssh mux + true": conn.argv(["true"]),
            "ssh mux + python -c pass": conn.argv([ep.python or "python3", "-c", "pass"]),
            "ssh mux + import adapter_deploy.agent.session": conn.argv(
                [ep.python or "python3", "-c", "import adapter_deploy.agent.session"]
            ),
        }
        subprocess.run(conn.argv(["true"]), check=True, capture_output=True)  # start the master
        found = {}
        for label, argv in probes.items():
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True)
                best = min(best, time.perf_counter() - t0)
            found[label] = best
        conn.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (best counts)")
    args = parser.parse_args()
    if shutil.which("rsync") is None:
        sys.exit("rsync is missing: apt-get install rsync")
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} cores (other load skews every figure)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    try:
        with running_sshd(tmp / "sshd") as sshd:
            run_bench(sshd, tmp, max(1, args.repeats))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_bench(sshd: SSHServer, tmp: Path, repeats: int) -> None:
    store = tmp / "store"
    t0 = time.perf_counter()
    big = make_releases(store, BIG, cycle=1)
    small = make_releases(store, SMALL, cycle=2)
    total = sum(r.size for r in big)
    print(
        f"synthetic adapters: {', '.join(f'{r.model} {r.size / 1e6:.0f} MB' for r in big)} "
        f"= {total / 1e6:.0f} MB; small {small[0].size / 1e6:.1f} MB "
        f"(written + hashed in {time.perf_counter() - t0:.1f} s)"
    )
    names = [f"ep{i}" for i in range(FLEET)]
    endpoints = {"big0": sshd.endpoint(tmp / "unused")}
    params = write_params(tmp / "params.yaml", store, endpoints)

    def fresh(name: str, tag: str) -> None:
        endpoints[name] = sshd.endpoint(tmp / tag / name / "adapters")

    # 1 + 2: big adapters, deploy vs raw rsync, then a re-deploy.
    deploys, rsyncs, redeploys, resent = [], [], [], []
    breakdown, again_steps = Steps(), Steps()
    for i in range(repeats):
        rsyncs.append(timed_rsync(params, "big0", big, str(tmp / f"rsync-dest-{i}")))
        fresh("big0", f"big-{i}")
        params = write_params(tmp / "params.yaml", store, endpoints)
        seconds, sent = timed_deploy(params, "big0", big, breakdown if i == 0 else None)
        deploys.append(seconds)
        seconds, again = timed_deploy(
            params, "big0", big, again_steps if i == 0 else None, kind="re-deploy"
        )
        redeploys.append(seconds)
        resent.append(again)
        print(
            f"run {i + 1}: rsync -a {rsyncs[-1]:.2f} s; deploy {deploys[-1]:.2f} s "
            f"({sent / 1e6:.0f} MB sent); re-deploy {redeploys[-1]:.2f} s ({again} B sent)"
        )
        shutil.rmtree(tmp / f"rsync-dest-{i}", ignore_errors=True)
    ratio = min(deploys) / min(rsyncs)
    print(
        f"\n3 adapters, {total / 1e6:.0f} MB, one endpoint over loopback ssh (best of {repeats}):"
        f"\n  raw rsync -a          {min(rsyncs):6.2f} s"
        f"\n  deploy (xfer+verify+activate) {min(deploys):6.2f} s"
        f"   ratio {ratio:.2f} (goal <= {RATIO_GOAL})"
        f"\n  re-deploy             {min(redeploys):6.2f} s, {max(resent)} bytes sent "
        f"(goal {BYTES_GOAL})"
    )
    cores = os.cpu_count() or 1
    for kind, walls in (("raw rsync", rsyncs), ("deploy", deploys)):
        cpu = CPU["rsync" if kind == "raw rsync" else "deploy"]
        best = walls.index(min(walls))
        print(
            f"  {kind}: {cpu[best]:.2f} CPU s machine-wide (both ends) in {walls[best]:.2f} s = "
            f"{100 * cpu[best] / (walls[best] * cores):.0f}% of {cores} cores"
        )
    for title, steps in (("first deploy", breakdown), ("re-deploy", again_steps)):
        print(f"  {title} by step (wall s, summed over the 3 models):")
        for step, seconds in sorted(steps.seconds.items(), key=lambda kv: -kv[1]):
            print(f"    {step:38s} {seconds:6.3f}")
    print("  endpoint session start-up probes (best of 3, s):")
    for label, seconds in probe_startup(params, "big0").items():
        print(f"    {label:38s} {seconds:6.3f}")

    # 1b: the same over a link slower than this machine's CPUs (two machines on gigabit)
    link_rsyncs, link_deploys = [], []
    for i in range(repeats):
        dest = str(tmp / f"rsync-link-{i}")
        link_rsyncs.append(timed_rsync(params, "big0", big, dest, LINK_KIB_S, kind="link"))
        shutil.rmtree(dest, ignore_errors=True)
        fresh("big0", f"big-link-{i}")
        params = write_params(tmp / "params.yaml", store, endpoints)
        link_deploys.append(
            timed_deploy(params, "big0", big, link_kib_s=LINK_KIB_S, kind="link")[0]
        )
    link_ratio = min(link_deploys) / min(link_rsyncs)
    print(
        f"  over a {LINK_KIB_S * 1024 * 8 / 1e6:.0f} Mbit/s link (rsync --bwlimit on both): "
        f"raw rsync {min(link_rsyncs):.2f} s, deploy {min(link_deploys):.2f} s, "
        f"ratio {link_ratio:.2f} (goal <= {RATIO_GOAL})\n"
    )

    # 3: 1 endpoint vs 8 endpoints, small adapter, all through run_parallel.
    ones, eights, cpu1, cpu8 = [], [], [], []
    for i in range(repeats):
        for name in names:
            fresh(name, f"fleet-{i}")
        params = write_params(tmp / "params.yaml", store, endpoints)
        wall, cpu = timed_fleet(params, names[:1], small)
        ones.append(wall)
        cpu1.append(cpu)
        for name in names:
            fresh(name, f"fleet8-{i}")
        params = write_params(tmp / "params.yaml", store, endpoints)
        wall, cpu = timed_fleet(params, names, small)
        eights.append(wall)
        cpu8.append(cpu)
        print(
            f"run {i + 1}: 1 endpoint {ones[-1]:.2f} s ({cpu1[-1]:.2f} CPU s); {FLEET} endpoints "
            f"{eights[-1]:.2f} s ({cpu8[-1]:.2f} CPU s; {os.cpu_count()} cores; CPU s are "
            "machine-wide above the background rate)"
        )
    fleet_ratio = min(eights) / min(ones)
    print(
        f"\n{small[0].size / 1e6:.0f} MB adapter, {FLEET} endpoints vs 1 (parallel {FLEET}, "
        f"best of {repeats}): {min(eights):.2f} s vs {min(ones):.2f} s, ratio {fleet_ratio:.2f} "
        f"(goal <= {PARALLEL_GOAL})\n"
    )
    print(f"BENCH deploy_vs_rsync_ratio {ratio:.3f} {RATIO_GOAL} <=")
    print(f"BENCH deploy_vs_rsync_ratio_gigabit {link_ratio:.3f} {RATIO_GOAL} <=")
    print(f"BENCH redeploy_bytes_sent {max(resent)} {BYTES_GOAL} <=")
    print(f"BENCH fleet_8_vs_1_ratio {fleet_ratio:.3f} {PARALLEL_GOAL} <=")


if __name__ == "__main__":
    main()
