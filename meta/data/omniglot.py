"""Omniglot few-shot classification episodes (Lake et al. 2015; protocol of Santoro et al. 2016
and Finn et al. 2017).

Conventions
-----------
* **Characters** are numbered ``0 .. N-1`` in the official order: background set before
  evaluation set; the npz rows in file order; the zips by the official character number in
  the file names ``<number>_<drawer>.png`` (which groups characters by alphabet, in the
  dataset's own alphabet order, then by ``characterNN`` folder). Drawer ``d`` (0..19) is the
  file's ``_<d+1>`` / npz column ``d``. On the full data (N = 1623) character ``c`` has
  official number ``c + 1`` (image ``number_drawer.png`` of the background zips is npz
  ``[number - 1, drawer - 1]``, checked on both small subsets). The small subsets number their
  own characters ``0 .. N-1`` in the same order; :attr:`Omniglot.character_numbers` gives the
  official numbers.
* **Images** are decoded with Pillow and resized from 105x105 to 28x28 by one of
  :data:`PREPROCESSING` (``preprocessing=``):

  - ``"area"`` (default): ``F.interpolate(mode="area")``, the mean of each output pixel's
    footprint, ``v = round(255 * mean(strokes))`` -- grey levels, no aliasing;
  - ``"maml"``: the official preprocessing of Finn et al. (cbfinn/maml
    ``data/omniglot_resized/resize_images.py``): ``Image.resize((28, 28), LANCZOS)`` on the
    1-bit image. Pillow resamples mode ``"1"`` images with NEAREST whatever filter is asked
    for, so the result is binary (``v in {0, 255}``), exactly what MAML trained on;
  - ``"lanczos"``: the same Pillow call on the image as 8-bit grayscale (mode ``"L"``), a true
    Lanczos (windowed sinc) filter -- grey levels, slight ringing.

  Images are cached as ``uint8`` with strokes high and returned as ``dtype`` in ``[0, 1]``
  with **strokes = 1.0 and background = 0.0** (inverted from the files). The cache records the
  preprocessing (:attr:`Omniglot.preprocessing`); a cache made one way is never used for another.
* **Split by character** with the fixed :data:`SPLIT_SEED` (independent of ``seed``): the N
  characters are permuted by ``numpy.random.RandomState(SPLIT_SEED).permutation(N)``; the first
  ``round(N * 1200/1623)`` are "train", the next ``round(N * 100/1623)`` "val", the rest
  "test" (1200/100/323 on the full data; every split gets at least one character).
* **Rotations** (``rotations=True``): each character gives 4 classes, rotated by ``k`` quarter
  turns counter-clockwise (``torch.rot90(img, k, dims=(-2, -1))``, k = 0, 1, 2, 3). Rotations of
  one character stay in its split. A **class id** is the tuple ``(character, k)``; without
  rotations ``k`` is always 0.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..tasks import TaskBatch
from .images import open_image
from .stream import TaskStream, task_generator

__all__ = ["Omniglot", "PREPROCESSING", "SPLIT_SEED", "split_characters"]

SPLIT_SEED = 1
SPLITS = ("train", "val", "test")
DRAWERS = 20
RAW_SIZE = 105
IMAGE_SIZE = 28
URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
SOURCES = {
    "npz": ("images_background.npz", "images_evaluation.npz"),
    "zip": ("images_background.zip", "images_evaluation.zip"),
    "small1": ("images_background_small1.zip",),
    "small2": ("images_background_small2.zip",),
}
#: The 105x105 -> 28x28 preprocessings (see the module docstring).
PREPROCESSING = ("area", "maml", "lanczos")
_CACHE_VERSION = 2
_CHUNK = 64  # characters resized at a time: bounds memory to ~60 MB of float images
_PNG_NAME = re.compile(r"(\d+)_(\d+)\.png")


def split_characters(num_characters: int) -> dict[str, np.ndarray]:
    """Sorted character indices of the "train"/"val"/"test" splits (see module docstring)."""
    if num_characters < 3:
        raise ValueError(f"need at least 3 characters to split, got {num_characters}")
    n_val = max(1, round(num_characters * 100 / 1623))
    n_train = min(max(1, round(num_characters * 1200 / 1623)), num_characters - n_val - 1)
    perm = np.random.RandomState(SPLIT_SEED).permutation(num_characters)
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val)}
    bounds["test"] = (n_train + n_val, num_characters)
    return {name: np.sort(perm[lo:hi]) for name, (lo, hi) in bounds.items()}


class Omniglot(TaskStream):
    """Seeded, resumable N-way K-shot episodes from Omniglot.

    ``root`` (or ``root/npz``) must hold one of: ``images_background.npz`` and
    ``images_evaluation.npz`` (``images``: bool ``[characters, 20, 105, 105]``, True = white
    background); the official ``images_background.zip`` and ``images_evaluation.zip``; or
    ``images_background_small1.zip`` / ``images_background_small2.zip``. ``source="auto"``
    prefers npz, then the full zips, then small1, then small2. ``download=True`` fetches the
    official full zips into ``root`` when nothing usable is there.

    The preprocessed images of all characters are cached in one file under ``cache_dir``
    (default ``$BILEVEL_META_CACHE/omniglot`` or ``~/.cache/bilevel-meta/omniglot``), named
    after the source, the size and SHA-256 of its files and the ``preprocessing``
    (``"area"``, ``"maml"`` = the official MAML preprocessing, or ``"lanczos"``; see the module
    docstring), which the file also records and which is checked when it is read.

    Episodes: ``batch(i)`` is a :class:`TaskBatch` of ``meta_batch`` tasks with support
    ``x [meta_batch, ways*shots, 1, 28, 28]`` / ``y [meta_batch, ways*shots]`` (int64) and query
    ``[meta_batch, ways*queries, ...]``. Each task samples ``ways`` classes of the split and
    ``shots + queries`` of the 20 drawers per class, all without replacement; the classes get
    labels ``0 .. ways-1`` in a random order; examples are grouped by class (class-major).
    Task ``t`` of the stream is a pure function of ``(seed, split, t)`` (and the episode
    shape), and ``batch(i)`` stacks tasks ``i*meta_batch .. (i+1)*meta_batch - 1``, so a
    run resumes exactly by asking for ``batch(i)``. Iteration yields ``batch(0), batch(1), ...``
    forever, or ``num_batches`` batches when given.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        meta_batch: int = 1,
        seed: int = 0,
        rotations: bool = True,
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        source: str = "auto",
        num_batches: int | None = None,
        preprocessing: str = "area",
    ) -> None:
        _check_args(split, ways, shots, queries, meta_batch, source, dtype, num_batches)
        if preprocessing not in PREPROCESSING:
            raise ValueError(
                f"preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}"
            )
        self.preprocessing = preprocessing
        self.root = Path(root).expanduser()
        self.split, self.ways, self.shots, self.queries = split, int(ways), int(shots), int(queries)
        self.meta_batch, self.seed, self.rotations = int(meta_batch), seed, rotations
        self.device = torch.device(device if device is not None else "cpu")
        self.dtype, self.num_batches = dtype, num_batches

        self.source, paths = _find(self.root, source, download)
        data, self.cache_path, self.loaded_from_cache = _load(
            self.source, paths, cache_dir, preprocessing
        )
        self.num_characters = int(data["images"].shape[0])
        chars = split_characters(self.num_characters)[split]
        self.characters: list[int] = chars.tolist()
        index = torch.from_numpy(chars)
        self.character_numbers: list[int] = data["numbers"][index].tolist()
        self._images = data["images"][index].contiguous()  # uint8 [n, 20, 28, 28]

        rots = 4 if rotations else 1
        self.classes: list[tuple[int, int]] = [(c, k) for c in self.characters for k in range(rots)]
        self._class_char = torch.arange(len(chars)).repeat_interleave(rots)
        self._class_rot = torch.arange(rots).repeat(len(chars))
        if ways > len(self.classes):
            raise ValueError(
                f"ways={ways} exceeds the {len(self.classes)} classes of the {split!r} split "
                f"({len(chars)} characters x {rots} rotations, source {self.source!r})"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"Omniglot(split={self.split!r}, ways={self.ways}, shots={self.shots}, "
            f"queries={self.queries}, meta_batch={self.meta_batch}, seed={self.seed}, "
            f"source={self.source!r}, preprocessing={self.preprocessing!r}, "
            f"characters={len(self.characters)}, "
            f"classes={self.num_classes})"
        )

    def _tasks(self, tasks) -> TaskBatch:
        n = self.shots + self.queries
        picks = [self._sample(t) for t in tasks]
        cls = torch.stack([p[0] for p in picks])  # [B, ways] class positions in the split
        drawers = torch.stack([p[1] for p in picks])  # [B, ways, n]
        labels = torch.stack([p[2] for p in picks])  # [B, ways]
        x = self._images[self._class_char[cls][..., None], drawers]  # uint8 [B, ways, n, 28, 28]
        rot = self._class_rot[cls]
        for k in (1, 2, 3):
            mask = rot == k
            if mask.any():
                x[mask] = torch.rot90(x[mask], k, dims=(-2, -1))
        x = x.to(self.device).to(self.dtype).div_(255.0).unsqueeze(-3)
        y = labels.to(self.device)[..., None].expand(-1, -1, n)
        b, w, s = len(picks), self.ways, self.shots
        support = (
            x[:, :, :s].reshape(b, w * s, 1, IMAGE_SIZE, IMAGE_SIZE),
            y[:, :, :s].reshape(b, -1),
        )
        query = (x[:, :, s:].reshape(b, -1, 1, IMAGE_SIZE, IMAGE_SIZE), y[:, :, s:].reshape(b, -1))
        return TaskBatch(support, query)

    def _sample(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = task_generator("omniglot", self.seed, self.split, t)
        cls = torch.randperm(self.num_classes, generator=g)[: self.ways]
        keys = torch.rand(self.ways, DRAWERS, generator=g, dtype=torch.float64)
        drawers = keys.argsort(dim=1)[:, : self.shots + self.queries]
        labels = torch.randperm(self.ways, generator=g)
        return cls, drawers, labels


def _check_args(split, ways, shots, queries, meta_batch, source, dtype, num_batches) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if shots + queries > DRAWERS:
        raise ValueError(
            f"shots + queries = {shots + queries} exceeds the {DRAWERS} drawers per character"
        )
    if not isinstance(meta_batch, numbers.Integral) or meta_batch < 1:
        raise ValueError(f"meta_batch must be an integer >= 1, got {meta_batch!r}")
    if num_batches is not None and num_batches < 0:
        raise ValueError(f"num_batches must be >= 0 or None, got {num_batches!r}")
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"source must be 'auto' or one of {tuple(SOURCES)}, got {source!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")


