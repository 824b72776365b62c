"""meta.data: Omniglot episodes (Pillow decoding; real and synthetic data), Sinusoid tasks.

The real Omniglot files live read-only in ``../shared/data/omniglot`` beside the repository
root (or ``$OMNIGLOT_ROOT``); tests that need them skip when they are absent.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meta.data import SPLIT_SEED, Omniglot, Sinusoid, TaskBatch, split_characters
from meta.data.omniglot import _background, _preprocess

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


# ------------------------------------------------------------------------------ Pillow decoding


def encode_png(mask: np.ndarray) -> bytes:
    """A 1-bit PNG (Pillow mode "1") of a bool mask, True = white, as the official files are."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(bool)).save(buf, format="PNG")
    return buf.getvalue()


def test_pillow_decoder_matches_npz(npz_background):
    """small1 image <number>_<drawer>.png is npz_background[number - 1, drawer - 1], exactly."""
    root = need("images_background_small1.zip")
    flat = npz_background.reshape(len(npz_background) * 20, -1)
    with zipfile.ZipFile(root / "images_background_small1.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        # Find the correspondence by searching for an identical image ...
        probe = _background(zf.read(names[0]), names[0])
        assert probe.shape == (105, 105) and probe.dtype == bool
        assert Image.open(io.BytesIO(zf.read(names[0]))).mode == "1"  # official 1-bit PNGs
        hits = np.flatnonzero((flat != probe.ravel()).sum(1) == 0)
        number, drawer = map(int, names[0].rsplit("/", 1)[1][:-4].split("_"))
        assert hits.tolist() == [(number - 1) * 20 + drawer - 1]
        # ... then check it on every image of the subset.
        for name in names:
            number, drawer = map(int, name.rsplit("/", 1)[1][:-4].split("_"))
            image = _background(zf.read(name), name)
            np.testing.assert_array_equal(image, npz_background[number - 1, drawer - 1], name)


def test_decoder_accepts_grayscale_and_rejects_bad_files():
    rng = np.random.default_rng(3)
    mask = rng.random((105, 105)) > 0.2
    np.testing.assert_array_equal(_background(encode_png(mask), "x.png"), mask)
    gray = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(gray, format="PNG")
    np.testing.assert_array_equal(_background(gray.getvalue(), "g.png"), mask)
    with pytest.raises(ValueError, match="cannot decode image bad.png"):
        _background(b"GIF89a not an image", "bad.png")
    with pytest.raises(ValueError, match=r"small.png: expected a 105x105 image, got 10x10"):
        _background(encode_png(mask[:10, :10]), "small.png")


def test_preprocessings_by_hand():
    """area = mean over 15x15/4 footprints; maml = Pillow's resize of the mode-"1" image (which
    Pillow performs as NEAREST, whatever filter is asked); lanczos = Pillow LANCZOS on "L"."""
    rng = np.random.default_rng(5)
    bg = rng.random((2, 20, 105, 105)) > 0.3
    area = _preprocess(bg, "area")
    x = torch.from_numpy(~bg).double().reshape(-1, 1, 105, 105)
    want = torch.nn.functional.interpolate(x, size=(28, 28), mode="area")
    torch.testing.assert_close(area.double(), (want * 255).round().reshape(2, 20, 28, 28),
                               rtol=0, atol=0)
    maml = _preprocess(bg, "maml")
    one = Image.fromarray(bg[1, 7])
    assert one.mode == "1"
    by_hand = np.asarray(one.resize((28, 28), resample=Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(maml[1, 7].numpy(), np.where(by_hand, 0, 255))
    nearest = np.asarray(one.resize((28, 28), resample=Image.Resampling.NEAREST))
    np.testing.assert_array_equal(by_hand, nearest)  # the Pillow rule the docstring states
    assert set(np.unique(maml.numpy())) <= {0, 255}  # binary, as MAML trained on
    lanczos = _preprocess(bg, "lanczos")
    gray = Image.fromarray(np.where(bg[0, 3], 255, 0).astype(np.uint8))
    want = 255 - np.asarray(gray.resize((28, 28), resample=Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(lanczos[0, 3].numpy(), want)
    assert len(np.unique(lanczos.numpy())) > 2  # grey levels
    assert not torch.equal(area, lanczos) and not torch.equal(area, maml)


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
                        png = encode_png(images[number - 1, d - 1])
                        zf.writestr(f"{part}/{alphabet}/character{j:02d}/{number:04d}_{d:02d}.png",
                                    png)
    return images


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root / "npz", "npz")
    make_synthetic(root / "zips", "zip")
    return root


@pytest.mark.parametrize("preprocessing", ["area", "maml", "lanczos"])
def test_zip_and_npz_sources_agree(synthetic, tmp_path, preprocessing):
    from_npz = Omniglot(synthetic / "npz", cache_dir=tmp_path, ways=3, preprocessing=preprocessing)
    from_zip = Omniglot(synthetic / "zips", cache_dir=tmp_path, ways=3, preprocessing=preprocessing)
    assert from_npz.preprocessing == from_zip.preprocessing == preprocessing
    assert preprocessing in from_npz.cache_path.name
    assert (from_npz.source, from_zip.source) == ("npz", "zip")
    assert from_npz.cache_path != from_zip.cache_path
    assert from_npz.num_characters == from_zip.num_characters == 8
    assert from_zip.character_numbers == [c + 1 for c in from_zip.characters]
    torch.testing.assert_close(from_npz._images, from_zip._images, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [from_npz.cache_path.name, from_zip.cache_path.name])  # no temp files left behind


def test_cache_records_its_preprocessing(synthetic, tmp_path):
    area = Omniglot(synthetic / "npz", cache_dir=tmp_path, ways=2)
    maml = Omniglot(synthetic / "npz", cache_dir=tmp_path, ways=2, preprocessing="maml")
    assert area.preprocessing == "area" and not maml.loaded_from_cache
    assert area.cache_path != maml.cache_path
    assert torch.load(maml.cache_path, weights_only=True)["preprocessing"] == "maml"
    assert set(maml._images.unique().tolist()) <= {0, 255}
    assert not torch.equal(area._images, maml._images)
    # a cache file holding the other preprocessing is never used (here: renamed by hand)
    maml.cache_path.unlink()
    area.cache_path.rename(maml.cache_path)
    with pytest.warns(UserWarning, match="holds preprocessing='area', not 'maml'"):
        again = Omniglot(synthetic / "npz", cache_dir=tmp_path, ways=2, preprocessing="maml")
    assert not again.loaded_from_cache
    torch.testing.assert_close(again._images, maml._images, rtol=0, atol=0)
    assert Omniglot(synthetic / "npz", cache_dir=tmp_path, ways=2,
                    preprocessing="maml").loaded_from_cache
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        Omniglot(synthetic / "npz", cache_dir=tmp_path, preprocessing="bicubic")


def test_maml_preprocessing_is_the_official_script_on_the_official_files(cache_dir):
    """cbfinn/maml resize_images.py: Image.open(png).resize((28, 28), resample=LANCZOS)."""
    root = need("images_background_small1.zip")
    ds = Omniglot(root, source="small1", cache_dir=cache_dir, preprocessing="maml",
                  rotations=False)
    images = torch.load(ds.cache_path, weights_only=True)
    with zipfile.ZipFile(root / "images_background_small1.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        for name in names[::97]:
            number, drawer = map(int, name.rsplit("/", 1)[1][:-4].split("_"))
            img = Image.open(io.BytesIO(zf.read(name)))
            small = np.asarray(img.resize((28, 28), resample=Image.LANCZOS), dtype=np.float32)
            strokes = 1.0 - small / small.max()  # MAML: 1 - image / 255 (white = 1)
            row = images["numbers"].tolist().index(number)
            got = images["images"][row, drawer - 1].float().div(255).numpy()
            np.testing.assert_array_equal(got, strokes, name)


def test_shards_concatenate_to_the_batch(small1, cache_dir):
    ds = Omniglot(small1.root, source="small1", cache_dir=cache_dir, meta_batch=5, seed=4)
    whole = ds.batch(3)
    assert list(ds.task_ids(3)) == [15, 16, 17, 18, 19]
    for world in (1, 2, 3, 7):
        shards = [ds.shard(3, r, world) for r in range(world)]
        assert sum(s.num_tasks for s in shards) == 5
        for r, shard in enumerate(shards):
            for j, t in enumerate(range(r, 5, world)):
                torch.testing.assert_close(shard.task(j).support[0], whole.task(t).support[0],
                                           rtol=0, atol=0)
                assert torch.equal(shard.task(j).query[1], whole.task(t).query[1])
    empty = ds.shard(3, 6, 7)
    assert empty.num_tasks == 0 and empty.support[0].shape == (0, 5, 1, 28, 28)
    assert empty.query[1].dtype == torch.int64
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        ds.shard(0, 2, 2)


def test_sinusoid_shards_and_seed_derivation():
    from meta.data import task_generator, task_seed

    ds = Sinusoid(shots=3, queries=2, meta_batch=4, seed=9)
    torch.testing.assert_close(ds.shard(2, 1, 3).support[0],
                               ds.batch(2).support[0][1::3], rtol=0, atol=0)
    u = torch.rand(7, generator=task_generator("sinusoid", 9, 8), dtype=torch.float64)
    torch.testing.assert_close(ds.task_params(2)[0][0], 0.1 + 4.9 * u[0])  # task 8 = batch 2
    assert task_seed("sinusoid", 9, 8) != task_seed("sinusoid", 9, 9)
    assert 0 <= task_seed("x") < 2**63


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
