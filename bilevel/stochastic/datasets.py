"""Data for the benchmark problems: readers of the users' files and generators of synthetic
data of the same sizes (these machines cannot download the real sets).

Readers: :func:`read_libsvm` (ijcnn1, covtype in libsvm/svmlight format, via scikit-learn's
``load_svmlight_file``), :func:`read_idx` (MNIST's IDX files, optionally gzipped).
Splits as in benchopt's benchmark_bilevel: :func:`ijcnn1` (train 49,990 / outer 91,701, 22
features), :func:`covtype` (581,012 rows, 54 features, 7 classes, split 64/16/20,
standardised), :func:`mnist_hyper_cleaning` (20,000 / 5,000 / 10,000, labels replaced with
probability ``ratio``), :func:`digits_hyper_cleaning` (scikit-learn's 8×8 digits, same
protocol). ``synthetic_*`` generate data of the real sizes and formats.

Every function returns a dict of splits: ``{"train": (X, y), "val": (X, y), "test": (X, y)}``
(tensors; labels ±1 for ijcnn1, class indices 0..K−1 otherwise).
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

from ..problem import BilevelError

Split = dict[str, tuple[torch.Tensor, torch.Tensor]]

IJCNN1_SIZES = {"n_features": 22, "train": 49_990, "val": 91_701}
COVTYPE_SIZES = {"n_features": 54, "n_classes": 7, "rows": 581_012}
MNIST_SIZES = {"train": 20_000, "val": 5_000, "test": 10_000}


def _sklearn(what: str):
    try:
        import sklearn.datasets  # noqa: F401
        return __import__("sklearn.datasets", fromlist=["x"])
    except ImportError as e:  # pragma: no cover - sklearn is in the examples extra
        raise BilevelError(f"{what} needs scikit-learn: pip install 'bilevel-meta[examples]'"
                           ) from e


def read_libsvm(path: str | os.PathLike, n_features: int | None = None,
                dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (X, y) from a libsvm/svmlight file (``label idx:value ...``, 1-based indices,
    optionally .gz/.bz2). ``n_features`` fixes the width (a test file may lack the last
    feature)."""
    if not os.path.exists(path):
        raise BilevelError(f"read_libsvm: no file {str(path)!r}")
    X, y = _sklearn("read_libsvm").load_svmlight_file(str(path), n_features=n_features)
    return torch.as_tensor(X.toarray(), dtype=dtype), torch.as_tensor(y, dtype=dtype)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """An IDX file (MNIST's format: magic 0x0000, type code, ndim, big-endian int32 sizes,
    then the data), gzipped when the name ends with .gz."""
    if not os.path.exists(path):
        raise BilevelError(f"read_idx: no file {str(path)!r}")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise BilevelError(f"read_idx: {str(path)!r} is not an IDX file (bad magic "
                           f"{raw[:4].hex()})")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    dt = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if ndim else 1
    body = raw[4 + 4 * ndim:]
    if len(body) != count * dt.itemsize:
        raise BilevelError(f"read_idx: {str(path)!r} holds {len(body)} data bytes, the header "
                           f"{shape} needs {count * dt.itemsize}")
    arr = np.frombuffer(body, dtype=dt).reshape(shape)
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("=")).copy())


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an IDX file (uint8 / int32 / float32 / float64); gzipped for a .gz name."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int32): 0x0C,
             np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    array = np.asarray(array)
    if array.dtype not in codes:
        raise BilevelError(f"write_idx: unsupported dtype {array.dtype}")
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    big = array.astype(np.dtype(_IDX_DTYPES[code]).newbyteorder(">")) if code != 0x08 else array
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + big.tobytes())


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0), train.std(0).clamp_min(1e-12)
    return [(a - mean) / std for a in (train, *others)]


def _labels_to_index(y: torch.Tensor) -> torch.Tensor:
    values = torch.unique(y)
    return torch.searchsorted(values, y.contiguous()).long()


