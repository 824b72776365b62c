"""Readers (libsvm, IDX) on tiny fixtures in the real formats; synthetic generators; the
benchmark problems' exact value function h(x) (ijcnn1-type) against finite differences."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

import bilevel as bl
from bilevel.stochastic import datasets as ds
from bilevel.stochastic import problems as pb

pytest.importorskip("sklearn")

LIBSVM_TRAIN = """-1 1:0.5 2:-0.25 4:1
1 2:0.125 3:0.75
-1 1:-1 3:0.5 4:-0.5
"""
LIBSVM_TEST = """1 1:0.25
-1 2:1 3:-1
"""


def test_read_libsvm(tmp_path):
    tr, te = tmp_path / "ijcnn1", tmp_path / "ijcnn1.t"
    tr.write_text(LIBSVM_TRAIN)
    te.write_text(LIBSVM_TEST)
    X, y = ds.read_libsvm(tr)
    expect = torch.tensor([[0.5, -0.25, 0, 1], [0, 0.125, 0.75, 0], [-1, 0, 0.5, -0.5]],
                          dtype=torch.float64)
    assert torch.equal(X, expect) and torch.equal(y, torch.tensor([-1.0, 1, -1],
                                                                  dtype=torch.float64))
    Xt, _ = ds.read_libsvm(te, n_features=4)  # the test file lacks feature 4
    assert Xt.shape == (2, 4) and Xt[1, 2] == -1
    gz = tmp_path / "tr.gz"
    gz.write_bytes(gzip.compress(LIBSVM_TRAIN.encode()))
    assert torch.equal(ds.read_libsvm(gz)[0], X)
    with pytest.raises(bl.BilevelError, match="no file"):
        ds.read_libsvm(tmp_path / "missing")


def test_covtype_reader_split(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(50):
        feats = " ".join(f"{j + 1}:{rng.normal():.6f}" for j in range(54) if rng.random() < 0.5)
        lines.append(f"{i % 7 + 1} {feats}")
    p = tmp_path / "covtype"
    p.write_text("\n".join(lines) + "\n")
    split = ds.covtype(p, seed=1)
    sizes = [split[k][0].shape[0] for k in ("train", "val", "test")]
    assert sum(sizes) == 50 and sizes == [32, 8, 10]  # 64/16/20
    assert split["train"][0].shape[1] == 54
    assert set(torch.cat([split[k][1] for k in split]).tolist()) == set(range(7))
    assert torch.allclose(split["train"][0].mean(0), torch.zeros(54, dtype=torch.float64),
                          atol=1e-12)


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:  # written here, independently of write_idx
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">i", s) for s in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def test_read_idx(tmp_path):
    imgs = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    (tmp_path / "i").write_bytes(_idx_bytes(imgs, 0x08))
    (tmp_path / "l.gz").write_bytes(gzip.compress(_idx_bytes(np.array([7, 0, 3], np.uint8),
                                                              0x08)))
    (tmp_path / "f").write_bytes(_idx_bytes(np.array([1.5, -2.0], np.float32), 0x0D))
    assert torch.equal(ds.read_idx(tmp_path / "i"), torch.from_numpy(imgs))
    assert ds.read_idx(tmp_path / "l.gz").tolist() == [7, 0, 3]
    assert ds.read_idx(tmp_path / "f").tolist() == [1.5, -2.0]
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(bl.BilevelError, match="not an IDX"):
        ds.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(imgs, 0x08)[:-1])
    with pytest.raises(bl.BilevelError, match="needs"):
        ds.read_idx(tmp_path / "short")
    ds.write_idx(tmp_path / "w.gz", imgs)
    assert torch.equal(ds.read_idx(tmp_path / "w.gz"), torch.from_numpy(imgs))


def test_mnist_hyper_cleaning_from_idx(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 60), ("t10k", 20)):
        ds.write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz",
                     rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        ds.write_idx(tmp_path / f"{stem}-labels-idx1-ubyte",
                     (np.arange(n) % 10).astype(np.uint8))
    split = ds.mnist_hyper_cleaning(tmp_path, ratio=0.5, n_train=40, n_val=10)
    assert split["train"][0].shape == (40, 784) and split["val"][0].shape == (10, 784)
    assert split["test"][0].shape == (20, 784)
    b = pb.hyper_cleaning(split)
    assert b.x0.shape == (40,) and b.z0.shape == (784, 10)


def test_corruption_ratio():
    y = torch.zeros(20000, dtype=torch.long)
    y2, mask = ds.corrupt_labels(y, 0.5, 10, seed=0)
    assert abs(float(mask.double().mean()) - 0.5) < 0.02
    assert abs(float((y2 != 0).double().mean()) - 0.45) < 0.02  # 1/10 redraw the true label
    assert torch.equal(y2[~mask], y[~mask])


def test_synthetic_sizes():
    s = ds.synthetic_ijcnn1(n_train=500, n_val=300)
    assert s["train"][0].shape == (500, 22) and s["val"][0].shape == (300, 22)
    assert set(s["train"][1].tolist()) == {-1.0, 1.0}
    c = ds.synthetic_covtype(n=1000)
    assert [c[k][0].shape[0] for k in ("train", "val", "test")] == [640, 160, 200]
    assert c["train"][0].shape[1] == 54 and int(c["train"][1].max()) <= 6
    d = ds.digits_hyper_cleaning()
    assert d["train"][0].shape == (1000, 64) and d["test"][0].shape == (497, 64)
    assert ds.IJCNN1_SIZES == {"n_features": 22, "train": 49_990, "val": 91_701}


def test_logreg_value_gradient_matches_fd():
    s = ds.synthetic_ijcnn1(n_train=300, n_val=200, seed=2)
    x = torch.log(torch.rand(22, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64)) + 1
    v, g = pb.logreg_value_and_grad(s, x)
    h = 1e-6
    for j in (0, 5, 21):
        e = torch.zeros(22, dtype=torch.float64)
        e[j] = h
        fd = (pb.logreg_value_and_grad(s, x + e)[0] - pb.logreg_value_and_grad(s, x - e)[0]) / (
            2 * h)
        assert abs(fd - float(g[j])) < 1e-7 * max(1.0, abs(fd))


def test_quadratic_bench_optimum():
    b = pb.quadratic_bench(n_inner=64, n_outer=64, d=4, p=3)
    assert abs(b.evaluate(None, b.extra["x_star"])["subopt"]) < 1e-14
    assert b.evaluate(None, b.x0)["subopt"] > 0
