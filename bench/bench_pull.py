"""Benchmark: a cycle promoted to N pulling endpoints (training machine's cost, time to report).

Pull mode (issue #30), on the kit and loopback only: what `make promote` of one cycle to N
pulling endpoints costs the training machine, and how soon every endpoint reports running it.

Usage:
    python bench/bench_pull.py [--endpoints 1 4] [--interval 5] [--kit DIR]

One real store (git + DVC with a local-directory remote, a signing key from `make keygen`),
cycles 1 and 2 of the kit's gemma adapter versioned and signed with `scripts/version.py`
(kit.good, kit.good2; the kit is built into DIR, default .kit/, reused when complete). For each
N: a fresh bare git remote, N pulling endpoints (`mode: pull`, temp adapter dirs, the real
agent, platform cpu) that trust the public key; `scripts/promote.py --cycle 1` and one
`scripts/pull.py` per endpoint (warm: every endpoint runs cycle 1), then each endpoint's pull
timer starts and `scripts/promote.py --cycle 2` is measured:

  (a) the training machine's side of the promote: CPU seconds of the promote's whole process
      tree (python, its git commands, the ssh client git push starts), read with os.wait4 on
      that one child, so the endpoints' pulls never count: printed for the measured promote
      (the timers running) and, for the BENCH ratio, the best of 3 more promotes of the same
      shape (cycles 1, 2, 1 again: N new stage tags each) with the timers stopped, since N
      endpoints pulling on the same 2 cores slow this one process's CPU by up to 1.5x
      (measured). Its uplink bytes: the git remote is reached over ssh
      (`store.git_remote: ssh://...`, the private sshd on 127.0.0.1 from
      adapter_deploy.kit.sshd) through a TCP relay in this process that
      counts what passes each way, so the figure is every byte ssh writes to the network for
      the promote (key exchange, authentication, git's ref commands and pack; TCP/IP headers
      not included). Contrast: what a push deploy of the same cycle would send from the
      training machine, the release's files (their sizes from the manifest, computed, not
      measured) times N, payload only. `make version` sent the release to the DVC remote once
      before any endpoint is named (the bytes it wrote there are printed, the same for any N).
      The endpoints read the git and DVC remotes as local paths (`pull:` in params.yaml), as
      an NFS mount would give them: none of their bytes pass the training machine.
  (b) each endpoint's timer: a loop per endpoint standing in for the systemd timer that
      `make service-install` writes with `pull.interval_s` = --interval (its OnUnitActiveSec
      and RandomizedDelaySec are read from that timer file: 5 s and up to 1 s): the next pull
      starts interval + a random delay up to the jitter after the previous one ended (a little
      later than systemd would, which counts from the start); each loop starts at a random
      phase and runs one period before the promote. Measured: from promote's return to the
      moment every endpoint's report (<DVC remote>/reports/<ep>.json, polled every 50 ms)
      shows cycle 2's version active. Each endpoint runs its inference service
      (`scripts/service.py start`, the kit model on CPU, `reload_method: sigusr1`), started
      before its first pull, as a real endpoint's would be; a pull of a new version runs the
      whole deploy: fetch, sha256 and signature checks, pre-check in the service, activate,
      hot reload, verify through the service. health_check.latency_limit_s is 60 s here, so N
      endpoints sharing the CPUs of one box do not fail a check on speed.

Goals (BENCH lines, N = the largest --endpoints against the smallest, default 4 and 1):
  pull_training_bytes_ratio_N<max>_over_N<min>  <= 1.1 (the uplink independent of N)
  pull_training_cpu_ratio_N<max>_over_N<min>    <= 1.5
  pull_promote_to_all_reported_s_N<max>         <= 3 x interval + the time one pull of a new
      version takes alone (the smallest N's pull of cycle 2, measured in the same run; the
      goal printed is that sum)
On a 2-core box all N endpoints, their pre-checks and the training side share the same CPUs,
so (b) grows with N here in a way it does not across machines. One run per N; figures only,
nothing asserts. Everything lives in one temp dir, removed at the end (sshd too). About 2-3
minutes on 2 cores with the kit already built.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from adapter_deploy import api
from adapter_deploy.config import Params, load_params
from adapter_deploy.deploy.service_install import pull_timer_files
from adapter_deploy.kit.net import free_port
from adapter_deploy.kit.sshd import SSHServer, running_sshd

ROOT = Path(__file__).resolve().parents[1]
BYTES_GOAL, CPU_GOAL, TIMER_PERIODS = 1.1, 1.5, 3
QUIET_PROMOTES = 3
MODEL = "gemma_4b"
# The bench never reads the developer's git or DVC settings.
ENV = {
    "GIT_AUTHOR_NAME": "Adapter Deploy bench",
    "GIT_AUTHOR_EMAIL": "bench@adapter-deploy.invalid",
    "GIT_COMMITTER_NAME": "Adapter Deploy bench",
    "GIT_COMMITTER_EMAIL": "bench@adapter-deploy.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "DVC_NO_ANALYTICS": "1",
    "NO_COLOR": "1",
}


class CountingRelay:
    """A TCP relay on 127.0.0.1 in front of the sshd: counts the bytes passing each way."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.up = self.down = self.open_pumps = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.open_pumps += 2
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self.lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            with self.lock:
                self.open_pumps -= 1

    def counts(self) -> tuple[int, int]:
        """(up, down) once every connection through the relay has ended (at most 10 s)."""
        deadline = time.monotonic() + 10
        while self.open_pumps and time.monotonic() < deadline:
            time.sleep(0.01)
        with self.lock:
            return self.up, self.down

    def close(self) -> None:
        self.listener.close()


