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

Before anything starts, the system tools the demo runs (git, rsync) are checked. Each
command's output also goes to <dir>/demo.log. A step that fails stops the service the demo
started and ends the demo with one line: the step, what failed (a command's exit code, or
the service), the log to read; the exit code is the failed command's (5: the service).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from adapter_deploy.cli import service
from adapter_deploy.cli.demo_steps import DemoSteps, shown_path
from adapter_deploy.common import prereqs
from adapter_deploy.common.errors import HealthCheckFailed, UsageError
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


def script(name: str) -> str:
    return str(PROJECT_ROOT / "scripts" / name)


def build_store(demo: DemoSteps, root: Path) -> Path:
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
        demo.sh(*cmd, cwd=repo, quiet=True)
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


def clean(root: Path) -> int:
    # only a live service holding its pidfile is signalled (a stale pid may be a stranger's)
    if service.stop(root / "endpoint" / "serve.pid"):
        print("stopped the demo service")
    shutil.rmtree(root, ignore_errors=True)
    print(f"removed {root}")
    return 0


def story(root: Path) -> int:
    if root.exists():
        clean(root)
    demo = DemoSteps(root, {**os.environ, **GIT_ENV}, PROJECT_ROOT)
    with demo.stopping_service_on_failure():
        url = steps(demo, root)
    print(f"\nThe demo service keeps running on {url} (log: {shown_path(demo.service_log)}).")
    print("Try: PARAMS=demo/params.yaml make status    Stop and remove it: make demo-clean")
    return 0


def steps(demo: DemoSteps, root: Path) -> str:
    """The story, step by step; the service's URL (it keeps running)."""
    from adapter_deploy.kit.gemma import build_kit

    demo.step("0. Build the kit: a tiny real model and real LoRA adapters (no downloads)")
    kit = build_kit(root / "kit")
    print(f"base model {kit.base}\nadapters: good, good2, regressed under {kit.root}")
    build_store(demo, root)
    port = free_port()
    demo.env["PARAMS"] = str(write_params(root, kit.base, port))
    url = f"http://127.0.0.1:{port}"
    py = sys.executable

    demo.step("1. Start the local endpoint's inference service (hot reload on SIGUSR1)")
    demo.start_service(py, script("service.py"), "start", "--endpoint", "local", url=url)
    print(f"service ready on {url}; no adapter deployed yet")

    def version_and_deploy(cycle: int, adapter: Path, expect: int = 0) -> None:
        """`make version` then `make deploy` of gemma_4b to the local endpoint."""
        src = ("--model", "gemma_4b", "--cycle", str(cycle), "--src", str(adapter))
        demo.sh(py, script("version.py"), *src)
        where = ("--cycle", str(cycle), "--models", "gemma_4b", "--endpoints", "local")
        demo.sh(py, script("deploy_adapters.py"), *where, expect=expect)

    def answer(what: str = "service answers:") -> None:
        print(what, demo.ask(url, "gemma_4b", JAMES))

    demo.step("2. Version cycle 1 and deploy it: healthy")
    version_and_deploy(1, kit.good)
    answer()

    demo.step("3. A regressed cycle 2: the pre-check fails, nothing changes")
    version_and_deploy(2, kit.regressed, expect=HealthCheckFailed.exit_code)
    answer("service still answers:")

    demo.step("4. A good cycle 3: hot reload, acknowledged by the service, verified")
    version_and_deploy(3, kit.good2)
    answer()

    demo.step(
        "5. Cycle 4 fails AFTER activation (a failpoint forces the verify to fail): "
        "automatic rollback"
    )
    arm(root / "endpoint" / "adapters", "verify", "fail")
    version_and_deploy(4, kit.good, expect=HealthCheckFailed.exit_code)
    answer()

    demo.step("6. Manual rollback (make rollback): back to the release before cycle 3")
    demo.sh(py, script("deploy_adapters.py"), "--rollback", "--endpoints", "local")
    answer()

    demo.step("7. Status table and the last deploy-log entries")
    demo.sh(py, script("status.py"))
    demo.sh(py, script("versions.py"))
    log = root / "project" / "adapters" / "deploy_log.jsonl"
    for line in log.read_text().splitlines()[-4:]:
        e = json.loads(line)
        print(
            f"{e['timestamp']} {e['action']:8} cycle={e['cycle']} {e['endpoint']} "
            f"{e['versions']} -> {e['status']} ({e['duration_s']} s)"
        )
    return url


def main(args: argparse.Namespace) -> int:
    if not args.clean and not (PROJECT_ROOT / "scripts" / "version.py").is_file():
        raise UsageError(
            f"{PROJECT_ROOT} is not an Adapter Deploy checkout", "run make demo in the project"
        )
    root = Path(args.dir).resolve()
    if args.clean:
        return clean(root)
    absent = prereqs.missing(["demo"])  # make demo checked them before installing
    if absent:
        raise UsageError("; ".join(prereqs.missing_line(name) for name in absent))
    return story(root)


def cli() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--dir", default="demo", help="demo directory")
    parser.add_argument("--clean", action="store_true", help="stop the service, remove the dir")
    return parser


def entry() -> None:
    run(main, cli())
