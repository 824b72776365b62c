"""Data-pipeline timings: Omniglot cache builds (Pillow, each preprocessing), JPEG decoding for the
Mini-ImageNet CSV layout, and episode assembly from uint8 arrays.

    OMP_NUM_THREADS=1 python -m benchmarks.data_io [--omniglot ../shared/data/omniglot]

Prints one line per measurement (seconds, best of ``--repeat``). Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from meta.data import FewShotArrays, ImageEpisodes, Omniglot
from meta.data.images import read_many_rgb


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def fresh_build(root: Path, source: str, cache: Path, preprocessing: str) -> None:
    """Build an Omniglot cache from scratch (the cache file is removed afterwards)."""
    ds = Omniglot(root, source=source, cache_dir=cache, preprocessing=preprocessing)
    assert not ds.loaded_from_cache
    ds.cache_path.unlink()


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser()
    parser.add_argument("--omniglot", default=str(here.parent / "shared/data/omniglot"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--jpegs", type=int, default=200)
    args = parser.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}, "
          f"{time.strftime('%Y-%m-%d', time.gmtime())}")
    root = Path(args.omniglot)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (root / "images_background_small1.zip").is_file():
            for pre in ("area", "maml", "lanczos"):
                t = best(lambda pre=pre: fresh_build(root, "small1", tmp / "s", pre), args.repeat)
                print(f"omniglot small1.zip (136 chars, 2720 PNGs) decode+{pre} cache build: "
                      f"{t:.2f} s")
        if (root / "npz" / "images_background.npz").is_file():
            for pre in ("area", "maml", "lanczos"):
                t = best(lambda pre=pre: fresh_build(root, "npz", tmp / "n", pre), 1)
                print(f"omniglot full npz (1623 chars) {pre} cache build: {t:.2f} s")
            Omniglot(root, source="npz", cache_dir=tmp / "hit")
            t = best(lambda: Omniglot(root, source="npz", cache_dir=tmp / "hit"), args.repeat)
            print(f"omniglot full npz, cache hit (sha256 of the npz + load): {t:.2f} s")

        rng = np.random.default_rng(0)
        folder = tmp / "jpegs"
        folder.mkdir()
        paths = []
        for k in range(args.jpegs):  # ImageNet-like: 500x375 JPEGs
            img = rng.integers(0, 256, (375 // 15, 500 // 20, 3), dtype=np.uint8)
            big = Image.fromarray(img).resize((500, 375), Image.Resampling.BICUBIC)
            paths.append(folder / f"{k}.jpg")
            big.save(paths[-1], quality=90)
        for workers in (1, 2):
            t = best(lambda w=workers: read_many_rgb(paths, 84, "lanczos", w), args.repeat)
            print(f"decode + LANCZOS 500x375 -> 84x84 JPEG, {workers} thread(s): "
                  f"{args.jpegs / t:.0f} images/s")

    images = torch.from_numpy(rng.integers(0, 256, (64 * 50, 84, 84, 3), dtype=np.uint8))
    labels = torch.arange(64).repeat_interleave(50)
    arrays = FewShotArrays(images, labels, [str(c) for c in range(64)], "miniimagenet", "train",
                           "synthetic")
    for b, shots in ((4, 1), (4, 5), (32, 5)):
        ds = ImageEpisodes(arrays, ways=5, shots=shots, queries=15, meta_batch=b)
        t = best(lambda ds=ds: ds.batch(7), args.repeat)
        print(f"mini-imagenet episode batch 5-way {shots}-shot 15-query x {b} tasks "
              f"(84x84x3 uint8 -> float32): {t * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
