"""What a run reports: the progress bar / lines (:class:`Progress`, drawn with tqdm),
``metrics.csv`` (:class:`MetricsCSV`) and optional TensorBoard scalars (:class:`TensorBoard`).
Only rank 0 of a several-process run creates any of them."""

from __future__ import annotations

import csv
import io
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from .checkpoints import atomic_write
from .config import ConfigError

__all__ = ["Progress", "MetricsCSV", "TensorBoard", "read_metrics", "METRICS", "CSV_FIELDS",
           "TENSORBOARD_DIR"]

METRICS = "metrics.csv"
CSV_FIELDS = ["iteration", "split", "loss", "accuracy", "ci95", "time"]
TENSORBOARD_DIR = "tensorboard"


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{s // 60}:{s % 60:02d}"


class Progress:
    """Progress on ``stream``: a tqdm bar when ``stream`` is a TTY (``bar=None``) or ``bar=True``,
    else a plain line every ``every`` iterations. Both show the iteration, the running loss and
    accuracy (mean of the last ``window``), it/s and the ETA; :meth:`write` prints a message
    above the bar."""

    def __init__(self, total: int, initial: int = 0, *, bar: bool | None = None,
                 every: int = 100, stream: TextIO | None = None, window: int = 100,
                 loss_name: str = "loss"):
        self.stream = sys.stderr if stream is None else stream
        if bar is None:
            bar = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar, self.every, self.total, self.initial = bar, max(1, every), total, initial
        self.loss_name = loss_name
        self.losses: deque[float] = deque(maxlen=window)
        self.accs: deque[float] = deque(maxlen=window)
        self.t0 = time.perf_counter()
        self._tqdm = None

    def _bar(self):
        if self._tqdm is None:
            from tqdm import tqdm

            # "[####----]  50% 2/4 | loss ... | acc ... | 12.3 it/s | eta 0:01"; our own status
            # text (running means, it/s of this process) in tqdm's description slot
            self._tqdm = tqdm(total=self.total, initial=self.initial, file=self.stream,
                              ascii=" #", dynamic_ncols=True, mininterval=0.1, leave=True,
                              bar_format="[{bar:24}] {percentage:3.0f}% {desc}")
        return self._tqdm

    def rate(self, iteration: int) -> float:
        dt = time.perf_counter() - self.t0
        return (iteration - self.initial) / dt if dt > 0 else math.nan

    def _status(self, iteration: int) -> str:
        loss = sum(self.losses) / len(self.losses) if self.losses else math.nan
        accs = [a for a in self.accs if math.isfinite(a)]
        rate = self.rate(iteration)
        eta = (self.total - iteration) / rate if rate > 0 else math.nan
        text = f"{iteration}/{self.total} | {self.loss_name} {loss:.4f}"
        if accs:
            text += f" | acc {sum(accs) / len(accs):.3f}"
        return text + f" | {rate:.1f} it/s | eta {_clock(eta)}"

    def extend(self, history: list[tuple[float, float]]) -> None:
        """Prefill the running window with earlier (loss, accuracy) pairs (a resumed run)."""
        for loss, acc in history[-(self.losses.maxlen or len(history)):]:
            self.losses.append(loss)
            self.accs.append(acc)

    def update(self, iteration: int, loss: float, accuracy: float) -> None:
        self.losses.append(loss)
        self.accs.append(accuracy)
        if self.bar:
            bar = self._bar()
            bar.set_description_str(self._status(iteration), refresh=False)
            bar.update(iteration - bar.n)
            if iteration == self.total:
                bar.refresh()
        elif iteration % self.every == 0 or iteration == self.total:
            self.stream.write(f"iter {self._status(iteration)}\n")
            self.stream.flush()

    def write(self, message: str) -> None:
        if self._tqdm is not None:
            self._tqdm.write(message, file=self.stream)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


class TensorBoard:
    """Scalars ``{split}/{loss|accuracy|ci95}`` against the iteration, in ``out/tensorboard``
    (``tensorboard --logdir OUT``); needs the ``tensorboard`` package (``pip install
    'bilevel-meta[tensorboard]'``), refused with :class:`ConfigError` before training
    otherwise."""

    @staticmethod
    def check():
        """``torch.utils.tensorboard.SummaryWriter``, or :class:`ConfigError` saying what to
        install."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(f"--tensorboard needs the tensorboard package, which is not "
                              f"installed ({err}): pip install 'bilevel-meta[tensorboard]' "
                              f"(or pip install tensorboard)") from None
        return SummaryWriter

    def __init__(self, out: Path, *, purge_step: int | None = None):
        SummaryWriter = self.check()
        # purge_step: a resumed run hides the events written after its checkpoint
        self.writer = SummaryWriter(str(Path(out) / TENSORBOARD_DIR), purge_step=purge_step)

    def add(self, iteration: int, split: str, loss: float, accuracy: float,
            ci95: float) -> None:
        for key, value in (("loss", loss), ("accuracy", accuracy), ("ci95", ci95)):
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(f"{split}/{key}", value, iteration)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _fmt(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


def _parse(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def read_metrics(path: Path, upto: int) -> list[dict[str, Any]]:
    """Rows of an existing metrics.csv for iterations <= ``upto`` (train and val only)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r.get("split") in ("train", "val") and int(r["iteration"]) <= upto:
                rows.append({"iteration": int(r["iteration"]), "split": r["split"],
                             "loss": _parse(r["loss"]), "accuracy": _parse(r["accuracy"]),
                             "ci95": _parse(r.get("ci95", "")), "time": _parse(r["time"])})
    return rows


class MetricsCSV:
    """``metrics.csv``: rewritten from the rows kept (a resumed run drops later rows), then
    appended to; ``flush()`` at every checkpoint."""

    def __init__(self, path: Path, rows: list[dict[str, Any]]):
        self.path, self.rows = path, list(rows)
        buf = io.StringIO(newline="")
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        for r in self.rows:
            w.writerow(self._cells(r))
        atomic_write(path, lambda f: f.write(buf.getvalue()), binary=False)
        self.file = open(path, "a", newline="")
        self.writer = csv.writer(self.file, lineterminator="\n")

    @staticmethod
    def _cells(r):
        return [r["iteration"], r["split"], _fmt(r["loss"]), _fmt(r["accuracy"]),
                _fmt(r["ci95"]), f"{r['time']:.3f}"]

    def add(self, iteration: int, split: str, loss: float, accuracy: float, ci95: float,
            elapsed: float) -> None:
        row = {"iteration": iteration, "split": split, "loss": loss, "accuracy": accuracy,
               "ci95": ci95, "time": elapsed}
        self.rows.append(row)
        self.writer.writerow(self._cells(row))

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()

    def series(self, split: str, key: str) -> list[tuple[float, float]]:
        return [(r["iteration"], r[key]) for r in self.rows if r["split"] == split]

