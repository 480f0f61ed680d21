"""Draw docs/benchmarks.png from docs/benchmarks.json (written by common.record_results).

    python benchmarks/chart.py [--json docs/benchmarks.json] [--out docs/benchmarks.png]

One horizontal bar per row: fourbit's advantage over the reference (how many times better for times, memory and
rates; points ahead for accuracy), drawn from parity (1x, or 0 points), with the row's target as a black marker. A bar
is green when the row's target is met, red when not. Rows are grouped by workload, one panel each; the ratio panels
share one x axis, on a log scale when the values span more than a factor of 5. The title gives the date and machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GREEN, RED = "#2e9d4a", "#d03b32"
DIFFERENCE_UNITS = ("points", "pts", "pp", "%")
REQUIRED = ("metric", "fourbit", "reference", "unit", "advantage", "target", "met")


def is_difference(row: dict) -> bool:
    """Rows whose advantage is fourbit minus reference (accuracy), not a ratio."""
    return str(row["unit"]).lower() in DIFFERENCE_UNITS or "accuracy" in str(row["metric"]).lower()


def load_rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        sys.exit(f"{path}: not found (run the benchmarks first: python benchmarks/run_all.py)")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        sys.exit(f"{path}: not valid JSON ({err})")
    if not isinstance(data, dict) or not data:
        sys.exit(f"{path}: holds no workloads")
    for workload, entry in data.items():
        rows = entry.get("rows") if isinstance(entry, dict) else None
        if not isinstance(rows, list):
            sys.exit(f"{path}: workload {workload!r} has no list of rows")
        for i, row in enumerate(rows):
            missing = [k for k in REQUIRED if k not in row]
            if missing:
                sys.exit(f"{path}: workload {workload!r}, row {i} ({row.get('metric', '?')}): missing {missing}")
            for key in ("advantage", "target"):
                if not isinstance(row[key], (int, float)) or not math.isfinite(row[key]):
                    sys.exit(f"{path}: workload {workload!r}, row {row['metric']!r}: {key} is {row[key]!r}")
    return data


def _value(x: float, unit: str) -> str:
    if unit == "s":
        return f"{x:.3g} s" if x < 100 else f"{x:.0f} s"
    if unit == "MB":
        return f"{x:.0f} MB"
    return f"{x:.3g} {unit}"


def draw(data: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = []  # (title, rows, difference?)
    for workload, entry in data.items():
        rows = entry["rows"]
        for diff in (False, True):
            part = [r for r in rows if is_difference(r) == diff]
            if part:
                panels.append((workload, entry, part, diff))
    if not any(p[2] for p in panels):
        sys.exit("no rows to draw")

    dates = Counter(e.get("date", "?") for _, e, _, _ in panels)
    machines = Counter(e.get("machine", "?") for _, e, _, _ in panels)
    date, host = max(dates, key=lambda d: (d != "?", d)), machines.most_common(1)[0][0]

    # the ratio panels share one x axis (comparable at a glance): log when the values span more than a factor of 5
    ratios = [v for _, _, rows, diff in panels if not diff for r in rows for v in (r["advantage"], r["target"])]
    ratios = [v for v in ratios if v > 0] + [1.0]
    ratio_log = max(ratios) / min(ratios) > 5
    ratio_lim = (min(ratios) / 1.6, max(ratios) * 2.2) if ratio_log else (0.0, max(ratios) * 1.2)

    heights = [0.55 * len(rows) + 0.9 for _, _, rows, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) + 1.2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)  # fmt: skip
    for ax, (workload, entry, rows, diff) in zip(axes[:, 0], panels, strict=True):
        base = 0.0 if diff else 1.0
        values = [r["advantage"] for r in rows] + [r["target"] for r in rows]
        ys = list(range(len(rows)))[::-1]
        for y, row in zip(ys, rows, strict=True):
            adv = row["advantage"]
            if not diff and adv <= 0:  # a ratio can't be <= 0; draw nothing rather than fail
                continue
            color = GREEN if row["met"] else RED
            ax.barh(y, adv - base, left=base, height=0.6, color=color, alpha=0.9)
            ax.plot([row["target"]], [y], marker="D", color="black", markersize=7, zorder=3)
            label = f"{adv:+.1f} pts" if diff else f"{adv:.2f}x"
            right = adv >= base  # the label beyond the bar's end and the target marker, whichever is farther out
            at = max(adv, row["target"]) if right else min(adv, row["target"])
            ax.annotate(label, (at, y), xytext=(7 if right else -7, 0), textcoords="offset points",
                        ha="left" if right else "right", va="center", fontsize=9)  # fmt: skip
        names = [f"{r['metric']}\nfourbit {_value(r['fourbit'], r['unit'])} vs {_value(r['reference'], r['unit'])}"
                 + (f" ({r['peer']})" if r.get("peer") and len(str(r["peer"])) < 50 else "") for r in rows]  # fmt: skip
        ax.set_yticks(ys, names, fontsize=8)
        ax.axvline(base, color="grey", linewidth=0.8)
        if diff:
            lo, hi = min(values + [base]), max(values + [base])
            pad = (hi - lo) * 0.15 or 0.5
            ax.set_xlim(lo - pad, hi + pad)
        else:
            if ratio_log:
                ax.set_xscale("log")
            ax.set_xlim(*ratio_lim)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        when = entry.get("date", "?")
        ax.set_title(f"{workload}" + (" (accuracy)" if diff else "") + (f" (measured {when})" if when != date else ""), loc="left", fontsize=11,
                     fontweight="bold")  # fmt: skip
        ax.set_xlabel("fourbit minus reference, points" if diff else
                      "fourbit's advantage: times better than the reference (higher is better)", fontsize=8)  # fmt: skip
        ax.grid(axis="x", alpha=0.3, which="both")
        ax.set_ylim(-0.7, len(rows) - 0.3)

    legend = [Patch(color=GREEN, label="target met"), Patch(color=RED, label="target not met"),
              Line2D([], [], marker="D", color="black", linestyle="", label="target")]  # fmt: skip
    fig.legend(handles=legend, loc="upper right", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"fourbit benchmarks, {date}\n{host}", x=0.01, ha="left", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.png")
    args = parser.parse_args()
    draw(load_rows(args.json), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
