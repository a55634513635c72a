"""The whole story on a tiny local model and a local endpoint (make demo).

Usage:
    python scripts/demo.py [--dir demo]      # make demo
    python scripts/demo.py --clean [--dir demo]   # make demo-clean

Builds the test kit (a tiny real Gemma-style model and real LoRA adapters), a
training-side store (git + DVC with a local remote) and a local endpoint
(`transport: local`) running the inference service with hot reload. Then:
cycle 1 deployed and healthy; a regressed cycle 2 refused by the pre-check; a
good cycle 3 hot-reloaded, acknowledged and verified; a forced post-activation
failure (an armed failpoint) rolled back automatically; a manual rollback; the
status table and the deploy log. Everything lives under --dir; the service is
left running detached (logs in <dir>/endpoint/service.log) until --clean.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from adapter_deploy.common.errors import UsageError
from adapter_deploy.common.failpoints import arm
from adapter_deploy.common.runner import make_parser, run
from adapter_deploy.kit.net import free_port

# The demo runs the project's scripts as an operator would, from the checkout `make demo`
# runs in.
PROJECT_ROOT = Path.cwd()
JAMES = "The apostle James wrote about faith and works."
GIT_ENV = {
    "GIT_AUTHOR_NAME": "Adapter Deploy demo",
    "GIT_AUTHOR_EMAIL": "demo@adapter-deploy.invalid",
    "GIT_COMMITTER_NAME": "Adapter Deploy demo",
    "GIT_COMMITTER_EMAIL": "demo@adapter-deploy.invalid",
    "DVC_NO_ANALYTICS": "1",
}


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def sh(env: dict, *argv: str, show_err: bool = True) -> int:
    """Run one project command as an operator would, echoing it and its output."""
    words = [
        os.path.relpath(a, PROJECT_ROOT) if a.startswith(str(PROJECT_ROOT)) else a for a in argv[1:]
    ]
    shown = "python " + " ".join(a if " " not in a else repr(a) for a in words)
    print(f"$ {shown}", flush=True)
    proc = subprocess.run(list(argv), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    if proc.stdout.strip():
        print(proc.stdout.rstrip())
    if show_err and proc.stderr.strip():
        print("\n".join("  | " + line for line in proc.stderr.rstrip().splitlines()))
    print(f"(exit {proc.returncode})", flush=True)
    return proc.returncode


def script(name: str) -> str:
    return str(PROJECT_ROOT / "scripts" / name)


def build_store(root: Path, env: dict) -> Path:
    repo = root / "project"
    repo.mkdir(parents=True)
    (root / "dvc-remote").mkdir()
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        [sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(root / "dvc-remote")],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "store"],
    ):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    return repo


def write_params(root: Path, kit_base: Path, port: int) -> Path:
    endpoint = root / "endpoint"
    params = {
        "store": {"adapters_dir": str(root / "project" / "adapters")},
        "models": {"gemma_4b": {"task": "translation", "base_model": str(kit_base)}},
        "health_check": {"latency_limit_s": 5.0, "reload_timeout_s": 60},
        "endpoints": {
            "local": {
                "transport": "local",
                "adapter_dir": str(endpoint / "adapters"),
                "platform": "cpu",
                "reload_method": "sigusr1",
                "service_url": f"http://127.0.0.1:{port}",
                "pidfile": str(endpoint / "serve.pid"),
                "models": ["gemma_4b"],
                "min_free_bytes": 0,
            }
        },
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the demo service did not become ready; see its log under {url}")


def ask(url: str, text: str) -> str:
    body = json.dumps({"model": "gemma_4b", "text": text}).encode()
    req = urllib.request.Request(f"{url}/translate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        answer = json.loads(resp.read())
    return f"{answer['text']!r}  (served by {answer['version_id']})"


def clean(root: Path) -> int:
    pidfile = root / "endpoint" / "serve.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
            print(f"stopped the demo service (pid {pidfile.read_text().strip()})")
        except (ProcessLookupError, ValueError):
            pass
    shutil.rmtree(root, ignore_errors=True)
    print(f"removed {root}")
    return 0


def story(root: Path) -> int:
    from adapter_deploy.kit.gemma import build_kit

    if root.exists():
        clean(root)
    env = {**os.environ, **GIT_ENV}
    step("0. Build the kit: a tiny real model and real LoRA adapters (no downloads)")
    kit = build_kit(root / "kit")
    print(f"base model {kit.base}\nadapters: good, good2, regressed under {kit.root}")
    build_store(root, env)
    port = free_port()
    params = write_params(root, kit.base, port)
    env["PARAMS"] = str(params)
    url = f"http://127.0.0.1:{port}"
    py = sys.executable

    step("1. Start the local endpoint's inference service (hot reload on SIGUSR1)")
    sh(env, py, script("service.py"), "start", "--endpoint", "local")
    wait_ready(url)
    print(f"service ready on {url}; no adapter deployed yet")

    def version_and_deploy(cycle: int, adapter: Path) -> None:
        """`make version` then `make deploy` of gemma_4b to the local endpoint."""
        src = ("--model", "gemma_4b", "--cycle", str(cycle), "--src", str(adapter))
        sh(env, py, script("version.py"), *src)
        where = ("--cycle", str(cycle), "--models", "gemma_4b", "--endpoints", "local")
        sh(env, py, script("deploy_adapters.py"), *where)

    step("2. Version cycle 1 and deploy it: healthy")
    version_and_deploy(1, kit.good)
    print("service answers:", ask(url, JAMES))

    step("3. A regressed cycle 2: the pre-check fails, nothing changes")
    version_and_deploy(2, kit.regressed)
    print("service still answers:", ask(url, JAMES))

    step("4. A good cycle 3: hot reload, acknowledged by the service, verified")
    version_and_deploy(3, kit.good2)
    print("service answers:", ask(url, JAMES))

    step(
        "5. Cycle 4 fails AFTER activation (a failpoint forces the verify to fail): "
        "automatic rollback"
    )
    arm(root / "endpoint" / "adapters", "verify", "fail")
    version_and_deploy(4, kit.good)
    print("service answers:", ask(url, JAMES))

    step("6. Manual rollback (make rollback): back to the release before cycle 3")
    sh(env, py, script("deploy_adapters.py"), "--rollback", "--endpoints", "local")
    print("service answers:", ask(url, JAMES))

    step("7. Status table and the last deploy-log entries")
    sh(env, py, script("status.py"))
    sh(env, py, script("versions.py"))
    log = root / "project" / "adapters" / "deploy_log.jsonl"
    for line in log.read_text().splitlines()[-4:]:
        e = json.loads(line)
        print(
            f"{e['timestamp']} {e['action']:8} cycle={e['cycle']} {e['endpoint']} "
            f"{e['versions']} -> {e['status']} ({e['duration_s']} s)"
        )
    print(f"\nThe demo service keeps running on {url} (log: {root}/endpoint/service.log).")
    print("Try: PARAMS=demo/params.yaml make status    Stop and remove it: make demo-clean")
    return 0


def main(args: argparse.Namespace) -> int:
    if not args.clean and not (PROJECT_ROOT / "scripts" / "version.py").is_file():
        raise UsageError(
            f"{PROJECT_ROOT} is not an Adapter Deploy checkout", "run make demo in the project"
        )
    root = Path(args.dir).resolve()
    return clean(root) if args.clean else story(root)


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--dir", default="demo", help="demo directory")
    parser.add_argument("--clean", action="store_true", help="stop the service, remove the dir")
    return parser


def entry() -> None:
    run(main, cli())