def sh(*argv: str, cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-800:]}")
    return done.stdout


def script(name: str, *args: str, params: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PARAMS": str(params)}
    argv = [sys.executable, str(ROOT / "scripts" / name), *args]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class Store:
    repo: Path
    remote: Path
    params: Path
    public_key: Path
    versions: dict[int, str] = field(default_factory=dict)
    release_bytes: int = 0  # cycle 2's files, as a push deploy would send them
    version_upload: int = 0  # what `make version` of cycle 2 wrote into the DVC remote


def base_params(store_dir: Path, remote: Path, kit_base: Path, key: Path) -> dict:
    return {
        "store": {
            "adapters_dir": str(store_dir / "adapters"),
            "remote": str(remote),
            "signing_key": str(key),
        },
        "models": {MODEL: {"task": "translation", "base_model": str(kit_base)}},
        "health_check": {"latency_limit_s": 60.0},
        "endpoints": {},
    }


def build_store(tmp: Path, kit_dir: Path) -> Store:
    """git + DVC store with a local remote and a signing key; cycles 1 and 2 versioned."""
    from adapter_deploy.kit.gemma import build_kit  # torch: not for --help

    kit = build_kit(kit_dir)
    repo, remote = tmp / "project", tmp / "dvc-remote"
    repo.mkdir(parents=True)
    remote.mkdir()
    key = tmp / "keys" / "signing.pem"
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(base_params(repo, remote, kit.base, key), sort_keys=False))
    (repo / "adapters").mkdir()
    dvc = (sys.executable, "-m", "dvc")
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    sh(*dvc, "init", "-q", cwd=repo)
    sh(*dvc, "remote", "add", "-d", "local", str(remote), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", "store", cwd=repo)
    done = script("keygen.py", params=params)
    if done.returncode != 0:
        raise RuntimeError(f"keygen failed: {done.stderr[-800:]}")
    store = Store(repo, remote, params, Path(f"{key}.pub"))
    for cycle, adapter in ((1, kit.good), (2, kit.good2)):
        before = dir_bytes(remote)
        args = ("--model", MODEL, "--cycle", str(cycle), "--src", str(adapter), "--json")
        done = script("version.py", *args, params=params)
        if done.returncode != 0:
            raise RuntimeError(f"version cycle {cycle} failed: {done.stderr[-800:]}")
        store.versions[cycle] = json.loads(done.stdout)["version_id"]
        store.version_upload = dir_bytes(remote) - before
    manifest = json.loads((repo / "adapters" / "manifest.json").read_text())
    (entry,) = [e for e in manifest["versions"][MODEL] if e["version_id"] == store.versions[2]]
    store.release_bytes = sum(f["size"] for f in entry["files"].values())
    return store


def training_ssh(sshd: SSHServer, relay: CountingRelay, tmp: Path) -> dict[str, str]:
    """The training machine's ssh for git push: the sshd's alias, reached through the relay."""
    known = tmp / "known_hosts"
    key = sshd.known_hosts.read_text().split(maxsplit=1)[1]
    known.write_text(sshd.known_hosts.read_text() + f"[127.0.0.1]:{relay.port} {key}")
    config = sshd.ssh_config.read_text()
    config = config.replace(f"Port {sshd.port}\n", f"Port {relay.port}\n")
    config = config.replace(str(sshd.known_hosts), str(known))
    path = tmp / "ssh_config"
    path.write_text(config)
    ssh = f"ssh -F {path} -o BatchMode=yes -o StrictHostKeyChecking=yes"
    return {**os.environ, "GIT_SSH_COMMAND": ssh}


@dataclass
class Promote:
    cpu_s: float
    wall_s: float
    up: int
    down: int
    returned_at: float  # time.monotonic() when it returned


def promote(store: Store, cycle: int, names: list[str], env: dict, relay: CountingRelay):
    """scripts/promote.py as its own child: its whole tree's CPU (os.wait4) and its bytes."""
    up0, down0 = relay.counts()
    argv = [sys.executable, str(ROOT / "scripts" / "promote.py"), "--cycle", str(cycle)]
    argv += ["--models", MODEL, "--endpoints", *names]
    with tempfile.TemporaryFile() as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, cwd=ROOT, env={**env, "PARAMS": str(store.params)}, stdout=out, stderr=out
        )
        _, status, usage = os.wait4(proc.pid, 0)
        returned = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            out.seek(0)
            raise RuntimeError(f"promote cycle {cycle} failed: {out.read().decode()[-800:]}")
    up, down = relay.counts()
    cpu = usage.ru_utime + usage.ru_stime
    return Promote(cpu, returned - t0, up - up0, down - down0, returned)


