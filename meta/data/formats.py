"""Readers for the published on-disk layouts of Mini-ImageNet, tieredImageNet, CIFAR-FS and FC100.

Every reader returns a :class:`~meta.data.episodes.FewShotArrays` (``uint8 [N, H, W, 3]``
images, ``int64`` labels ``0 .. C-1``, class names). Layouts (``format=``), by exact file name
in ``root`` for split ``s`` in ``train``/``val``/``test``:

================  ================  ==========================================================
dataset           format            files
================  ================  ==========================================================
miniimagenet      ``cache_pkl``     ``mini-imagenet-cache-{s}.pkl`` (learn2learn / Ren et al.;
                                    val also as ``-validation.pkl``):
                                    ``{'image_data': uint8 [N,84,84,3], 'class_dict':
                                    {wnid: [indices]}}``
miniimagenet      ``metaoptnet_pkl`` ``miniImageNet_category_split_{train_phase_train|val|test}
                                    .pickle`` (Gidaris / MetaOptNet, latin-1):
                                    ``{'data': uint8 [N,84,84,3], 'labels': [int],
                                    'catname2label': {wnid: int}}``
miniimagenet      ``csv``           ``{s}.csv`` (Ravi & Larochelle, ``filename,label``) and
                                    ``images/`` holding the JPEGs; decoded with Pillow, resized
                                    to 84x84 (LANCZOS) when needed, cached as uint8
tieredimagenet    ``metaoptnet_npz`` ``{s}_images.npz`` (``'images'``: uint8 [N,84,84,3]) and
                                    ``{s}_labels.pkl`` (``'labels'`` or ``'label_specific'``)
cifarfs           ``metaoptnet_pkl`` ``CIFAR_FS_{s}.pickle``: ``{'data': uint8 [N,32,32,3],
                                    'labels': [int]}``
fc100             ``metaoptnet_pkl`` ``FC100_{s}.pickle``: same keys
================  ================  ==========================================================

``format="auto"`` takes the first layout, in the order above, whose files all exist; when none
does, the error lists every accepted layout with the file names it looked for. Labels are
renumbered ``0 .. C-1`` in the order of the sorted original labels (WordNet ids or integers;
MetaOptNet's val/test labels start at 64/80). Pickles are read with a restricted unpickler that
only rebuilds NumPy arrays and plain containers.
"""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .episodes import FewShotArrays
from .images import read_many_rgb, resize_rgb

__all__ = ["DATASETS", "FORMATS", "load_arrays", "find_layout", "load_pickle"]

SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class Dataset:
    title: str
    image_size: int
    classes: dict[str, int]  # the standard split's class counts
    layouts: tuple[str, ...]  # format="auto" order


DATASETS = {
    "miniimagenet": Dataset("Mini-ImageNet", 84, {"train": 64, "val": 16, "test": 20},
                            ("cache_pkl", "metaoptnet_pkl", "csv")),
    "tieredimagenet": Dataset("tieredImageNet", 84, {"train": 351, "val": 97, "test": 160},
                              ("metaoptnet_npz",)),
    "cifarfs": Dataset("CIFAR-FS", 32, {"train": 64, "val": 16, "test": 20}, ("metaoptnet_pkl",)),
    "fc100": Dataset("FC100", 32, {"train": 60, "val": 20, "test": 20}, ("metaoptnet_pkl",)),
}
ALIASES = {"mini-imagenet": "miniimagenet", "mini_imagenet": "miniimagenet",
           "tiered-imagenet": "tieredimagenet", "tiered_imagenet": "tieredimagenet",
           "cifar-fs": "cifarfs", "cifar_fs": "cifarfs"}
_GIDARIS_TAG = {"train": "train_phase_train", "val": "val", "test": "test"}


