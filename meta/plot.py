"""Learning curves as PNG, with matplotlib when it is importable and without it otherwise.

:func:`save_curve` draws the training loss (raw and smoothed), the validation points and, for
classification, the accuracy, against the iteration. ``backend="auto"`` uses matplotlib
(through ``matplotlib.figure.Figure`` and the Agg canvas: no ``pyplot``, no global state)
when it can be imported and falls back to a small built-in rasteriser otherwise, so the
library itself needs no plotting dependency. The fallback draws with numpy into an RGB image
(axes, ticks, a 3x5 pixel font for the numbers and labels) and :func:`write_png` encodes it
with ``zlib`` and ``struct``.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["save_curve", "write_png", "smooth"]

Series = Sequence[tuple[float, float]]  # (iteration, value) pairs

TRAIN_RAW = (170, 200, 235)
TRAIN = (31, 119, 180)
VAL = (214, 39, 40)
AXIS = (60, 60, 60)
GRID = (228, 228, 228)
TEXT = (30, 30, 30)


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
               backend: str = "auto") -> str:
    """Write the learning curve to ``path`` (PNG); returns the backend used.

    One panel for the loss (``train_loss`` raw and smoothed, ``val_loss`` as points) and, when
    ``train_acc`` or ``val_acc`` has finite values, a second one for the accuracy.
    ``backend``: ``"auto"`` (matplotlib if importable, else built-in), ``"matplotlib"`` or
    ``"builtin"`` (which draws the legend labels with a small font: keep them short).
    """
    if backend not in ("auto", "matplotlib", "builtin"):
        raise ValueError(f"backend must be 'auto', 'matplotlib' or 'builtin', got {backend!r}")
    panels = [(loss_label, _finite(train_loss), _finite(val_loss))]
    if _finite(train_acc) or _finite(val_acc):
        panels.append(("accuracy", _finite(train_acc), _finite(val_acc)))
    if backend in ("auto", "matplotlib"):
        try:
            _save_matplotlib(path, panels, title, train_label, val_label)
            return "matplotlib"
        except ImportError:
            if backend == "matplotlib":
                raise
    _save_builtin(path, panels, train_label, val_label)
    return "builtin"


def _finite(series: Series) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in series if math.isfinite(float(y))]


# ----------------------------------------------------------------------------- matplotlib


def _save_matplotlib(path, panels, title: str, train_label: str, val_label: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.2 * len(panels)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (label, train, val) in zip(axes, panels):
        if train:
            xs, ys = zip(*train)
            ax.plot(xs, ys, color=_hex(TRAIN_RAW), lw=0.6, label=train_label)
            ax.plot(xs, smooth(ys), color=_hex(TRAIN), lw=1.5, label=f"{train_label}, smoothed")
        if val:
            xs, ys = zip(*val)
            ax.plot(xs, ys, "o-", color=_hex(VAL), ms=3.5, lw=1.0, label=val_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("iteration")
    if title:
        axes[0].set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


# ----------------------------------------------------------------------------- built-in

# 3x5 glyphs, rows top to bottom, '#' = ink.
_FONT = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# ### ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# ..# .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", ".": "... ... ... ... .#.", "-": "... ... ### ... ...",
    "+": "... .#. ### .#. ...", " ": "... ... ... ... ...", "(": ".#. #.. #.. #.. .#.",
    ")": ".#. ..# ..# ..# .#.", "a": "... ##. ..# #.# ###", "c": "... ### #.. #.. ###",
    "d": "..# ..# ### #.# ###", "e": "### #.# ### #.. ###", "g": "### #.# ### ..# ##.",
    "h": "#.. #.. ### #.# #.#", "i": ".#. ... .#. .#. .#.", "k": "#.. #.# ##. #.# #.#",
    "l": "##. .#. .#. .#. ###", "m": "... ### ### #.# #.#", "n": "... ##. #.# #.# #.#",
    "o": "... ### #.# #.# ###", "r": "... ### #.. #.. #..", "s": "... ### ##. ..# ###",
    "t": ".#. ### .#. .#. .##", "u": "... #.# #.# #.# ###", "v": "... #.# #.# #.# .#.",
    "y": "#.# #.# ### ..# ###", "w": "... #.# #.# ### #.#", "x": "... #.# .#. #.# #.#",
    "b": "#.. #.. ### #.# ###", "f": ".## #.. ### #.. #..", "p": "... ### #.# ### #..",
    "q": "... ### #.# ### ..#", "j": "..# ... ..# #.# ###", "z": "... ### .#. #.. ###",
    ",": "... ... ... .#. #..", ":": "... .#. ... .#. ...", "/": "..# ..# .#. #.. #..",
    "=": "... ### ... ### ...", "%": "#.# ..# .#. #.. #.#", "_": "... ... ... ... ###",
}
_GLYPHS = {c: np.array([[ch == "#" for ch in row] for row in g.split()], dtype=bool)
           for c, g in _FONT.items()}


class _Canvas:
    def __init__(self, width: int, height: int):
        self.img = np.full((height, width, 3), 255, dtype=np.uint8)

    def rect(self, x0, y0, x1, y1, color) -> None:
        h, w = self.img.shape[:2]
        x0, x1 = sorted((int(round(x0)), int(round(x1))))
        y0, y1 = sorted((int(round(y0)), int(round(y1))))
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
        if x0 <= x1 and y0 <= y1:
            self.img[y0:y1 + 1, x0:x1 + 1] = color

    def line(self, x0, y0, x1, y1, color, width: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.rint(np.linspace(x0, x1, n + 1)).astype(int)
        ys = np.rint(np.linspace(y0, y1, n + 1)).astype(int)
        h, w = self.img.shape[:2]
        for dx in range(width):
            for dy in range(width):
                px, py = xs + dx - width // 2, ys + dy - width // 2
                ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
                self.img[py[ok], px[ok]] = color

    def polyline(self, pts, color, width: int = 1) -> None:
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            self.line(x0, y0, x1, y1, color, width)

    def text(self, x, y, s: str, color=TEXT, scale: int = 2, anchor: str = "left") -> None:
        s = s.lower()
        width = (4 * len(s) - 1) * scale
        x = int(x - width if anchor == "right" else x - width // 2 if anchor == "center" else x)
        y = int(y)
        h, w = self.img.shape[:2]
        for i, ch in enumerate(s):
            glyph = _GLYPHS.get(ch, _GLYPHS[" "])
            big = np.kron(glyph, np.ones((scale, scale), dtype=bool))
            gx, gy = x + 4 * i * scale, y
            if gx < 0 or gy < 0 or gx + big.shape[1] > w or gy + big.shape[0] > h:
                continue
            self.img[gy:gy + big.shape[0], gx:gx + big.shape[1]][big] = color


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if float(v).is_integer() and abs(v) < 1e7:
        return str(int(v))
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    return f"{v:.4g}"


def _limits(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def _save_builtin(path, panels, train_label: str = "train", val_label: str = "val") -> None:
    width, panel_h = 640, 300
    canvas = _Canvas(width, panel_h * len(panels))
    xs_all = [x for _, t, v in panels for x, _ in t + v] or [0.0, 1.0]
    xlim = _limits(xs_all)
    left, right, top, bottom = 78, 16, 26, 44
    for k, (label, train, val) in enumerate(panels):
        oy = k * panel_h
        x0, x1, y0, y1 = left, width - right, oy + top, oy + panel_h - bottom
        smoothed = list(zip([x for x, _ in train], smooth([y for _, y in train])))
        ys_all = [y for _, y in train + val] or [0.0, 1.0]
        ylim = _limits(ys_all)

        def px(x, xlim=xlim, x0=x0, x1=x1):
            return x0 + (x - xlim[0]) / (xlim[1] - xlim[0]) * (x1 - x0)

        def py(y, ylim=ylim, y0=y0, y1=y1):
            return y1 - (y - ylim[0]) / (ylim[1] - ylim[0]) * (y1 - y0)

        for t in _ticks(*ylim):
            canvas.line(x0, py(t), x1, py(t), GRID)
            canvas.text(x0 - 6, py(t) - 5, _fmt(t), anchor="right")
        for t in _ticks(*xlim):
            canvas.line(px(t), y0, px(t), y1, GRID)
            canvas.line(px(t), y1, px(t), y1 + 4, AXIS)
            canvas.text(px(t), y1 + 8, _fmt(t), anchor="center")
        canvas.line(x0, y0, x0, y1, AXIS)
        canvas.line(x0, y1, x1, y1, AXIS)
        if len(train) > 1:
            canvas.polyline([(px(x), py(y)) for x, y in train], TRAIN_RAW)
            canvas.polyline([(px(x), py(y)) for x, y in smoothed if math.isfinite(y)], TRAIN, 2)
        elif train:
            x, y = train[0]
            canvas.rect(px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2, TRAIN)
        if len(val) > 1:
            canvas.polyline([(px(x), py(y)) for x, y in val], VAL)
        for x, y in val:
            canvas.rect(px(x) - 3, py(y) - 3, px(x) + 3, py(y) + 3, VAL)
        canvas.text(x0, oy + 6, label)
        legend_x = x1 - 8 * (len(train_label) + len(val_label)) - 40
        canvas.rect(legend_x, oy + 8, legend_x + 10, oy + 14, TRAIN)
        canvas.text(legend_x + 16, oy + 6, train_label)
        legend_x += 8 * len(train_label) + 28
        canvas.rect(legend_x, oy + 8, legend_x + 10, oy + 14, VAL)
        canvas.text(legend_x + 16, oy + 6, val_label)
        if k == len(panels) - 1:
            canvas.text((x0 + x1) / 2, y1 + 24, "iteration", anchor="center")
    write_png(path, canvas.img)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an ``[H, W, 3]`` (RGB) or ``[H, W]`` (grey) uint8 array as an 8-bit PNG."""
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"write_png needs uint8 [H, W] or [H, W, 3], got {img.dtype} "
                         f"{list(img.shape)}")
    h, w = img.shape[:2]
    colour = 2 if img.ndim == 3 else 0
    rows = np.ascontiguousarray(img).reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)