class Timer:
    """One endpoint's pull timer: pull.py, then interval + up to `jitter` s, again."""

    def __init__(self, name: str, params: Path, interval: float, jitter: float) -> None:
        self.name, self.params = name, params
        self.interval, self.jitter = interval, jitter
        self.stop = threading.Event()
        self.pulls: list[tuple[float, float, int]] = []  # (start, end, exit code)
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        # timers installed at different moments: each starts at its own phase
        if self.stop.wait(random.uniform(0, self.interval)):
            return
        while not self.stop.is_set():
            t0 = time.monotonic()
            done = script("pull.py", "--endpoint", self.name, params=self.params)
            self.pulls.append((t0, time.monotonic(), done.returncode))
            if done.returncode != 0:
                self.errors.append(done.stderr.strip()[-400:])
            if self.stop.wait(self.interval + random.uniform(0, self.jitter)):
                return

    def finish(self) -> None:
        self.stop.set()
        self.thread.join()


def timer_settings(params: Path, name: str) -> tuple[float, float]:
    """(OnUnitActiveSec, RandomizedDelaySec) of the timer make service-install would write."""
    ep = load_params(params).endpoint(name)
    text = "\n".join(f.text for f in pull_timer_files(name, ep))
    every = re.search(r"^OnUnitActiveSec=(\d+)$", text, re.M)
    spread = re.search(r"^RandomizedDelaySec=(\d+)$", text, re.M)
    if not every or not spread:
        raise RuntimeError("the pull timer file has no OnUnitActiveSec / RandomizedDelaySec")
    return float(every[1]), float(spread[1])