def _candidates(dataset: str, layout: str, split: str) -> list[list[str]]:
    """Alternative file lists (relative to root) of one layout; a trailing '/' is a folder."""
    if layout == "csv":
        return [[f"{split}.csv", "images/"]]
    if layout == "cache_pkl":
        names = ["val", "validation"] if split == "val" else [split]
        return [[f"mini-imagenet-cache-{n}.pkl"] for n in names]
    if layout == "metaoptnet_npz":
        return [[f"{split}_images.npz", f"{split}_labels.pkl"]]
    if dataset == "miniimagenet":
        return [[f"miniImageNet_category_split_{_GIDARIS_TAG[split]}.pickle"]]
    prefix = {"cifarfs": "CIFAR_FS", "fc100": "FC100"}[dataset]
    return [[f"{prefix}_{split}.pickle"]]


FORMATS: dict[str, str] = {
    "cache_pkl": "learn2learn / Ren et al. cache pickle",
    "metaoptnet_pkl": "Gidaris / MetaOptNet pickle (latin-1)",
    "metaoptnet_npz": "MetaOptNet npz + labels pickle",
    "csv": "Ravi & Larochelle split CSV (filename,label) + images/ folder of JPEGs",
}


def canonical(dataset: str) -> str:
    key = dataset.lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {tuple(DATASETS)}")
    return key


def find_layout(dataset: str, root: str | os.PathLike, split: str = "train",
                format: str = "auto") -> tuple[str, list[Path]]:
    """``(layout, paths)`` of the first layout of ``dataset`` whose exact files exist in
    ``root`` for ``split``; ``FileNotFoundError`` listing every accepted layout otherwise."""
    dataset, split = canonical(dataset), _split(split)
    spec, root = DATASETS[dataset], Path(root).expanduser()
    if format != "auto" and format not in spec.layouts:
        raise ValueError(f"format must be 'auto' or one of {spec.layouts} for {spec.title}, "
                         f"got {format!r}")
    for layout in spec.layouts if format == "auto" else (format,):
        for names in _candidates(dataset, layout, split):
            paths = [root / n for n in names]
            if all(p.is_dir() if n.endswith("/") else p.is_file() for p, n in zip(paths, names)):
                return layout, paths
    where = "does not exist" if not root.is_dir() else "holds none of them"
    lines = []
    for layout in spec.layouts if format == "auto" else (format,):
        alternatives = " or ".join(" + ".join(names) for names in
                                   _candidates(dataset, layout, split))
        lines.append(f"  - format={layout!r} ({FORMATS[layout]}): {alternatives}")
    raise FileNotFoundError(
        f"no {spec.title} {split!r} split found: {root} {where}. Accepted layouts "
        f"(exact file names, format={format!r}):\n" + "\n".join(lines))


