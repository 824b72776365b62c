"""Markdown table of meta-train runs: python scripts/omniglot_table.py DIR [DIR...]

Reads every DIR/*/results.json (or DIR/results.json) and prints algorithm, setting, test accuracy
± 95% CI, iterations, wall time and device, one row per run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(paths: list[str]) -> list[str]:
    out = []
    for root in map(Path, paths):
        files = [root / "results.json"] if (root / "results.json").exists() else sorted(
            root.glob("*/results.json"))
        for f in files:
            r = json.loads(f.read_text())
            a, t = r["args"], r["test"]
            minutes = (r["train_time_s"] + r["test_time_s"]) / 60
            out.append(f"| {r['algorithm']} | {a['ways']}-way {a['shots']}-shot | "
                       f"{100 * t['mean']:.2f} ± {100 * t['ci95']:.2f} % | {r['iterations']} | "
                       f"{minutes:.0f} min | {r['device']}, {r['threads']} thread(s), "
                       f"{r['finished'][:10]} |")
    return out


if __name__ == "__main__":
    print("| algorithm | setting | test accuracy (600 tasks, 95 % CI) | iterations | wall time "
          "| device |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows(sys.argv[1:] or ["runs/omniglot-cpu"])))