# ------------------------------------------------------------------------------------------
# ijcnn1
# ------------------------------------------------------------------------------------------
def ijcnn1(train_path, test_path, dtype: torch.dtype = torch.float64) -> Split:
    """ijcnn1 from the libsvm files ``ijcnn1`` (train, inner problem) and ``ijcnn1.t``
    (benchopt's ``ijcnn1_test``: the outer problem), labels ±1."""
    Xt, yt = read_libsvm(train_path, IJCNN1_SIZES["n_features"], dtype)
    Xv, yv = read_libsvm(test_path, IJCNN1_SIZES["n_features"], dtype)
    return {"train": (Xt, yt), "val": (Xv, yv)}


def synthetic_ijcnn1(seed: int = 0, dtype: torch.dtype = torch.float64,
                     n_train: int = IJCNN1_SIZES["train"], n_val: int = IJCNN1_SIZES["val"]
                     ) -> Split:
    """ijcnn1-sized synthetic binary data: 22 features in [−1, 1], ≈10 % positives, labels
    ±1 from a noisy linear model (same sizes as the real set, not its distribution)."""
    gen = torch.Generator().manual_seed(seed)
    d = IJCNN1_SIZES["n_features"]
    w = torch.randn(d, generator=gen, dtype=torch.float64)

    def draw(n):
        X = torch.tanh(torch.randn(n, d, generator=gen, dtype=torch.float64))
        logits = 2.0 * X @ w / d ** 0.5 - 2.5 + torch.randn(n, generator=gen, dtype=torch.float64)
        y = torch.where(logits > 0, 1.0, -1.0)
        return X.to(dtype), y.to(dtype)

    return {"train": draw(n_train), "val": draw(n_val)}


# ------------------------------------------------------------------------------------------
# covtype
# ------------------------------------------------------------------------------------------
def _split_64_16_20(X: torch.Tensor, y: torch.Tensor, seed: int) -> Split:
    n = X.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(0.2 * n))
    n_val = int(round(0.2 * (n - n_test)))
    te, va, tr = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    Xtr, Xva, Xte = _standardise(X[tr], X[va], X[te])
    return {"train": (Xtr, y[tr]), "val": (Xva, y[va]), "test": (Xte, y[te])}


def covtype(path, seed: int = 2442, dtype: torch.dtype = torch.float64) -> Split:
    """covtype (7 classes) from a libsvm file, split 64/16/20 (train/val/test), standardised
    with the train statistics; labels mapped to 0..6."""
    X, y = read_libsvm(path, COVTYPE_SIZES["n_features"], dtype)
    return _split_64_16_20(X, _labels_to_index(y), seed)


def synthetic_covtype(seed: int = 0, dtype: torch.dtype = torch.float64,
                      n: int = COVTYPE_SIZES["rows"]) -> Split:
    """covtype-sized synthetic data: 10 continuous + 4 one-hot + 40 one-hot columns (the real
    layout), 7 imbalanced classes from a random softmax model; split 64/16/20."""
    gen = torch.Generator().manual_seed(seed)
    k = COVTYPE_SIZES["n_classes"]
    cont = torch.randn(n, 10, generator=gen, dtype=torch.float64)
    wild = torch.nn.functional.one_hot(torch.randint(0, 4, (n,), generator=gen), 4)
    soil = torch.nn.functional.one_hot(torch.randint(0, 40, (n,), generator=gen), 40)
    X = torch.cat([cont, wild.double(), soil.double()], 1)
    W = torch.randn(54, k, generator=gen, dtype=torch.float64)
    prior = torch.log(torch.tensor([0.36, 0.49, 0.06, 0.005, 0.016, 0.03, 0.035],
                                   dtype=torch.float64))
    logits = X @ W + prior - torch.log(-torch.log(torch.rand(n, k, generator=gen,
                                                             dtype=torch.float64)))
    y = logits.argmax(1)
    return _split_64_16_20(X.to(dtype), y, seed)


