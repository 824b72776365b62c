"""meta.data: PNG decoder, Omniglot episodes (real and synthetic data), Sinusoid tasks.

The real Omniglot files live read-only in ``../shared/data/omniglot`` beside the repository
root (or ``$OMNIGLOT_ROOT``); tests that need them skip when they are absent.
"""

from __future__ import annotations

import math
import os
import re
import struct
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from meta.data import SPLIT_SEED, Omniglot, Sinusoid, TaskBatch, split_characters
from meta.data.png import decode_png

OMNIGLOT = Path(
    os.environ.get("OMNIGLOT_ROOT")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
)
NPZ = OMNIGLOT / "npz"


def need(*names: str) -> Path:
    """The real-data root, or skip when one of ``names`` is missing (looked up in root/npz)."""
    for name in names:
        if not (OMNIGLOT / name).is_file() and not (NPZ / name).is_file():
            pytest.skip(f"Omniglot file {name} not found under {OMNIGLOT}")
    return OMNIGLOT


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("omniglot-cache")


@pytest.fixture(scope="session")
def full_train(cache_dir) -> tuple[Omniglot, float]:
    """The full npz data (cache built once per session) and the build time in seconds."""
    root = need("images_background.npz", "images_evaluation.npz")
    start = time.perf_counter()
    ds = Omniglot(root, source="npz", cache_dir=cache_dir, meta_batch=4)
    return ds, time.perf_counter() - start


@pytest.fixture(scope="session")
def npz_background() -> np.ndarray:
    need("images_background.npz")
    with np.load(NPZ / "images_background.npz") as f:
        return f["images"]


@pytest.fixture(scope="session")
def small1(cache_dir) -> Omniglot:
    return Omniglot(need("images_background_small1.zip"), source="small1", cache_dir=cache_dir)


