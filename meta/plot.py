"""Learning curves as PNG, drawn with matplotlib (the optional ``plot`` extra).

:func:`save_curve` draws the training loss (raw and smoothed), the validation points and, for
classification, the accuracy, against the iteration, through ``matplotlib.figure.Figure`` and
the Agg canvas (no ``pyplot``, no global state, no display needed). matplotlib is not a core
dependency: ``pip install 'bilevel-meta[plot]'``; without it :func:`save_curve` raises an
``ImportError`` that says so (``meta-train`` then warns and writes everything else).
:func:`write_png` saves an image array with Pillow (a matplotlib dependency).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["save_curve", "write_png", "smooth", "require_matplotlib"]

Series = Sequence[tuple[float, float]]  # (iteration, value) pairs

TRAIN_RAW = "#aac8eb"
TRAIN = "#1f77b4"
VAL = "#d62728"

_INSTALL = "pip install 'bilevel-meta[plot]' (or pip install matplotlib)"


def require_matplotlib():
    """``(Figure, FigureCanvasAgg)``, or an ImportError naming the ``plot`` extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"meta.plot draws learning curves with matplotlib, which is not "
                          f"installed ({err}): {_INSTALL}") from err
    return Figure, FigureCanvasAgg


def smooth(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing moving average (window ``max(1, n // 50)`` by default), NaNs ignored."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return []
    window = max(1, n // 50) if window is None else max(1, int(window))
    ok = np.isfinite(v)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, n + 1)
    lo = np.maximum(0, hi - window)
    cnt = ccnt[hi] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (csum[hi] - csum[lo]) / cnt
    return [float(x) if c else math.nan for x, c in zip(out, cnt)]


def save_curve(path: str | os.PathLike, train_loss: Series, val_loss: Series = (),
               train_acc: Series = (), val_acc: Series = (), *, loss_label: str = "loss",
               train_label: str = "train", val_label: str = "val", title: str = "",
               backend: str = "matplotlib") -> str:
    """Write the learning curve to ``path`` (PNG, 640 pixels wide, 320 per panel); returns
    ``"matplotlib"``.

    One panel for the loss (``train_loss`` raw and smoothed, ``val_loss`` as points) and, when
    ``train_acc`` or ``val_acc`` has finite values, a second one for the accuracy. Non-finite
    values are left out. ``backend`` is kept for compatibility: ``"matplotlib"`` or ``"auto"``
    (the same; the built-in rasteriser of earlier versions is gone). Raises ImportError naming
    the ``plot`` extra when matplotlib is missing."""
    if backend not in ("auto", "matplotlib"):
        raise ValueError(f"backend must be 'matplotlib' (or 'auto', the same), got "
                         f"{backend!r}; the built-in PNG rasteriser was removed: {_INSTALL}")
    Figure, FigureCanvasAgg = require_matplotlib()
    panels = [(loss_label, _finite(train_loss), _finite(val_loss))]
    if _finite(train_acc) or _finite(val_acc):
        panels.append(("accuracy", _finite(train_acc), _finite(val_acc)))
    fig = Figure(figsize=(6.4, 3.2 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, train, val) in zip(axes, panels):
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, ys, color=TRAIN_RAW, lw=0.6, label=train_label)
            ax.plot(xs, smooth(ys), color=TRAIN, lw=1.5, label=f"{train_label}, smoothed")
        if val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, "o-", color=VAL, ms=3.5, lw=1.0, label=val_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("iteration")
    if title:
        axes[0].set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return "matplotlib"


def _finite(series: Series) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in series if math.isfinite(float(y))]


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an ``[H, W, 3]`` (RGB) or ``[H, W]`` (grey) uint8 array as an 8-bit PNG (Pillow,
    installed with the ``plot`` extra)."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"write_png needs uint8 [H, W] or [H, W, 3], got {img.dtype} "
                         f"{list(img.shape)}")
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(f"meta.plot.write_png needs Pillow, which is not installed ({err}): "
                          f"{_INSTALL}") from err
    Image.fromarray(np.ascontiguousarray(img)).save(os.fspath(path), format="PNG")
