"""Run every benchmark and print one short table (make bench).

Each bench script prints its own figures and ends with machine-readable lines
`BENCH <name> <value> <goal> <op>` (op: <= or >=, the value is usually a ratio
against a baseline measured in the same run). This runs them one after another
(never in parallel: they measure time on a 2-core machine) and tabulates.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = [
    "bench_hash.py",
    "bench_deploy.py",
    "bench_fleet.py",
    "bench_pull.py",
    "bench_engines.py",
    "bench_reload.py",
    "bench_precheck.py",
    "bench_convert.py",
]


def run(script: Path) -> tuple[list[list[str]], int]:
    print(f"\n### {script.name}", flush=True)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        print(proc.stderr.rstrip()[-2000:], file=sys.stderr)
    rows = [line.split()[1:5] for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    return rows, proc.returncode


def main() -> int:
    scripts = [HERE / n for n in ORDER if (HERE / n).exists()]
    scripts += sorted(p for p in HERE.glob("bench_*.py") if p.name not in ORDER)
    table, failed = [], []
    for script in scripts:
        rows, code = run(script)
        table += [[script.stem, *r] for r in rows]
        if code != 0:
            failed.append(script.name)
    print("\n| bench | figure | value | goal | met |\n|---|---|---|---|---|")
    for bench, name, value, goal, op in table:
        met = float(value) <= float(goal) if op == "<=" else float(value) >= float(goal)
        print(f"| {bench} | {name} | {value} | {op} {goal} | {'yes' if met else 'NO'} |")
    if failed:
        print(f"\nbenchmarks that failed to run: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