# ------------------------------------------------------------------------------ PNG encoding


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def encode_png(samples: np.ndarray, depth: int, ctype: int, filters=(0,), palette=None) -> bytes:
    """Reference encoder: raw samples ``[h, w]`` or ``[h, w, c]``, one filter type per row."""
    h, w = samples.shape[:2]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    flat = samples.reshape(h, w * channels).astype(np.int64)
    if depth == 16:
        rows = flat.astype(">u2").view(np.uint8).reshape(h, -1)
    elif depth == 8:
        rows = flat.astype(np.uint8)
    else:
        per = 8 // depth
        vals = np.zeros((h, -(-w // per) * per), np.int64)
        vals[:, :w] = flat
        shifts = depth * (per - 1 - np.arange(per))
        rows = (vals.reshape(h, -1, per) << shifts).sum(-1).astype(np.uint8)
    bpp = max(1, depth * channels // 8)
    raw, prev = bytearray(), [0] * rows.shape[1]
    for r in range(h):
        line, kind = rows[r].tolist(), filters[r % len(filters)]
        out = []
        for x, value in enumerate(line):
            a = line[x - bpp] if x >= bpp else 0
            c = prev[x - bpp] if x >= bpp else 0
            pred = (0, a, prev[x], (a + prev[x]) // 2, _paeth(a, prev[x], c))[kind]
            out.append((value - pred) & 0xFF)
        raw += bytes([kind, *out])
        prev = line
    data = zlib.compress(bytes(raw))
    half = len(data) // 2
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
        + (_chunk(b"PLTE", palette.astype(np.uint8).tobytes()) if palette is not None else b"")
        + _chunk(b"tEXt", b"Comment\0test")
        + _chunk(b"IDAT", data[:half])
        + _chunk(b"IDAT", data[half:])  # image data split over two IDAT chunks
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "depth, ctype, channels",
    [(1, 0, 1), (2, 0, 1), (4, 0, 1), (8, 0, 1), (16, 0, 1), (8, 2, 3), (8, 4, 2), (8, 6, 4),
     (16, 6, 4), (4, 3, 1)],
)
def test_png_all_filters_and_depths(depth, ctype, channels):
    rng = np.random.default_rng(depth * 10 + ctype)
    h, w = 11, 13  # odd width: sub-byte rows end in padding bits
    shape = (h, w) if channels == 1 else (h, w, channels)
    samples = rng.integers(0, 1 << depth, size=shape)
    palette = rng.integers(0, 256, size=(1 << depth, 3)) if ctype == 3 else None
    png = encode_png(samples, depth, ctype, filters=(0, 1, 2, 3, 4, 4, 3, 2, 1, 0), palette=palette)
    out = decode_png(png)
    expected = palette[samples] if ctype == 3 else samples
    assert out.dtype == (np.uint16 if depth == 16 else np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_png_rejects_corrupt_files():
    png = encode_png(np.ones((4, 4), np.uint8), 1, 0)
    with pytest.raises(ValueError, match="not a PNG"):
        decode_png(b"GIF89a" + png[6:])
    broken = bytearray(png)
    broken[20] ^= 0xFF  # inside IHDR: CRC mismatch
    with pytest.raises(ValueError, match="CRC"):
        decode_png(bytes(broken))
    with pytest.raises(ValueError, match="truncated"):
        decode_png(png[:40])


def test_png_decoder_matches_npz(npz_background):
    """small1 image <number>_<drawer>.png is npz_background[number - 1, drawer - 1], exactly."""
    root = need("images_background_small1.zip")
    flat = npz_background.reshape(len(npz_background) * 20, -1)
    with zipfile.ZipFile(root / "images_background_small1.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        # Find the correspondence by searching for an identical image ...
        probe = decode_png(zf.read(names[0]))
        assert probe.shape == (105, 105) and set(np.unique(probe)) <= {0, 1}
        hits = np.flatnonzero((flat != probe.astype(bool).ravel()).sum(1) == 0)
        number, drawer = map(int, names[0].rsplit("/", 1)[1][:-4].split("_"))
        assert hits.tolist() == [(number - 1) * 20 + drawer - 1]
        # ... then check it on every image of the subset.
        for name in names:
            number, drawer = map(int, name.rsplit("/", 1)[1][:-4].split("_"))
            image = decode_png(zf.read(name)).astype(bool)
            np.testing.assert_array_equal(image, npz_background[number - 1, drawer - 1], name)


# ------------------------------------------------------------------------------ full data


def test_full_split_counts_and_disjointness(full_train, cache_dir):
    train, _ = full_train
    root = train.root
    val = Omniglot(root, split="val", source="npz", cache_dir=cache_dir)
    test = Omniglot(root, split="test", source="npz", cache_dir=cache_dir, seed=123)
    assert train.num_characters == 1623
    assert (len(train.characters), len(val.characters), len(test.characters)) == (1200, 100, 323)
    assert (train.num_classes, val.num_classes, test.num_classes) == (4800, 400, 1292)
    chars = [set(d.characters) for d in (train, val, test)]
    assert not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])
    assert set.union(*chars) == set(range(1623))
    classes = [set(d.classes) for d in (train, val, test)]
    assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])
    for d in (train, val, test):  # each class's character lies in its split
        assert {c for c, _ in d.classes} == set(d.characters)
    assert test.characters == split_characters(1623)["test"].tolist()  # seed-independent
    assert train.character_numbers == [c + 1 for c in train.characters]


def test_full_cache_is_reused_and_matches_npz(full_train, cache_dir):
    train, build_seconds = full_train
    assert not train.loaded_from_cache and train.cache_path.parent == cache_dir
    assert "npz" in train.cache_path.name
    start = time.perf_counter()
    again = Omniglot(train.root, source="npz", cache_dir=cache_dir)
    assert again.loaded_from_cache and again.cache_path == train.cache_path
    assert time.perf_counter() - start < max(build_seconds, 0.5)
    torch.testing.assert_close(again._images, train._images, rtol=0, atol=0)
    assert build_seconds < 60
    # the streamed, chunked read equals a plain np.load + area resize, both halves
    cached = torch.load(train.cache_path, weights_only=True)["images"]
    for name, first in (("images_background.npz", 0), ("images_evaluation.npz", 964)):
        with np.load(NPZ / name) as f:
            images = f["images"]
        for c in (0, 63, 64, len(images) - 1):
            x = torch.from_numpy(~images[c]).float()[:, None]
            x = torch.nn.functional.interpolate(x, size=(28, 28), mode="area")
            expected = (x * 255).round().to(torch.uint8)[:, 0]
            torch.testing.assert_close(cached[first + c], expected, rtol=0, atol=0)


def test_small_subset_equals_full_data(full_train, small1):
    """PNG path == npz path: small1's characters are full characters ``number - 1``."""
    full = torch.load(full_train[0].cache_path, weights_only=True)["images"]
    small = torch.load(small1.cache_path, weights_only=True)
    assert small["images"].shape == (136, 20, 28, 28)
    assert small["numbers"].diff().gt(0).all()  # official order
    torch.testing.assert_close(small["images"], full[small["numbers"] - 1], rtol=0, atol=0)


# ------------------------------------------------------------------------------ episodes


def _lookup(ds: Omniglot) -> dict[bytes, set[int]]:
    """uint8 image bytes -> set of class positions it can come from (all rotations)."""
    table: dict[bytes, set[int]] = {}
    for pos, (c, k) in enumerate(ds.classes):
        local = ds.characters.index(c)
        for image in torch.rot90(ds._images[local], k, dims=(-2, -1)):
            table.setdefault(image.numpy().tobytes(), set()).add(pos)
    return table


@pytest.mark.parametrize("ways, shots, queries", [(5, 1, 15), (20, 5, 5), (3, 10, 10)])
def test_episode_shapes_labels_and_content(small1, cache_dir, ways, shots, queries):
    ds = Omniglot(small1.root, source="small1", cache_dir=cache_dir, ways=ways, shots=shots,
                  queries=queries, meta_batch=3, seed=7)
    batch = ds.batch(2)
    (xs, ys), (xq, yq) = batch.support, batch.query
    assert isinstance(batch, TaskBatch) and batch.num_tasks == 3
    assert xs.shape == (3, ways * shots, 1, 28, 28) and xq.shape == (3, ways * queries, 1, 28, 28)
    assert ys.shape == (3, ways * shots) and yq.shape == (3, ways * queries)
    assert xs.dtype == xq.dtype == torch.float32 and ys.dtype == yq.dtype == torch.int64
    assert 0 <= xs.min() and xs.max() <= 1 and xq.mean() < 0.3  # strokes 1, background 0
    for task in range(3):
        assert torch.bincount(ys[task], minlength=ways).eq(shots).all()
        assert torch.bincount(yq[task], minlength=ways).eq(queries).all()
    table = _lookup(ds)
    for task in range(3):
        images = torch.cat([xs[task], xq[task]]).mul(255).round().to(torch.uint8)[:, 0]
        labels = torch.cat([ys[task], yq[task]])
        keys = [im.numpy().tobytes() for im in images]
        assert len(set(keys)) == ways * (shots + queries)  # drawers without replacement
        owner = []
        for label in range(ways):  # every label's images come from one class
            sets = [table[k] for k, lab in zip(keys, labels.tolist()) if lab == label]
            common = set.intersection(*sets)
            assert common, f"label {label} mixes classes"
            owner.append(common)
        assert len(set().union(*owner)) >= ways  # distinct classes


def test_rotation_classes(small1, cache_dir):
    assert {k for _, k in small1.classes} == {0, 1, 2, 3}
    assert small1.num_classes == 4 * len(small1.characters)
    assert sorted(small1.classes) == [(c, k) for c in small1.characters for k in range(4)]
    plain = Omniglot(small1.root, source="small1", cache_dir=cache_dir, rotations=False)
    assert plain.classes == [(c, 0) for c in plain.characters]
    assert plain.characters == small1.characters  # rotations never move a character
    # an upright-only episode is made of unrotated cached images
    table = _lookup(plain)
    x = plain.batch(0).support[0][0, :, 0].mul(255).round().to(torch.uint8)
    assert all(im.numpy().tobytes() in table for im in x)


def test_reproducible_and_resumable(small1, cache_dir):
    kw = dict(source="small1", cache_dir=cache_dir, meta_batch=3, seed=11)
    a, b = Omniglot(small1.root, **kw), Omniglot(small1.root, **kw)
    equal = lambda p, q: all(torch.equal(s, t) for s, t in zip(  # noqa: E731
        (*p.support, *p.query), (*q.support, *q.query)))
    assert equal(a.batch(5), b.batch(5))
    assert equal(a.batch(5), a.batch(5))
    assert not equal(a.batch(5), a.batch(6))
    assert not equal(a.batch(5), Omniglot(small1.root, **{**kw, "seed": 12}).batch(5))
    assert equal(a.task(7), a.batch(2).task(1))  # task t = batch(t // 3).task(t % 3)
    single = Omniglot(small1.root, **{**kw, "meta_batch": 1})
    assert equal(single.batch(7).task(0), a.task(7))  # the task stream ignores meta_batch
    it = iter(a)
    assert equal(next(it), a.batch(0)) and equal(next(it), a.batch(1))
    assert equal(next(a.batches(start=4)), a.batch(4))
    finite = Omniglot(small1.root, **kw, num_batches=3)
    assert len(finite) == 3 and len(list(finite)) == 3
    f64 = Omniglot(small1.root, **kw, dtype=torch.float64, device="cpu")
    torch.testing.assert_close(f64.batch(5).support[0].float(), a.batch(5).support[0])


def test_split_characters_proportions():
    for n, counts in ((1623, (1200, 100, 323)), (136, (101, 8, 27)), (156, (115, 10, 31)),
                      (3, (1, 1, 1)), (10, (7, 1, 2))):
        splits = split_characters(n)
        assert tuple(len(splits[s]) for s in ("train", "val", "test")) == counts
        assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(n))
    perm = np.random.RandomState(SPLIT_SEED).permutation(136)
    assert split_characters(136)["val"].tolist() == sorted(perm[101:109].tolist())
    with pytest.raises(ValueError, match="at least 3"):
        split_characters(2)


# ------------------------------------------------------------------------------ synthetic data


def make_synthetic(root: Path, fmt: str) -> np.ndarray:
    """Write a tiny Omniglot in ``fmt`` ("npz" or "zip"); returns images [8, 20, 105, 105].

    Background: alphabet "Zulu" (numbers 1-3) then "Alpha" (4-6), so that official order
    differs from alphabetical order; evaluation: "Mid" (7-8).
    """
    rng = np.random.default_rng(0)
    images = rng.random((8, 20, 105, 105)) > 0.05  # True = white background
    parts = {"images_background": [("Zulu", 1, 3), ("Alpha", 4, 6)],
             "images_evaluation": [("Mid", 7, 8)]}
    root.mkdir(parents=True, exist_ok=True)
    for part, alphabets in parts.items():
        lo, hi = alphabets[0][1] - 1, alphabets[-1][2]
        if fmt == "npz":
            labels = np.repeat(np.arange(hi - lo)[:, None], 20, axis=1)
            np.savez_compressed(root / f"{part}.npz", images=images[lo:hi], labels=labels)
            continue
        with zipfile.ZipFile(root / f"{part}.zip", "w") as zf:
            zf.writestr(f"{part}/", b"")
            for alphabet, first, last in alphabets:
                for j, number in enumerate(range(first, last + 1), start=1):
                    for d in range(1, 21):
                        png = encode_png(images[number - 1, d - 1].astype(np.uint8), 1, 0)
                        zf.writestr(f"{part}/{alphabet}/character{j:02d}/{number:04d}_{d:02d}.png",
                                    png)
    return images


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root / "npz", "npz")
    make_synthetic(root / "zips", "zip")
    return root


