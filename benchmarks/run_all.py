"""Every benchmark in sequence, then the chart: the one command that remakes docs/benchmarks.md, .json and .png.

    python benchmarks/run_all.py [--repeats N] [--only load merge ...]

Runs bench_kernels.py, bench_load.py --size 1.1b 7b, bench_merge.py, bench_generate.py, bench_train.py and
bench_levers.py (each in
its own process; `--repeats N` is passed to the scripts that take it), then chart.py. A script that is missing is
skipped with a message; a script that fails does not stop the others, and the exit status is 1. The 7B load needs
~14 GB of disk in /tmp (written once, then reused) and ~6 GB of memory for the reference; run on a quiet machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, script, extra arguments)
WORKLOADS = [
    ("kernels", "bench_kernels.py", []),
    ("load", "bench_load.py", ["--size", "1.1b", "7b"]),
    ("merge", "bench_merge.py", []),
    ("generate", "bench_generate.py", []),
    ("train", "bench_train.py", []),
    ("levers", "bench_levers.py", []),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="passed on to the scripts that take --repeats (default: each script's own)")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=[w[0] for w in WORKLOADS], help="run only these workloads")
    parser.add_argument("--no-chart", action="store_true", help="do not draw docs/benchmarks.png at the end")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")

    results: list[tuple[str, str, float]] = []
    for name, script, extra in WORKLOADS:
        if args.only and name not in args.only:
            continue
        path = HERE / script
        if not path.exists():
            print(f"== {name}: skipped, {path.relative_to(HERE.parent)} does not exist", flush=True)
            results.append((name, "skipped (script missing)", 0.0))
            continue
        command = [sys.executable, str(path), *extra]
        if args.repeats is not None:
            if "--repeats" in path.read_text():
                command += ["--repeats", str(args.repeats)]
            else:
                print(f"== {name}: {script} takes no --repeats; running it with its defaults", flush=True)
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.run(command, cwd=HERE.parent).returncode
        seconds = time.perf_counter() - start
        results.append((name, "ok" if code == 0 else f"FAILED (exit status {code})", seconds))

    chart = "not drawn (--no-chart)"
    if not args.no_chart:
        code = subprocess.run([sys.executable, str(HERE / "chart.py")], cwd=HERE.parent).returncode
        chart = "ok" if code == 0 else f"FAILED (exit status {code})"

    print("\n== summary")
    for name, status, seconds in results:
        print(f"{name:10s} {status}" + (f" in {seconds:.0f} s" if seconds else ""))
    print(f"{'chart':10s} {chart}")
    failed = any(status.startswith("FAILED") for _, status, _ in results) or chart.startswith("FAILED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
