"""Mini-ImageNet / tieredImageNet / CIFAR-FS / FC100 readers on fixtures in their real on-disk
formats (written by tests/_fewshot_fixtures.py), and the episodes drawn from them."""

from __future__ import annotations

import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import meta
from meta.data import (
    DATASETS,
    FewShotArrays,
    ImageEpisodes,
    find_layout,
    load_arrays,
    load_pickle,
    open_dataset,
)

sys.path.insert(0, os.path.dirname(__file__))
from _fewshot_fixtures import LAYOUTS, SIZE, write_fixture  # noqa: E402


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> dict:
    """One root per (dataset, layout), all three splits, with what was written."""
    out = {}
    for dataset, layout in LAYOUTS:
        root = tmp_path_factory.mktemp(f"{dataset}-{layout}")
        out[dataset, layout] = root, write_fixture(dataset, layout, root)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fewshot-cache")


def load(fixtures, cache, dataset, layout, split="train", **kw):
    root, _ = fixtures[dataset, layout]
    kw.setdefault("check_classes", "ignore")
    return load_arrays(dataset, root, split, cache_dir=cache, **kw)


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("dataset, layout", LAYOUTS)
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_reader_round_trip(fixtures, cache, dataset, layout, split):
    arrays = load(fixtures, cache, dataset, layout, split)
    images, cls, names = fixtures[dataset, layout][1][split]
    size = SIZE[dataset]
    assert isinstance(arrays, FewShotArrays)
    assert (arrays.dataset, arrays.split, arrays.layout) == (dataset, split, layout)
    assert arrays.images.dtype == torch.uint8 and arrays.images.shape == (len(cls), size, size, 3)
    assert arrays.labels.dtype == torch.int64 and arrays.labels.shape == (len(cls),)
    assert arrays.num_classes == len(names) == {"train": 4}.get(split, 3)
    assert arrays.labels.min() == 0 and arrays.labels.max() == arrays.num_classes - 1
    assert arrays.class_counts().tolist() == [6] * arrays.num_classes
    assert arrays.class_names == names  # WordNet ids, or the file's labels as strings
    np.testing.assert_array_equal(arrays.labels.numpy(), cls)
    if layout == "csv":  # JPEG (q95), written at 97x90, resized back to 84x84 by LANCZOS
        diff = np.abs(arrays.images.numpy().astype(int) - images.astype(int))
        assert diff.mean() < 2.5 and np.percentile(diff, 99) < 12
    else:  # arrays are kept bit for bit
        np.testing.assert_array_equal(arrays.images.numpy(), images)


def test_labels_renumbered_from_metaoptnet_offsets(fixtures, cache):
    """MetaOptNet's val labels are 64..79 and test 80..99 in the files: renumbered 0..C-1."""
    root, _ = fixtures["miniimagenet", "metaoptnet_pkl"]
    raw = load_pickle(root / "miniImageNet_category_split_val.pickle")
    assert min(raw["labels"]) == 64
    val = load(fixtures, cache, "miniimagenet", "metaoptnet_pkl", "val")
    assert sorted(set(val.labels.tolist())) == [0, 1, 2]
    assert val.class_names == sorted(raw["catname2label"])  # names from catname2label
    cifar = load(fixtures, cache, "cifarfs", "metaoptnet_pkl", "test")
    assert cifar.class_names == ["80", "81", "82"]


def test_csv_images_are_pillow_lanczos_of_the_jpegs(fixtures, cache):
    root, _ = fixtures["miniimagenet", "csv"]
    arrays = load(fixtures, cache, "miniimagenet", "csv", "val")
    rows = (root / "val.csv").read_text().splitlines()
    assert rows[0] == "filename,label" and len(rows) == 1 + len(arrays.labels)
    for k in (0, 7, len(rows) - 2):
        name = rows[k + 1].split(",")[0]
        img = Image.open(root / "images" / name).convert("RGB")
        assert img.size == (97, 90)
        want = np.asarray(img.resize((84, 84), Image.Resampling.LANCZOS))
        np.testing.assert_array_equal(arrays.images[k].numpy(), want)