def test_zip_and_npz_sources_agree(synthetic, tmp_path):
    from_npz = Omniglot(synthetic / "npz", cache_dir=tmp_path, ways=3)
    from_zip = Omniglot(synthetic / "zips", cache_dir=tmp_path, ways=3)
    assert (from_npz.source, from_zip.source) == ("npz", "zip")
    assert from_npz.cache_path != from_zip.cache_path
    assert from_npz.num_characters == from_zip.num_characters == 8
    assert from_zip.character_numbers == [c + 1 for c in from_zip.characters]
    torch.testing.assert_close(from_npz._images, from_zip._images, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [from_npz.cache_path.name, from_zip.cache_path.name])  # no temp files left behind


def test_cache_default_dir_env_and_corrupt_cache(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_META_CACHE", str(tmp_path))
    first = Omniglot(synthetic / "npz", ways=2)
    assert first.cache_path.parent == tmp_path / "omniglot" and not first.loaded_from_cache
    assert Omniglot(synthetic / "npz", ways=2).loaded_from_cache
    first.cache_path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
        rebuilt = Omniglot(synthetic / "npz", ways=2)
    assert not rebuilt.loaded_from_cache
    torch.testing.assert_close(rebuilt._images, first._images, rtol=0, atol=0)
    assert Omniglot(synthetic / "npz", ways=2).loaded_from_cache


def test_npz_found_in_npz_subfolder(synthetic, tmp_path):
    ds = Omniglot(synthetic, source="npz", cache_dir=tmp_path, ways=2)  # root/npz/*.npz
    assert ds.source == "npz" and ds.num_characters == 8


def test_download_fetches_the_official_zips(synthetic, tmp_path, monkeypatch):
    requested = []

    def fake_urlopen(url, timeout):
        requested.append((url, timeout))
        return open(synthetic / "zips" / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    root = tmp_path / "fresh" / "omniglot"
    ds = Omniglot(root, download=True, cache_dir=tmp_path / "cache", ways=2)
    assert ds.source == "zip" and ds.num_characters == 8
    assert [u for u, _ in requested] == [
        "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
        "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip"]
    assert all(0 < t <= 30 for _, t in requested)
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip",
                                                      "images_evaluation.zip"]


# ------------------------------------------------------------------------------ errors


def test_download_without_network_names_the_file(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=r"put images_background\.zip in .*empty"):
        Omniglot(tmp_path / "empty", download=True, cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 5
    assert not any((tmp_path / "empty").iterdir())  # no partial download left


def test_missing_data_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: put images_background\.zip "
                                                r"and images_evaluation\.zip \(or .*\.npz"):
        Omniglot(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        Omniglot(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"put images_background_small2\.zip in"):
        Omniglot(tmp_path, source="small2")


def test_missing_full_zips_in_the_shared_folder():
    root = need("images_background_small1.zip")
    if (root / "images_background.zip").is_file():
        pytest.skip("the full zips are present")
    with pytest.raises(FileNotFoundError, match=r"images_background\.zip and images_evaluation"):
        Omniglot(root, source="zip")


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(shots=10, queries=11), r"shots \+ queries = 21 exceeds the 20 drawers"),
     (dict(ways=0), "ways must be an integer >= 1"),
     (dict(shots=0), "shots must be an integer >= 1"),
     (dict(queries=-1), "queries must be an integer >= 1"),
     (dict(meta_batch=0), "meta_batch must be"),
     (dict(split="validation"), "split must be one of"),
     (dict(source="tar"), "source must be 'auto' or one of"),
     (dict(dtype=torch.int64), "floating point")],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Omniglot(tmp_path, **kwargs)  # checked before looking for files