# ----------------------------------------------------------------------------- locating files


def _find(root: Path, source: str, download: bool) -> tuple[str, list[Path]]:
    found = _locate(root, source)
    if found is None and download:
        _download(root, SOURCES["zip"] if source in ("auto", "zip") else SOURCES[source])
        found = _locate(root, source)
    if found is None:
        raise FileNotFoundError(_missing_message(root, source))
    return found


def _locate(root: Path, source: str) -> tuple[str, list[Path]] | None:
    for name in SOURCES if source == "auto" else (source,):
        for folder in (root, root / "npz"):
            paths = [folder / f for f in SOURCES[name]]
            if all(p.is_file() for p in paths):
                return name, paths
    return None


def _missing_message(root: Path, source: str) -> str:
    where = (
        f"Omniglot root {root} does not exist"
        if not root.is_dir()
        else f"no Omniglot {source!r} data in {root}"
    )
    if source == "auto":
        what = (
            "images_background.zip and images_evaluation.zip (or images_background.npz and "
            "images_evaluation.npz, or images_background_small1.zip)"
        )
    else:
        what = " and ".join(SOURCES[source])
    return (
        f"{where}: put {what} in {root} (or {root / 'npz'}), "
        f"or pass download=True to fetch the official zips from {URL}"
    )