# ------------------------------------------------------------------------------------------
# hyper-cleaning
# ------------------------------------------------------------------------------------------
def corrupt_labels(y: torch.Tensor, ratio: float, n_classes: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label replaced with probability ``ratio`` by a uniform class (benchopt's rule: the
    new label may equal the old one). Returns (labels, corrupted mask)."""
    if not 0.0 <= ratio <= 1.0:
        raise BilevelError(f"corrupt_labels: ratio must be in [0, 1], got {ratio}")
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(y.shape[0], generator=gen) < ratio
    new = torch.randint(0, n_classes, (y.shape[0],), generator=gen)
    return torch.where(mask, new, y), mask


def _hyper_cleaning(X, y, n_train, n_val, Xtest, ytest, ratio, seed, dtype) -> Split:
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    if n_train + n_val > X.shape[0]:
        raise BilevelError(f"hyper-cleaning: {n_train} + {n_val} rows asked, {X.shape[0]} given")
    tr, va = perm[:n_train], perm[n_train:n_train + n_val]
    ytr, mask = corrupt_labels(y[tr], ratio, int(y.max()) + 1, seed + 1)
    Xtr, Xva, Xte = _standardise(X[tr].to(dtype), X[va].to(dtype), Xtest.to(dtype))
    return {"train": (Xtr, ytr), "val": (Xva, y[va]), "test": (Xte, ytest), "corrupted": mask}


def mnist_hyper_cleaning(directory, ratio: float = 0.5, seed: int = 32,
                         dtype: torch.dtype = torch.float64, n_train: int = MNIST_SIZES["train"],
                         n_val: int = MNIST_SIZES["val"]) -> Split:
    """MNIST hyper-cleaning from the four IDX files in ``directory`` (train-images-idx3-ubyte,
    train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, .gz or not):
    train 20,000 (corrupted), val 5,000 (clean) from the training set, test 10,000."""
    def find(stem):
        for name in (stem, stem + ".gz"):
            p = os.path.join(directory, name)
            if os.path.exists(p):
                return p
        raise BilevelError(f"mnist_hyper_cleaning: {stem}[.gz] not found in {directory!r}")
    X = read_idx(find("train-images-idx3-ubyte")).reshape(-1, 784).double()
    y = read_idx(find("train-labels-idx1-ubyte")).long()
    Xte = read_idx(find("t10k-images-idx3-ubyte")).reshape(-1, 784).double()
    yte = read_idx(find("t10k-labels-idx1-ubyte")).long()
    return _hyper_cleaning(X, y, n_train, n_val, Xte, yte, ratio, seed, dtype)


def digits_hyper_cleaning(ratio: float = 0.5, seed: int = 32, n_train: int = 1000,
                          n_val: int = 300, dtype: torch.dtype = torch.float64) -> Split:
    """Hyper-cleaning on scikit-learn's 8×8 digits (1,797 images, 64 features, 10 classes):
    train ``n_train`` (labels corrupted w.p. ``ratio``), val ``n_val`` (clean), test the rest."""
    ds = _sklearn("digits_hyper_cleaning").load_digits()
    X, y = torch.as_tensor(ds.data, dtype=torch.float64), torch.as_tensor(ds.target).long()
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed + 7))
    X, y = X[perm], y[perm]
    rest = n_train + n_val
    return _hyper_cleaning(X[:rest], y[:rest], n_train, n_val, X[rest:], y[rest:], ratio, seed,
                           dtype)


def synthetic_mnist_hyper_cleaning(ratio: float = 0.5, seed: int = 32,
                                   dtype: torch.dtype = torch.float64) -> Split:
    """MNIST-sized (784 features, 10 classes, 20,000 / 5,000 / 10,000) synthetic
    hyper-cleaning data from a Gaussian mixture."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(10, 784, generator=gen, dtype=torch.float64)
    n = MNIST_SIZES["train"] + MNIST_SIZES["val"]

    def draw(m):
        y = torch.randint(0, 10, (m,), generator=gen)
        return centres[y] + 8 * torch.randn(m, 784, generator=gen, dtype=torch.float64), y

    X, y = draw(n)
    Xte, yte = draw(MNIST_SIZES["test"])
    return _hyper_cleaning(X, y, MNIST_SIZES["train"], MNIST_SIZES["val"], Xte, yte, ratio,
                           seed, dtype)