def test_csv_cache_records_preprocessing_and_is_reused(fixtures, tmp_path, monkeypatch):
    root, _ = fixtures["miniimagenet", "csv"]
    first = load_arrays("miniimagenet", root, "test", cache_dir=tmp_path, check_classes="ignore")
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and "pillow-rgb-84px-lanczos" in files[0].name
    with np.load(files[0]) as f:
        assert str(f["preprocessing"]) == "pillow-rgb-84px-lanczos"
        assert f["images"].dtype == np.uint8
    import meta.data.formats as formats

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded the JPEGs again instead of using the cache")

    monkeypatch.setattr(formats, "read_many_rgb", no_decoding)
    again = load_arrays("miniimagenet", root, "test", cache_dir=tmp_path, check_classes="ignore")
    torch.testing.assert_close(again.images, first.images, rtol=0, atol=0)
    assert again.class_names == first.class_names
    monkeypatch.undo()
    small = load_arrays("miniimagenet", root, "test", cache_dir=tmp_path, image_size=40,
                        check_classes="ignore")
    assert small.images.shape[1:] == (40, 40, 3) and len(list(tmp_path.iterdir())) == 2
    # a file holding another preprocessing is never used for this one
    big, other = (sorted(tmp_path.iterdir(), key=lambda p: "40px" in p.name))
    big.unlink()
    other.rename(big)
    with pytest.warns(UserWarning, match="holds another preprocessing"):
        rebuilt = load_arrays("miniimagenet", root, "test", cache_dir=tmp_path,
                              check_classes="ignore")
    torch.testing.assert_close(rebuilt.images, first.images, rtol=0, atol=0)


