"""Markdown table of meta-train runs: python scripts/omniglot_table.py DIR [DIR...]

Reads every DIR/*/results.json (or DIR/results.json) and prints algorithm, setting, test accuracy
± 95% CI, iterations, wall time, device and the paper's number for that setting where the
original paper reports Omniglot (ALGORITHMS.md: Finn et al. 2017 Table 1, Rajeswaran et al. 2019
Table 2; the Sign-MAML, Sharp-MAML and memory-reduced papers report no Omniglot result, ANIL
only 20-way).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (algorithm, ways, shots) -> published test accuracy on Omniglot (%, 95% CI)
PAPER = {("maml", 5, 1): "98.7 ± 0.4", ("maml", 5, 5): "99.9 ± 0.1",
         ("maml", 20, 1): "95.8 ± 0.3", ("fomaml", 5, 1): "98.3 ± 0.5",
         ("fomaml", 5, 5): "99.2 ± 0.2", ("imaml", 5, 1): "99.16 ± 0.35",
         ("imaml", 5, 5): "99.67 ± 0.12", ("reptile", 5, 1): "97.68 ± 0.04",
         ("anil", 20, 1): "96.2 ± 0.5"}


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
                       f"{a['inner_lr']:g} x {a['inner_steps']} (test "
                       f"{t.get('inner_lr') or a.get('eval_inner_lr') or a['inner_lr']:g} x "
                       f"{a['eval_inner_steps']}) | "
                       f"{100 * t['mean']:.2f} ± {100 * t['ci95']:.2f} % | {r['iterations']} | "
                       f"{minutes:.0f} min | {r['device']}, {r['threads']} thread(s), "
                       f"{r['finished'][:10]} | "
                       f"{PAPER.get((r['algorithm'], a['ways'], a['shots']), '—')} |")
    return out


if __name__ == "__main__":
    print("| algorithm | setting | inner lr x steps | test accuracy (600 tasks, 95 % CI) | "
          "iterations | wall time | device | paper |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows(sys.argv[1:] or ["runs/omniglot-cpu"])))
