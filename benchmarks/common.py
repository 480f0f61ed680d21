"""Shared by the benchmarks: timing, the machine's description, and writing one section of docs/benchmarks.md."""

from __future__ import annotations

import datetime
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def median_ms(fn: Callable[[], object], repeat: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(title: str, body: str) -> None:
    """Replace (or add) the `## title` section of docs/benchmarks.md, keeping the others."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# fourbit benchmarks\n\nEach section names the command that made it.\n"
    section = f"## {title}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    DOC.write_text(text.rstrip() + "\n")


def today() -> str:
    return datetime.date.today().isoformat()


def rss_anon_mb() -> float:
    """Resident anonymous memory of this process: private memory, not pages of memory-mapped files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakMemory:
    """Samples rss_anon_mb every 5 ms in a thread from creation until stop(); `peak` is the highest seen."""

    def __init__(self):
        self.peak = rss_anon_mb()
        self._done = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.005)

    def stop(self) -> float:
        self._done.set()
        self.peak = max(self.peak, rss_anon_mb())
        return self.peak


RESULTS = DOC.with_suffix(".json")


def record_results(workload: str, rows: list[dict]) -> None:
    """Replace `workload`'s rows in docs/benchmarks.json, which benchmarks/chart.py draws. One row per target:
    {"metric": str, "fourbit": float, "reference": float, "unit": str,
     "advantage": float (how many times better fourbit is: reference/fourbit for times and memory,
                         fourbit/reference for rates; for accuracy, fourbit minus reference in points),
     "target": float (the advantage the issue asks for), "met": bool, "peer": str (what "reference" was)}"""
    import json

    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[workload] = {"date": today(), "machine": machine(), "rows": rows}
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def rss_anon_mb_of(pid: int) -> float | None:
    """Resident anonymous memory of process `pid` (None once it has gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return 0.0


def run_sampled(cmd: list[str], env: dict | None = None, interval: float = 0.005) -> dict:
    """Run `cmd` as a child process while the caller samples its RssAnon every `interval` seconds.
    Returns {"returncode", "stdout", "stderr", "seconds" (wall time of the whole process), "peak_mb"}."""
    import subprocess
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        peak = 0.0
        while proc.poll() is None:
            mb = rss_anon_mb_of(proc.pid)
            if mb is not None:
                peak = max(peak, mb)
            time.sleep(interval)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        return {"returncode": proc.returncode, "stdout": out.read(), "stderr": err.read(), "seconds": seconds,
                "peak_mb": peak}
