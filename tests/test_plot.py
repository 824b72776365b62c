"""meta.plot: learning curves with matplotlib (the ``plot`` extra), PNG writing with Pillow, and
clear errors naming the extra when they are missing."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from meta.plot import save_curve, smooth, write_png

PIL = pytest.importorskip("PIL.Image", reason="Pillow (a matplotlib dependency) is missing")
pytest.importorskip("matplotlib", reason="matplotlib (the plot extra) is not installed")


def read_png(path) -> np.ndarray:
    with PIL.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_two_panels_when_there_is_an_accuracy(tmp_path):
    train_loss = [(i, 2.0 / (1 + i)) for i in range(1, 50)]
    acc = [(i, min(1.0, 0.2 + i / 50)) for i in range(1, 50)]
    backend = save_curve(tmp_path / "c.png", train_loss, [(0, 2.0), (25, 0.3)], acc,
                         [(0, 0.2), (25, 0.7)], title="maml on omniglot")
    assert backend == "matplotlib"
    img = read_png(tmp_path / "c.png")
    assert img.shape == (640, 640, 3)  # 6.4 in x 3.2 in per panel at 100 dpi
    assert img.min() < 100 and img.max() == 255  # something drawn on white
    # the training curve's colour (#1f77b4) is on the image
    assert (np.abs(img.astype(int) - [31, 119, 180]).sum(-1) < 30).any()


def test_one_panel_for_regression_and_non_finite_values_left_out(tmp_path):
    save_curve(tmp_path / "r.png", [(1, 1.0), (2, math.nan), (3, 0.5)], [(3, 0.7)],
               [(1, math.nan)], loss_label="query mse")
    assert read_png(tmp_path / "r.png").shape == (320, 640, 3)
    save_curve(tmp_path / "empty.png", [])  # nothing to draw is still a valid figure
    assert read_png(tmp_path / "empty.png").shape == (320, 640, 3)


def test_missing_matplotlib_names_the_plot_extra(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ImportError, match=r"bilevel-meta\[plot\]"):
        save_curve(tmp_path / "c.png", [(1, 1.0)])
    assert not (tmp_path / "c.png").exists()


def test_the_builtin_backend_is_gone_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="removed"):
        save_curve(tmp_path / "c.png", [(1, 1.0)], backend="builtin")


def test_write_png_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", img)
    assert np.array_equal(read_png(tmp_path / "x.png"), img)
    grey = img[..., 0]
    write_png(tmp_path / "g.png", grey)
    with PIL.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), grey)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "bad.png", img.astype(np.float32))


def test_smooth_is_a_trailing_mean_ignoring_nans():
    assert smooth([]) == []
    assert smooth([1.0, 3.0, math.nan, 5.0], window=2) == [1.0, 2.0, 3.0, 5.0]
    out = smooth([math.nan, math.nan], window=1)
    assert all(math.isnan(v) for v in out)