def reported(store: Store, name: str) -> str | None:
    """The active version the endpoint's last report shows (None: no report yet)."""
    try:
        report = json.loads((store.remote / "reports" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return (report.get("models", {}).get(MODEL) or {}).get("active_version")


@dataclass
class Round:
    n: int
    promote: Promote
    warm_pull_s: list[float]
    all_reported_s: float
    per_endpoint_s: list[float]
    idle_pull_s: list[float]
    new_pull_s: list[float]
    interval: float
    jitter: float
    quiet_cpu_s: list[float]  # promotes with the timers stopped


def run_round(
    store: Store, tmp: Path, n: int, interval: float, env: dict, relay: CountingRelay, wait_s: float
) -> Round:
    git_remote = tmp / f"remote-n{n}.git"
    sh("git", "init", "-q", "--bare", str(git_remote))
    names = [f"n{n}-ep{i}" for i in range(n)]
    data = yaml.safe_load(store.params.read_text())
    data["store"]["git_remote"] = f"ssh://adapter-test{git_remote}"
    pull = {"git_remote": str(git_remote), "dvc_remote": str(store.remote), "interval_s": interval}
    data["endpoints"] = {
        name: {
            "mode": "pull",
            "adapter_dir": str(tmp / f"n{n}" / name / "adapters"),
            "project_dir": str(ROOT),
            "python": sys.executable,
            "platform": "cpu",
            "reload_method": "sigusr1",
            "service_url": f"http://127.0.0.1:{free_port()}",
            "pidfile": str(tmp / f"n{n}" / name / "serve.pid"),
            "models": [MODEL],
            "pull": pull,
        }
        for name in names
    }
    store.params.write_text(yaml.safe_dump(data, sort_keys=False))
    params = load_params(store.params)
    for name in names:  # what `pull.py --trust` does, in this process
        api.trust_here(params, name, store.public_key)
    try:
        start_services(store, names, params)
        return measure_round(store, n, names, env, relay, wait_s)
    finally:
        for name in names:
            script("service.py", "stop", "--endpoint", name, params=store.params)


def start_services(store: Store, names: list[str], params: Params) -> None:
    """Each endpoint's inference service (scripts/service.py start), until /health answers."""
    for name in names:
        done = script("service.py", "start", "--endpoint", name, params=store.params)
        if done.returncode != 0:
            raise RuntimeError(f"service of {name} did not start: {done.stderr[-800:]}")
    deadline = time.monotonic() + 180
    for name in names:
        while not healthy(f"{params.endpoint(name).service_url}/health"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service of {name} never answered /health")
            time.sleep(0.2)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def measure_round(
    store: Store, n: int, names: list[str], env: dict, relay: CountingRelay, wait_s: float
) -> Round:
    promote(store, 1, names, env, relay)

    def warm(name: str) -> float:
        t0 = time.monotonic()
        done = script("pull.py", "--endpoint", name, params=store.params)
        if done.returncode != 0 or reported(store, name) != store.versions[1]:
            raise RuntimeError(f"warm pull of {name} failed: {done.stderr[-800:]}")
        return time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=min(n, os.cpu_count() or 1)) as pool:
        warm_s = list(pool.map(warm, names))

    interval_s, jitter = timer_settings(store.params, names[0])
    timers = [Timer(name, store.params, interval_s, jitter) for name in names]
    for timer in timers:
        timer.start()
    time.sleep(interval_s + jitter)  # every timer has started its first (unchanged) pull
    measured = promote(store, 2, names, env, relay)
    seen: dict[str, float] = {}
    deadline = measured.returned_at + wait_s
    while len(seen) < n and time.monotonic() < deadline:
        for name in names:
            if name not in seen and reported(store, name) == store.versions[2]:
                seen[name] = time.monotonic() - measured.returned_at
        time.sleep(0.05)
    for timer in timers:
        timer.finish()
    errors = [f"{t.name}: {e}" for t in timers for e in t.errors]
    if len(seen) < n:
        missing = sorted(set(names) - set(seen))
        raise RuntimeError(f"{missing} never reported cycle 2 in {wait_s} s; {errors[:3]}")
    if errors:
        raise RuntimeError(f"pulls failed: {errors[:3]}")
    # a pull that ended after the promote and before its endpoint's report showed cycle 2
    # took the new version; the others found nothing new
    idle, new = [], []
    for timer in timers:
        took = measured.returned_at + seen[timer.name]
        for start, end, _ in timer.pulls:
            (new if start < took <= end + 0.2 else idle).append(end - start)
    per = [seen[name] for name in names]
    # The promote's CPU again, QUIET_PROMOTES times with the timers stopped (the services
    # idle): the same work (N new stage tags, pushed) without N endpoints' pulls on the CPUs.
    quiet = [promote(store, 1 + i % 2, names, env, relay).cpu_s for i in range(QUIET_PROMOTES)]
    return Round(n, measured, warm_s, max(per), per, idle, new, interval_s, jitter, quiet)


def report(store: Store, rounds: list[Round]) -> None:
    release = store.release_bytes
    print(
        f"\nrelease of cycle 2: {release:,} B ({MODEL}, kit adapter); make version wrote "
        f"{store.version_upload:,} B into the DVC remote, once, before any endpoint is named"
    )
    print(
        "\n| N | promote CPU s (quiet, best) | promote wall s | promote uplink B | downlink B "
        "| push deploy would send B | promote -> all reported s | each endpoint s "
        "| new-version pull s |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rounds:
        p = r.promote
        each = ", ".join(f"{s:.1f}" for s in r.per_endpoint_s)
        new = f"{statistics.median(r.new_pull_s):.1f}" if r.new_pull_s else "-"
        print(
            f"| {r.n} | {p.cpu_s:.3f} ({min(r.quiet_cpu_s):.3f}) | {p.wall_s:.2f} | {p.up:,} | "
            f"{p.down:,} | "
            f"{release * r.n:,} | {r.all_reported_s:.1f} | {each} | {new} |"
        )
    first, last = rounds[0], rounds[-1]
    bytes_ratio = last.promote.up / first.promote.up
    cpu_ratio = min(last.quiet_cpu_s) / min(first.quiet_cpu_s)
    loaded_ratio = last.promote.cpu_s / first.promote.cpu_s
    # one pull of a new version with nothing else pulling: the smallest N's cycle-2 pull
    solo = statistics.median(first.new_pull_s or first.warm_pull_s)
    warm = statistics.median(first.warm_pull_s)
    goal = TIMER_PERIODS * last.interval + solo
    extra = (last.promote.up - first.promote.up) / max(1, last.n - first.n)
    idle_median = statistics.median([s for r in rounds for s in r.idle_pull_s] or [0])
    pull_cycle = store.version_upload + last.promote.up
    push_cycle = store.version_upload + release * last.n
    print(
        f"\ntimer: every {last.interval:.0f} s + up to {last.jitter:.0f} s (make service-install's"
        f" timer for pull.interval_s {last.interval:g}); a pull of a new version alone (N="
        f"{first.n}, cycle 2): {solo:.1f} s (the first pull, cycle 1: {warm:.1f} s); "
        f"an idle pull: median {idle_median:.1f} s"
        f"\npromote uplink from N={first.n} to N={last.n}: x{bytes_ratio:.3f} ({extra:+.0f} B "
        f"per extra endpoint; a push deploy sends {release:,} B more per endpoint); "
        f"promote CPU x{cpu_ratio:.3f} (best of {QUIET_PROMOTES} with the timers stopped; "
        f"x{loaded_ratio:.3f} for the one promote while the timers ran)"
        f"\nwhole cycle from the training machine at N={last.n}: pull {pull_cycle:,} B "
        f"(version + promote) vs push {push_cycle:,} B (version + the release to each "
        "endpoint, payload only)"
    )
    print(
        f"BENCH pull_training_bytes_ratio_N{last.n}_over_N{first.n} {bytes_ratio:.3f} "
        f"{BYTES_GOAL} <="
    )
    print(f"BENCH pull_training_cpu_ratio_N{last.n}_over_N{first.n} {cpu_ratio:.3f} {CPU_GOAL} <=")
    print(f"BENCH pull_promote_to_all_reported_s_N{last.n} {last.all_reported_s:.2f} {goal:.1f} <=")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--endpoints", type=int, nargs="+", default=[1, 4], help="fleet sizes N (default 1 4)"
    )
    parser.add_argument("--interval", type=float, default=5.0, help="pull.interval_s (s)")
    parser.add_argument("--kit", type=Path, default=ROOT / ".kit", help="kit dir (built once)")
    parser.add_argument(
        "--wait", type=float, default=180.0, help="give up on a round after this many s"
    )
    args = parser.parse_args()
    sizes = sorted(set(args.endpoints))
    if len(sizes) < 2 or sizes[0] < 1:
        parser.error("--endpoints needs two or more fleet sizes >= 1 (e.g. 1 4)")
    os.environ.update(ENV)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pull-"))
    os.environ["DVC_SITE_CACHE_DIR"] = str(tmp / "dvc-site")
    try:
        t0 = time.monotonic()
        store = build_store(tmp, args.kit)
        print(f"store, key and two signed versions ready in {time.monotonic() - t0:.1f} s")
        with running_sshd(tmp / "sshd") as sshd:
            relay = CountingRelay(sshd.port)
            env = training_ssh(sshd, relay, tmp)
            rounds = []
            for n in sizes:
                t0 = time.monotonic()
                rounds.append(run_round(store, tmp, n, args.interval, env, relay, args.wait))
                print(f"N={n}: round done in {time.monotonic() - t0:.1f} s", flush=True)
            relay.close()
        report(store, rounds)
        print(f"total {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
