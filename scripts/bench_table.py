#!/usr/bin/env python3
"""Renders criterion results as a markdown table.

Usage: scripts/bench_table.py GROUP_PREFIX [--baseline FUNCTION] [--criterion DIR]

Reads <DIR>/<group>/<function>/<parameter>/new/{benchmark,estimates}.json for
every group whose name starts with GROUP_PREFIX (DIR defaults to
$CARGO_TARGET_DIR/criterion, else target/criterion) and prints one row per
group and parameter: each function's mean time and throughput, and, with
--baseline, each function's throughput as a ratio of the baseline's measured
in the same run.
"""

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path


def fmt_time(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def fmt_rate(x):
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}/s"
    return f"{x:.3g}/s"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prefix")
    ap.add_argument("--baseline")
    ap.add_argument("--criterion")
    a = ap.parse_args()
    root = Path(a.criterion or Path(os.environ.get("CARGO_TARGET_DIR", "target")) / "criterion")
    if not root.is_dir():
        sys.exit(f"no criterion results under {root}")
    rows = defaultdict(dict)  # (group, param) -> function -> (mean ns, elements)
    for bench in sorted(root.glob("*/**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        if not meta["group_id"].startswith(a.prefix):
            continue
        est = json.loads((bench.parent / "estimates.json").read_text())
        elements = (meta.get("throughput") or {}).get("Elements")
        param = meta.get("value_str") or ""
        rows[(meta["group_id"], param)][meta["function_id"]] = (est["mean"]["point_estimate"], elements)
    if not rows:
        sys.exit(f"no groups starting with {a.prefix!r} under {root}")
    functions = sorted({f for r in rows.values() for f in r}, key=lambda f: (f != a.baseline, f))
    head = ["group", "batch"] + [f"{f}" for f in functions]
    if a.baseline:
        head += [f"{f} / {a.baseline}" for f in functions if f != a.baseline]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    def key(k):
        g, p = k
        return (g, int(p) if p.isdigit() else p)

    for (group, param) in sorted(rows, key=key):
        r = rows[(group, param)]
        cells = [group, param]
        for f in functions:
            if f in r:
                ns, el = r[f]
                cells.append(f"{fmt_time(ns)}" + (f" ({fmt_rate(el / ns * 1e9)})" if el else ""))
            else:
                cells.append("")
        if a.baseline:
            base = r.get(a.baseline)
            for f in functions:
                if f == a.baseline:
                    continue
                if base and f in r:
                    cells.append(f"{base[0] / r[f][0]:.2f}×")
                else:
                    cells.append("")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