def _download(root: Path, names: tuple[str, ...], timeout: float = 10.0) -> None:
    if names == SOURCES["npz"]:
        return  # there is no official download of the npz form
    for name in names:
        target, url = root / name, URL + name
        if target.is_file():
            continue
        tmp = None
        try:
            root.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url, timeout=timeout) as response:
                with tempfile.NamedTemporaryFile(dir=root, suffix=".part", delete=False) as f:
                    tmp = Path(f.name)
                    shutil.copyfileobj(response, f)
            os.replace(tmp, target)
        except (OSError, urllib.error.URLError) as err:  # URLError, timeouts, read-only root
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            raise FileNotFoundError(
                f"could not download {url} ({err}); download it by hand and put {name} in {root}"
            ) from None


# ----------------------------------------------------------------------------- reading + cache


def _load(source: str, paths: list[Path], cache_dir, preprocessing: str
          ) -> tuple[dict, Path, bool]:
    """Return ``({"images": uint8 [N,20,28,28], "numbers": int64 [N], "preprocessing": str},
    cache path, hit)``."""
    if cache_dir is None:
        env = os.environ.get("BILEVEL_META_CACHE")
        cache_dir = Path(env) / "omniglot" if env else Path.home() / ".cache/bilevel-meta/omniglot"
    cache_dir = Path(cache_dir).expanduser()
    size, digest = _fingerprint(paths)
    path = cache_dir / (f"omniglot-{source}-{size}-{digest[:16]}-{IMAGE_SIZE}px-{preprocessing}"
                        f"-v{_CACHE_VERSION}.pt")
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            held = data.get("preprocessing")
            if held != preprocessing:
                warnings.warn(f"rebuilding the Omniglot cache {path}: it holds "
                              f"preprocessing={held!r}, not {preprocessing!r}", stacklevel=3)
            elif data["images"].dtype == torch.uint8 and data["images"].shape[1:] == (
                DRAWERS,
                IMAGE_SIZE,
                IMAGE_SIZE,
            ):
                return data, path, True
        except Exception as err:  # corrupt or foreign file: rebuild it
            warnings.warn(f"ignoring unreadable Omniglot cache {path}: {err}", stacklevel=3)
    data = _build(source, paths, preprocessing)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
        try:
            torch.save(data, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as err:
        warnings.warn(f"could not write the Omniglot cache {path}: {err}", stacklevel=3)
    return data, path, False


def _fingerprint(paths: list[Path]) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
                size += len(block)
    return size, sha.hexdigest()


def _build(source: str, paths: list[Path], preprocessing: str) -> dict:
    images, numbers = [], []
    for path in paths:  # background first, then evaluation
        offset = sum(len(n) for n in numbers)
        reader = _read_npz(path, offset) if source == "npz" else _read_zip(path)
        for background, nums in reader:
            images.append(_preprocess(background, preprocessing))
            numbers.append(torch.as_tensor(nums, dtype=torch.int64))
    return {"images": torch.cat(images), "numbers": torch.cat(numbers),
            "preprocessing": preprocessing}


def _preprocess(background: np.ndarray, preprocessing: str = "area") -> torch.Tensor:
    """bool ``[k, 20, 105, 105]`` (True = background) -> uint8 ``[k, 20, 28, 28]`` strokes high."""
    k = background.shape[0]
    if preprocessing == "area":
        x = torch.from_numpy(~background).to(torch.float32).reshape(-1, 1, RAW_SIZE, RAW_SIZE)
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        return x.mul_(255.0).round_().to(torch.uint8).reshape(k, DRAWERS, IMAGE_SIZE, IMAGE_SIZE)
    out = np.empty((k * DRAWERS, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    size, lanczos = (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS
    for j, mask in enumerate(background.reshape(-1, RAW_SIZE, RAW_SIZE)):
        if preprocessing == "maml":  # mode "1", as decoded from the official 1-bit PNGs
            small = np.asarray(Image.fromarray(mask).resize(size, resample=lanczos))
            out[j] = np.where(small, 0, 255)
        else:  # "lanczos": 8-bit grayscale, white background
            img = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))  # mode "L"
            out[j] = 255 - np.asarray(img.resize(size, resample=lanczos))
    return torch.from_numpy(out).reshape(k, DRAWERS, IMAGE_SIZE, IMAGE_SIZE)


def _read_npz(path: Path, offset: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream ``images.npy`` out of the npz in chunks of characters (official number = row + 1)."""
    fmt = np.lib.format
    with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if len(shape) != 4 or tuple(shape[1:]) != (DRAWERS, RAW_SIZE, RAW_SIZE):
            raise ValueError(
                f"{path}: 'images' must have shape [characters, 20, 105, 105], got {shape}"
            )
        if fortran or dtype.itemsize != 1:
            full = np.load(path)["images"] != 0
            chunks = (full[i : i + _CHUNK] for i in range(0, shape[0], _CHUNK))
        else:
            chunks = (_read_rows(f, min(_CHUNK, shape[0] - i)) for i in range(0, shape[0], _CHUNK))
        for i, chunk in zip(range(0, shape[0], _CHUNK), chunks):
            yield chunk, np.arange(offset + i + 1, offset + i + 1 + len(chunk))


def _read_rows(f, k: int) -> np.ndarray:
    per = DRAWERS * RAW_SIZE * RAW_SIZE
    buf = bytearray()
    while len(buf) < k * per:
        block = f.read(k * per - len(buf))
        if not block:
            raise ValueError("truncated images.npy in the Omniglot npz")
        buf += block
    return np.frombuffer(buf, np.uint8).reshape(k, DRAWERS, RAW_SIZE, RAW_SIZE) != 0


def _read_zip(path: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode ``<Alphabet>/characterNN/<number>_<drawer>.png`` in official character order."""
    with zipfile.ZipFile(path) as zf:
        chars: dict[tuple[str, str], dict[int, str]] = {}
        numbers: dict[tuple[str, str], int] = {}
        for name in zf.namelist():
            parts = name.split("/")
            if not name.endswith(".png") or "__MACOSX" in parts or parts[-1].startswith("."):
                continue
            match = _PNG_NAME.fullmatch(parts[-1])
            if len(parts) < 3 or match is None:
                raise ValueError(
                    f"{path}: unexpected file {name}; "
                    "expected <Alphabet>/characterNN/<number>_<drawer>.png"
                )
            key = (parts[-3], parts[-2])
            numbers.setdefault(key, int(match[1]))
            chars.setdefault(key, {})[int(match[2])] = name
        order = sorted(chars, key=lambda key: (numbers[key], key))
        for key in order:
            if sorted(chars[key]) != list(range(1, DRAWERS + 1)):
                raise ValueError(f"{path}: {'/'.join(key)} must hold drawers 01..{DRAWERS}")
        for i in range(0, len(order), _CHUNK):
            keys = order[i : i + _CHUNK]
            batch = np.stack(
                [
                    [
                        _background(zf.read(chars[key][d]), chars[key][d])
                        for d in range(1, DRAWERS + 1)
                    ]
                    for key in keys
                ]
            )
            yield batch, np.array([numbers[key] for key in keys])


def _background(data: bytes, name: str) -> np.ndarray:
    """Decode one image with Pillow into a bool mask, True = white background."""
    img = open_image(data, name)
    if img.size != (RAW_SIZE, RAW_SIZE):
        raise ValueError(f"{name}: expected a {RAW_SIZE}x{RAW_SIZE} image, got "
                         f"{img.size[0]}x{img.size[1]}")
    if img.mode == "1":
        return np.asarray(img, dtype=bool)
    gray = np.asarray(img.convert("L"))
    return gray >= max(int(gray.max()), 1) / 2