def load_arrays(
    dataset: str,
    root: str | os.PathLike,
    split: str = "train",
    format: str = "auto",
    image_size: int | None = None,
    check_classes: str = "warn",
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> FewShotArrays:
    """Read one split of ``dataset`` from ``root`` (see the module docstring for the layouts).

    ``image_size=None`` keeps the dataset's native size (84 or 32) and refuses arrays of any
    other size; an int resizes every image to ``image_size x image_size`` with Pillow LANCZOS.
    ``check_classes``: what to do when the class count differs from the standard split's
    (``"warn"``, ``"error"`` or ``"ignore"``, e.g. for subsets). ``cache_dir`` / ``workers``:
    where the decoded JPEGs of the ``csv`` layout are cached (default
    ``$BILEVEL_META_CACHE/<dataset>`` or ``~/.cache/bilevel-meta/<dataset>``) and how many
    threads decode them.
    """
    dataset, split = canonical(dataset), _split(split)
    spec = DATASETS[dataset]
    if check_classes not in ("warn", "error", "ignore"):
        raise ValueError(f"check_classes must be 'warn', 'error' or 'ignore', got "
                         f"{check_classes!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
    layout, paths = find_layout(dataset, root, split, format)
    size = image_size or spec.image_size
    if layout == "csv":
        images, raw, names = _read_csv_cached(dataset, paths, size, cache_dir, workers)
    else:
        images, raw, names = _READERS[layout](paths)
    images = _check_images(images, paths[0], spec, size, image_size is not None)
    labels, class_names = _relabel(raw, names, paths[0])
    arrays = FewShotArrays(torch.from_numpy(images), labels, class_names, dataset, split, layout,
                           [os.fspath(p) for p in paths])
    want = spec.classes[split]
    if arrays.num_classes != want and check_classes != "ignore":
        message = (f"{spec.title} {split!r} from {paths[0]} has {arrays.num_classes} classes; "
                   f"the standard split has {want} (a subset, or another split?)")
        if check_classes == "error":
            raise ValueError(message)
        warnings.warn(message + "; pass check_classes='ignore' to silence", stacklevel=2)
    return arrays


def _split(split: str) -> str:
    split = "val" if split == "validation" else split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'validation'), got {split!r}")
    return split


# ----------------------------------------------------------------------------- pickles


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds NumPy arrays, dtypes and scalars and nothing else (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
        ("__builtin__", "set"), ("builtins", "bytearray"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle "
                                     "(only NumPy arrays and plain containers are allowed)")


def load_pickle(path: str | os.PathLike):
    """Load a (Python 2 or 3) dataset pickle with ``encoding='latin1'``, allowing only NumPy
    arrays and plain containers; string keys that come back as bytes are decoded."""
    with open(path, "rb") as f:
        try:
            data = _SafeUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as err:
            raise ValueError(f"cannot read the pickle {path}: {err}") from None
    if isinstance(data, dict):
        data = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in data.items()}
    return data


def _keys(data, path: Path, *keys: str) -> list:
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}; it has {sorted(map(str, data))}")
    return [data[k] for k in keys]


def _read_cache_pkl(paths: list[Path]):
    data = load_pickle(paths[0])
    images, class_dict = _keys(data, paths[0], "image_data", "class_dict")
    images = np.asarray(images)
    labels = np.full(len(images), -1, np.int64)
    names = sorted(class_dict, key=str)
    for c, wnid in enumerate(names):
        idx = np.asarray(class_dict[wnid], dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
            raise ValueError(f"{paths[0]}: class {wnid!r} indexes images outside "
                             f"0..{len(images) - 1}")
        if (labels[idx] != -1).any():
            raise ValueError(f"{paths[0]}: class {wnid!r} shares images with another class")
        labels[idx] = c
    keep = labels >= 0
    if not keep.all():
        warnings.warn(f"{paths[0]}: {int((~keep).sum())} images belong to no class of "
                      "'class_dict' and are dropped", stacklevel=3)
        images, labels = images[keep], labels[keep]
    return images, labels, [str(n) for n in names]


def _read_metaoptnet_pkl(paths: list[Path]):
    data = load_pickle(paths[0])
    images, labels = _keys(data, paths[0], "data", "labels")
    names = None
    if isinstance(data.get("catname2label"), dict):  # {wnid: label}
        names = {int(v): str(k) for k, v in data["catname2label"].items()}
    return _stack(images, paths[0]), np.asarray(labels).reshape(-1), names


def _read_metaoptnet_npz(paths: list[Path]):
    try:
        with np.load(paths[0], allow_pickle=False) as f:
            if "images" not in f:
                raise ValueError(f"{paths[0]}: missing key 'images'; it has {sorted(f.files)}")
            images = f["images"]
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {paths[0]}: {err}") from None
    meta = load_pickle(paths[1])
    key = "labels" if isinstance(meta, dict) and "labels" in meta else "label_specific"
    (labels,) = _keys(meta, paths[1], key)
    names = None
    if key == "label_specific" and "label_specific_str" in meta:
        names = dict(enumerate(map(str, meta["label_specific_str"])))
    return images, np.asarray(labels).reshape(-1), names


def _stack(images, path: Path) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images
    try:
        return np.stack([np.asarray(im) for im in images])
    except ValueError as err:
        raise ValueError(f"{path}: 'data' images differ in shape ({err})") from None


_READERS: dict[str, Callable] = {"cache_pkl": _read_cache_pkl,
                                 "metaoptnet_pkl": _read_metaoptnet_pkl,
                                 "metaoptnet_npz": _read_metaoptnet_npz}


def _check_images(images: np.ndarray, path: Path, spec: Dataset, size: int,
                  resize: bool) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: images must be uint8 [N, H, W, 3], got {images.dtype} "
                         f"{images.shape}")
    if images.shape[1:3] != (size, size):
        if not resize:
            raise ValueError(f"{path}: images are {images.shape[2]}x{images.shape[1]}, not the "
                             f"{spec.title} size {size}x{size}; pass image_size={size} to "
                             "resize them (Pillow LANCZOS)")
        images = resize_rgb(images, size)
    return np.ascontiguousarray(images)


