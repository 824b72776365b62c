"""Median wall time of one MAML meta-step per peer (Conv4, Omniglot-sized, CPU by default).

Default setting: Conv4 with 64 filters, 16 tasks, 5-way 1-shot, 15 queries per class, float32,
second order, K=1 and K=5 inner SGD steps (lr 0.4).  Each measurement is one call of
``meta_grad_<peer>`` (inner loops + meta-gradient for all tasks); one untimed warm-up call per
peer precedes the timed repeats, which are interleaved across peers.

    python benchmarks/peers/quick_timing.py            # or: python -m benchmarks.peers.quick_timing
    python benchmarks/peers/quick_timing.py --repeats 3 --steps 1 --peers plain higher
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``benchmarks.peers`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from benchmarks.peers import maml as peers  # noqa: E402
from benchmarks.peers.conv4 import conv4, omniglot_like_batch  # noqa: E402


def _fmt(times: list[float]) -> str:
    return f"{statistics.median(times):7.3f} s  (min {min(times):.3f}, max {max(times):.3f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", nargs="*", default=list(peers.PEERS))
    ap.add_argument("--steps", nargs="*", type=int, default=[1, 5])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--queries", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--inner-lr", type=float, default=0.4)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--imaml", action="store_true",
                    help="also time imaml_grad_{plain,torchopt} (reg 2, 5 CG iterations)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"torch.get_num_threads()={torch.get_num_threads()}, {platform.processor() or ''}")
    status = peers.available_peers()
    for name in args.peers:
        ok, reason = status.get(name, (False, "unknown peer"))
        print(f"  {name:20s} {'ok ' if ok else 'N/A'} {reason}")
    print(f"Conv4 hidden {args.hidden}, {args.tasks} tasks, {args.ways}-way {args.shots}-shot, "
          f"{args.queries} queries, float32, inner lr {args.inner_lr}, "
          f"{'first' if args.first_order else 'second'} order, median of {args.repeats} "
          "interleaved repeats (after 1 warm-up each)")

    model = conv4(args.ways, args.hidden, dtype=torch.float32, seed=0)
    data = omniglot_like_batch(args.tasks, args.ways, args.shots, args.queries,
                               dtype=torch.float32, seed=0)

    # Interleaved: every repeat times each peer once, in a rotating order, so that transient
    # load on a shared machine hits all peers alike rather than whichever ran at the time.
    rows: list[tuple[str, int, str]] = []
    for steps in args.steps:
        calls = {}
        for name in args.peers:
            if not status.get(name, (False, ""))[0]:
                continue
            fn = peers.PEERS[name]
            calls[name] = (lambda fn=fn, steps=steps: fn(
                model, *data, args.inner_lr, steps, first_order=args.first_order))
        if args.imaml:
            calls["imaml_plain"] = (lambda steps=steps: peers.imaml_grad_plain(
                model, *data, args.inner_lr, steps, 2.0, 5))
            if status["torchopt"][0]:
                calls["imaml_torchopt"] = (lambda steps=steps: peers.imaml_grad_torchopt(
                    model, *data, args.inner_lr, steps, 2.0, 5))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()  # warm-up (lazy imports, allocator, first-call overheads)
        order = list(calls)
        for r in range(args.repeats):
            for name in order[r % len(order):] + order[:r % len(order)]:
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)
        for name in args.peers + ["imaml_plain", "imaml_torchopt"]:
            if name in times:
                rows.append((name, steps, _fmt(times[name])))
            elif name in args.peers:
                rows.append((name, steps, "unavailable"))
            else:
                continue
            print(f"  K={steps}  {name:20s} {rows[-1][2]}", flush=True)

    print("\n| peer | " + " | ".join(f"K={k}" for k in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    names = list(dict.fromkeys(r[0] for r in rows))
    for name in names:
        cells = [next((c for n, k, c in rows if n == name and k == s), "") for s in args.steps]
        print(f"| {name} | " + " | ".join(c.split("  (")[0].strip() for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