def test_csv_errors(tmp_path):
    write_fixture("miniimagenet", "csv", tmp_path, classes=(2, 2, 2), per_class=2)
    (tmp_path / "images" / sorted(os.listdir(tmp_path / "images"))[0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.csv lists 1 image\(s\) missing"):
        load_arrays("miniimagenet", tmp_path, "train", cache_dir=tmp_path / "c")
    (tmp_path / "val.csv").write_text("file,class\na.jpg,n01\n")
    with pytest.raises(ValueError, match="expected the header 'filename,label'"):
        load_arrays("miniimagenet", tmp_path, "val", cache_dir=tmp_path / "c")


def test_validation_file_name_and_protocols(tmp_path):
    """learn2learn hosts the val cache as ...-validation.pkl; protocol-5 pickles load too."""
    written = write_fixture("miniimagenet", "cache_pkl", tmp_path, protocol=5)
    (tmp_path / "mini-imagenet-cache-val.pkl").rename(
        tmp_path / "mini-imagenet-cache-validation.pkl")
    for split in ("val", "validation"):
        arrays = load_arrays("miniimagenet", tmp_path, split, check_classes="ignore")
        assert arrays.split == "val" and arrays.files[0].endswith("-validation.pkl")
        np.testing.assert_array_equal(arrays.images.numpy(), written["val"][0])


@pytest.mark.filterwarnings("error::DeprecationWarning")
def test_pickles_written_by_numpy_1_load(tmp_path):
    """The published pickles were written by NumPy 1.x (module ``numpy.core``, Python 2 str)."""
    data = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    blob = pickle.dumps({"data": data, "labels": [3, 3, 9, 9]}, protocol=2)
    old = blob.replace(b"numpy._core.", b"numpy.core.")  # protocol 2: newline-ended names
    assert old != blob or b"numpy.core." in blob
    (tmp_path / "FC100_train.pickle").write_bytes(old)
    arrays = load_arrays("fc100", tmp_path, "train", check_classes="ignore")
    np.testing.assert_array_equal(arrays.images.numpy(), data)
    assert arrays.labels.tolist() == [0, 0, 1, 1] and arrays.class_names == ["3", "9"]


def test_tiered_ren_style_label_keys(tmp_path):
    write_fixture("tieredimagenet", "metaoptnet_npz", tmp_path)
    with open(tmp_path / "train_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": np.repeat([5, 1, 3, 2], 6),
                     "label_specific_str": [f"s{k}" for k in range(6)]}, f, protocol=2)
    arrays = load_arrays("tieredimagenet", tmp_path, "train", check_classes="ignore")
    assert arrays.class_names == ["s1", "s2", "s3", "s5"]
    assert arrays.labels.tolist() == np.repeat([3, 0, 2, 1], 6).tolist()


def test_auto_prefers_exact_names_and_format_selects(tmp_path):
    write_fixture("miniimagenet", "csv", tmp_path, classes=(2, 2, 2), per_class=2)
    assert find_layout("miniimagenet", tmp_path, "train")[0] == "csv"
    write_fixture("miniimagenet", "metaoptnet_pkl", tmp_path, classes=(2, 2, 2), per_class=2)
    assert find_layout("miniimagenet", tmp_path, "train")[0] == "metaoptnet_pkl"
    assert find_layout("miniimagenet", tmp_path, "train", "csv")[0] == "csv"
    (tmp_path / "mini-imagenet-cache-train.pkl.bak").write_bytes(b"")  # near miss: ignored
    assert find_layout("miniimagenet", tmp_path, "train")[0] == "metaoptnet_pkl"
    with pytest.raises(ValueError, match="format must be 'auto' or one of"):
        find_layout("cifarfs", tmp_path, "train", "csv")


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_missing_files_message_lists_every_layout(tmp_path, dataset):
    (tmp_path / "train.csv").write_text("filename,label\n")  # CSV without images/: no match
    (tmp_path / "CIFAR_FS_train.pkl").write_bytes(b"")  # wrong extension
    with pytest.raises(FileNotFoundError) as info:
        load_arrays(dataset, tmp_path, "val")
    message = str(info.value)
    assert f"{DATASETS[dataset].title} 'val' split" in message and str(tmp_path) in message
    expected = {
        "miniimagenet": ["format='cache_pkl'", "mini-imagenet-cache-val.pkl or "
                         "mini-imagenet-cache-validation.pkl", "format='metaoptnet_pkl'",
                         "miniImageNet_category_split_val.pickle", "format='csv'",
                         "val.csv + images/"],
        "tieredimagenet": ["format='metaoptnet_npz'", "val_images.npz + val_labels.pkl"],
        "cifarfs": ["format='metaoptnet_pkl'", "CIFAR_FS_val.pickle"],
        "fc100": ["format='metaoptnet_pkl'", "FC100_val.pickle"],
    }[dataset]
    for piece in expected:
        assert piece in message, (piece, message)
    assert message.count("  - format=") == len(DATASETS[dataset].layouts)
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        load_arrays(dataset, tmp_path / "nowhere", "train")
    with pytest.raises(FileNotFoundError, match=r"miniImageNet_category_split_train_phase_train"):
        load_arrays("miniimagenet", tmp_path, "train", format="metaoptnet_pkl")


def test_unsafe_or_malformed_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    with open(tmp_path / "CIFAR_FS_train.pickle", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(ValueError, match="refusing to load .*system"):
        load_arrays("cifarfs", tmp_path, "train")
    with open(tmp_path / "FC100_train.pickle", "wb") as f:
        pickle.dump({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"missing key\(s\) \['data'\]"):
        load_arrays("fc100", tmp_path, "train")
    with open(tmp_path / "FC100_val.pickle", "wb") as f:
        pickle.dump({"data": np.zeros((2, 32, 32, 3), np.float32), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="images must be uint8"):
        load_arrays("fc100", tmp_path, "val")


def test_image_size_and_class_count_checks(fixtures, cache):
    root, written = fixtures["cifarfs", "metaoptnet_pkl"]
    with pytest.raises(ValueError, match=r"are 32x32, not the Mini-ImageNet size 84x84; pass "
                                         r"image_size=84"):
        with open(root / "CIFAR_FS_train.pickle", "rb") as f, \
                open(root / "miniImageNet_category_split_test.pickle", "wb") as g:
            g.write(f.read())
        load_arrays("miniimagenet", root, "test", check_classes="ignore")
    big = load_arrays("cifarfs", root, "train", image_size=48, check_classes="ignore")
    assert big.images.shape == (24, 48, 48, 3)
    want = np.asarray(Image.fromarray(written["train"][0][5]).resize((48, 48),
                                                                      Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(big.images[5].numpy(), want)
    with pytest.warns(UserWarning, match="has 4 classes; the standard split has 64"):
        load_arrays("cifarfs", root, "train")
    with pytest.raises(ValueError, match="FC100 'val' .* has 3 classes; the standard split has 20"):
        load(fixtures, cache, "fc100", "metaoptnet_pkl", "val", check_classes="error")
    with pytest.raises(ValueError, match="split must be one of"):
        load_arrays("cifarfs", root, "valid")


# ----------------------------------------------------------------------------- episodes


def _owner_table(arrays: FewShotArrays) -> dict[bytes, int]:
    return {im.numpy().tobytes(): int(c) for im, c in zip(arrays.images, arrays.labels)}


@pytest.mark.parametrize("dataset, layout", [("miniimagenet", "cache_pkl"),
                                             ("cifarfs", "metaoptnet_pkl")])
def test_episodes_shapes_labels_and_content(fixtures, cache, dataset, layout):
    arrays = load(fixtures, cache, dataset, layout, "train")
    ways, shots, queries, b = 3, 2, 3, 4
    ds = ImageEpisodes(arrays, ways=ways, shots=shots, queries=queries, meta_batch=b, seed=1)
    batch = ds.batch(3)
    (xs, ys), (xq, yq) = batch.support, batch.query
    size = SIZE[dataset]
    assert isinstance(batch, meta.TaskBatch) and batch.num_tasks == b
    assert xs.shape == (b, ways * shots, 3, size, size)
    assert xq.shape == (b, ways * queries, 3, size, size)
    assert xs.dtype == torch.float32 and ys.dtype == yq.dtype == torch.int64
    assert 0 <= xs.min() and xs.max() <= 1
    table = _owner_table(arrays)
    for t in range(b):
        assert torch.bincount(ys[t], minlength=ways).tolist() == [shots] * ways
        assert torch.bincount(yq[t], minlength=ways).tolist() == [queries] * ways
        x = torch.cat([xs[t], xq[t]]).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)
        y = torch.cat([ys[t], yq[t]]).tolist()
        keys = [im.numpy().tobytes() for im in x]
        assert len(set(keys)) == len(keys)  # without replacement
        owners = {}
        for k, label in zip(keys, y):
            owners.setdefault(label, set()).add(table[k])
        assert all(len(v) == 1 for v in owners.values())  # one class per label
        assert len({next(iter(v)) for v in owners.values()}) == ways  # distinct classes


def test_episodes_are_deterministic_and_shardable(fixtures, cache):
    arrays = load(fixtures, cache, "fc100", "metaoptnet_pkl", "train")
    kw = dict(ways=2, shots=1, queries=2, meta_batch=3, seed=5)
    a, b = ImageEpisodes(arrays, **kw), ImageEpisodes(arrays, **kw)
    same = lambda p, q: all(torch.equal(s, t) for s, t in zip(  # noqa: E731
        (*p.support, *p.query), (*q.support, *q.query)))
    assert same(a.batch(4), b.batch(4)) and not same(a.batch(4), a.batch(5))
    assert not same(a.batch(4), ImageEpisodes(arrays, **{**kw, "seed": 6}).batch(4))
    assert same(a.task(13), a.batch(4).task(1))
    assert same(ImageEpisodes(arrays, **{**kw, "meta_batch": 1}).batch(13), a.task(13).batched())
    shards = [a.shard(4, r, 2) for r in range(2)]
    assert [s.num_tasks for s in shards] == [2, 1]
    assert same(shards[0], a.tasks([12, 14])) and same(shards[1], a.tasks([13]))
    assert a.shard(0, 3, 4).num_tasks == 0
    idx, labels = a.sample(13)
    assert idx.shape == (2, 3) and sorted(labels.tolist()) == [0, 1]
    x = a.task(13).support[0]  # support image of row r is image idx[r, 0] (label labels[r])
    for r in range(2):
        pos = (a.task(13).support[1] == labels[r]).nonzero().item()
        torch.testing.assert_close(x[pos], arrays.images[idx[r, 0]].permute(2, 0, 1) / 255.0)
    assert len(list(ImageEpisodes(arrays, **kw, num_batches=2))) == 2


def test_normalisation_dtype_and_preload(fixtures, cache):
    arrays = load(fixtures, cache, "miniimagenet", "metaoptnet_pkl", "train")
    kw = dict(ways=2, shots=1, queries=1, meta_batch=2, seed=0)
    unit = ImageEpisodes(arrays, **kw, dtype=torch.float64)
    ms = ImageEpisodes(arrays, **kw, dtype=torch.float64, normalize="meanstd")
    mean = torch.tensor([120.39586422, 115.59361427, 104.54012653], dtype=torch.float64) / 255
    std = torch.tensor([70.68188272, 68.27635443, 72.54505529], dtype=torch.float64) / 255
    x, z = unit.batch(1).support[0], ms.batch(1).support[0]
    torch.testing.assert_close(z, (x - mean[:, None, None]) / std[:, None, None],
                               rtol=1e-12, atol=1e-12)
    custom = ImageEpisodes(arrays, **kw, normalize=((0.5,), (0.25,)), preload=True)
    torch.testing.assert_close(custom.batch(1).support[0], (x.float() - 0.5) / 0.25)
    with pytest.raises(ValueError, match="normalize must be"):
        ImageEpisodes(arrays, **kw, normalize="imagenet")
    with pytest.raises(ValueError, match="3 means and 3 positive stds"):
        ImageEpisodes(arrays, **kw, normalize=((0.5, 0.5), (1.0, 1.0)))


def test_episode_argument_errors(fixtures, cache):
    arrays = load(fixtures, cache, "cifarfs", "metaoptnet_pkl", "val")
    with pytest.raises(ValueError, match="ways=4 exceeds the 3 classes of the cifarfs 'val'"):
        ImageEpisodes(arrays, ways=4)
    with pytest.raises(ValueError, match=r"shots \+ queries = 7 exceeds the 6 images of class"):
        ImageEpisodes(arrays, ways=2, shots=2, queries=5)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        ImageEpisodes(arrays, shots=0)
    with pytest.raises(ValueError, match="floating point"):
        ImageEpisodes(arrays, dtype=torch.int32)


# ----------------------------------------------------------------------------- entry point


@pytest.mark.parametrize("dataset, layout", LAYOUTS)
def test_open_dataset_every_layout(fixtures, cache, dataset, layout):
    root, _ = fixtures[dataset, layout]
    stream = open_dataset(dataset, root, "val", ways=3, shots=1, queries=2, meta_batch=2, seed=3,
                          format="auto", cache_dir=cache, check_classes="ignore")
    assert isinstance(stream, ImageEpisodes) and stream.arrays.layout == layout
    batch = stream.batch(0)
    assert batch.support[0].shape == (2, 3, 3, SIZE[dataset], SIZE[dataset])
    assert batch.query[1].shape == (2, 6)


def test_open_dataset_other_names_and_errors(fixtures, cache):
    root, _ = fixtures["cifarfs", "metaoptnet_pkl"]
    s = open_dataset("CIFAR-FS", root, "test", ways=2, queries=2, check_classes="ignore",
                     normalize="meanstd")
    assert s.dataset == "cifarfs" and s.mean[0] == pytest.approx(129.37731888 / 255)
    sin = open_dataset("sinusoid", shots=4, queries=3, meta_batch=2, seed=1)
    assert sin.batch(0).support[0].shape == (2, 4, 1)
    torch.testing.assert_close(sin.batch(3).query[1], meta.data.Sinusoid(
        shots=4, queries=3, meta_batch=2, seed=1).batch(3).query[1], rtol=0, atol=0)
    val = open_dataset("sinusoid", None, "val", shots=4, queries=3, meta_batch=2, seed=1)
    assert val.split == "val" and not torch.equal(val.batch(3).query[1], sin.batch(3).query[1])
    with pytest.raises(ValueError, match="split must be one of"):
        open_dataset("sinusoid", split="validation")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        open_dataset("imagenet", root)
    with pytest.raises(ValueError, match="needs root="):
        open_dataset("fc100")
    with pytest.raises(TypeError, match=r"unexpected option\(s\) \['rotations'\]"):
        open_dataset("fc100", root, rotations=True)


def test_open_dataset_omniglot_passes_format_as_source(tmp_path):
    from test_data import make_synthetic

    make_synthetic(tmp_path / "o", "npz")
    ds = open_dataset("omniglot", tmp_path / "o", "train", ways=2, shots=1, queries=1,
                      format="npz", cache_dir=tmp_path / "c", preprocessing="maml")
    assert ds.source == "npz" and ds.preprocessing == "maml"
    with pytest.raises(FileNotFoundError, match=re.escape("images_background_small1.zip")):
        open_dataset("omniglot", tmp_path / "o", format="small1", cache_dir=tmp_path / "c")


@pytest.mark.filterwarnings("ignore:Implicit.*stationary point:RuntimeWarning")  # 1 inner step
@pytest.mark.parametrize("name", list(meta.ALGORITHMS))
def test_every_learner_takes_a_step_on_image_episodes(fixtures, cache, name):
    torch.manual_seed(0)
    stream = open_dataset("cifarfs", fixtures["cifarfs", "metaoptnet_pkl"][0], "train", ways=2,
                          shots=1, queries=2, meta_batch=2, cache_dir=cache, dtype=torch.float64,
                          check_classes="ignore")
    model = meta.Conv4(3, 2, hidden=4, max_pool=True).double()
    kw = {"imaml": dict(cg_iters=2), "memoryreduced": dict(cg_iters=2)}.get(name, {})
    learner = meta.make_learner(name, model, inner_lr=0.1, inner_steps=1, **kw)
    metrics = learner.meta_step(stream.shard(0, 0, 1))
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preload", [False, True])
def test_episodes_on_cuda_equal_cpu(fixtures, cache, preload):
    arrays = load(fixtures, cache, "miniimagenet", "cache_pkl", "train")
    kw = dict(ways=3, shots=2, queries=2, meta_batch=3, seed=2, normalize="meanstd")
    cpu = ImageEpisodes(arrays, **kw).batch(1)
    gpu = ImageEpisodes(arrays, **kw, device="cuda", preload=preload).batch(1)
    assert gpu.support[0].is_cuda and gpu.query[1].is_cuda
    torch.testing.assert_close(gpu.support[0].cpu(), cpu.support[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(gpu.query[1].cpu(), cpu.query[1])