def test_too_many_ways(synthetic, tmp_path):
    # 8 characters -> val has 1 character = 4 rotated classes
    with pytest.raises(ValueError, match=r"ways=5 exceeds the 4 classes of the 'val' split"):
        Omniglot(synthetic / "npz", split="val", ways=5, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="exceeds the 6 classes of the 'train'"):
        Omniglot(synthetic / "npz", ways=7, rotations=False, cache_dir=tmp_path)


# ------------------------------------------------------------------------------ sinusoid


def test_sinusoid_shapes_and_function():
    ds = Sinusoid(shots=5, queries=7, meta_batch=4, seed=3)
    batch = ds.batch(2)
    (xs, ys), (xq, yq) = batch.support, batch.query
    assert xs.shape == ys.shape == (4, 5, 1) and xq.shape == yq.shape == (4, 7, 1)
    assert xs.dtype == torch.float32
    amp, phase = ds.task_params(2)
    x = torch.cat([xs, xq], 1).double()
    y = torch.cat([ys, yq], 1).double()
    torch.testing.assert_close(y, amp[:, None, None] * torch.sin(x - phase[:, None, None]),
                               atol=1e-5, rtol=1e-5)


def test_sinusoid_reproducible():
    a, b = Sinusoid(seed=1), Sinusoid(seed=1, dtype=torch.float64)
    torch.testing.assert_close(a.batch(9).query[1], b.batch(9).query[1].float())
    assert not torch.equal(a.batch(9).query[1], a.batch(10).query[1])
    assert not torch.equal(a.batch(9).query[1], Sinusoid(seed=2).batch(9).query[1])
    torch.testing.assert_close(a.task(30).support[0], a.batch(1).task(5).support[0])
    small = Sinusoid(seed=1, meta_batch=5)
    torch.testing.assert_close(small.batch(5).task(0).support[0], a.task(25).support[0])
    it = iter(a)
    torch.testing.assert_close(next(it).support[0], a.batch(0).support[0])
    torch.testing.assert_close(next(it).support[0], a.batch(1).support[0])
    assert len(list(Sinusoid(num_batches=4))) == 4