def _relabel(raw: np.ndarray, names: dict | list | None, path: Path
             ) -> tuple[torch.Tensor, list[str]]:
    """Renumber labels ``0 .. C-1`` by sorted original label; class names from ``names``."""
    if isinstance(names, list):  # already 0..C-1 with these names
        return torch.from_numpy(np.asarray(raw, dtype=np.int64)), names
    if raw.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be integers, got {raw.dtype}")
    values, labels = np.unique(raw, return_inverse=True)
    names = names or {}
    class_names = [names.get(int(v), str(int(v))) for v in values]
    return torch.from_numpy(labels.astype(np.int64).reshape(-1)), class_names


# ----------------------------------------------------------------------------- csv + JPEGs


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{path}: expected the header 'filename,label', got "
                         f"{','.join(rows[0]) if rows else 'an empty file'}")
    out = []
    for k, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2:
            raise ValueError(f"{path}, line {k}: expected 'filename,label', got {row}")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise ValueError(f"{path}: no images listed")
    return out


def _read_csv_cached(dataset: str, paths: list[Path], size: int, cache_dir, workers):
    csv_path, folder = paths
    rows = _read_csv(csv_path)
    files = [folder / name for name, _ in rows]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{csv_path} lists {len(missing)} image(s) missing from {folder}, "
                                f"e.g. {missing[0].name}")
    preprocessing = f"pillow-rgb-{size}px-lanczos"
    sha = hashlib.sha256(csv_path.read_bytes())
    for f in files:  # names, sizes and times of the JPEGs (reading them all would be slow)
        st = f.stat()
        sha.update(f"{f.name}/{st.st_size}/{st.st_mtime_ns}\n".encode())
    if cache_dir is None:
        env = os.environ.get("BILEVEL_META_CACHE")
        cache_dir = Path(env) / dataset if env else Path.home() / ".cache/bilevel-meta" / dataset
    cache = Path(cache_dir).expanduser() / (
        f"{dataset}-csv-{csv_path.stem}-{sha.hexdigest()[:16]}-{preprocessing}"
        f"-v{_CACHE_VERSION}.npz")
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                if str(f["preprocessing"]) == preprocessing:
                    return f["images"], f["labels"], [str(n) for n in f["class_names"]]
            warnings.warn(f"rebuilding {cache}: it holds another preprocessing", stacklevel=3)
        except Exception as err:  # corrupt or foreign file: rebuild it
            warnings.warn(f"ignoring unreadable cache {cache}: {err}", stacklevel=3)
    names = sorted({label for _, label in rows})
    position = {n: c for c, n in enumerate(names)}
    labels = np.array([position[label] for _, label in rows], np.int64)
    images = read_many_rgb(files, size, "lanczos", workers)
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, images=images, labels=labels, class_names=np.array(names),
                     preprocessing=np.array(preprocessing))
        os.replace(tmp, cache)
    except OSError as err:
        warnings.warn(f"could not write the cache {cache}: {err}", stacklevel=3)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return images, labels, names