def test_sinusoid_statistics():
    ds = Sinusoid(shots=10, queries=10, meta_batch=25, seed=0)
    amps, phases, xs = [], [], []
    for i in range(80):  # 2000 tasks, 40000 inputs
        amp, phase = ds.task_params(i)
        amps.append(amp)
        phases.append(phase)
        b = ds.batch(i)
        xs.append(torch.cat([b.support[0], b.query[0]], 1).flatten())
    amp, phase, x = torch.cat(amps), torch.cat(phases), torch.cat(xs).double()
    assert 0.1 <= amp.min() and amp.max() <= 5.0 and 0 <= phase.min() and phase.max() <= math.pi
    assert -5 <= x.min() and x.max() <= 5
    # uniform moments, tolerance ~5 standard errors
    assert abs(amp.mean() - 2.55) < 5 * 4.9 / math.sqrt(12 * 2000)
    assert abs(phase.mean() - math.pi / 2) < 5 * math.pi / math.sqrt(12 * 2000)
    assert abs(x.mean()) < 5 * 10 / math.sqrt(12 * 40000)
    assert abs(x.var() - 100 / 12) < 0.3
    # tasks are independent: amplitude and phase uncorrelated
    assert abs(torch.corrcoef(torch.stack([amp, phase]))[0, 1]) < 0.1


def test_sinusoid_custom_ranges_and_errors():
    ds = Sinusoid(amplitude=(1.0, 1.0), phase=(0.0, 0.0), x_range=(0.0, 1.0), meta_batch=2)
    x, y = ds.batch(0).support
    torch.testing.assert_close(y, torch.sin(x))
    with pytest.raises(ValueError, match="shots must be"):
        Sinusoid(shots=0)
    with pytest.raises(ValueError, match="amplitude must be"):
        Sinusoid(amplitude=(5.0, 0.1))
