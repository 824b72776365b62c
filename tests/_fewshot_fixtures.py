"""Writers of tiny few-shot datasets in their REAL published on-disk formats (test helpers).

``write_fixture(dataset, layout, root, ...)`` writes all three splits with the exact file names,
keys, dtypes and label conventions of the published files (see meta/data/formats.py and
shared/reference/SCALE.md section 2) and returns what it wrote, for exact comparisons:
``{split: (images uint8 [N, H, W, 3], class of each image (0..C-1 in sorted-name order),
class names)}``.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

LAYOUTS = [("miniimagenet", "cache_pkl"), ("miniimagenet", "metaoptnet_pkl"),
           ("miniimagenet", "csv"), ("tieredimagenet", "metaoptnet_npz"),
           ("cifarfs", "metaoptnet_pkl"), ("fc100", "metaoptnet_pkl")]
SIZE = {"miniimagenet": 84, "tieredimagenet": 84, "cifarfs": 32, "fc100": 32}
# MetaOptNet/Gidaris pickles keep global labels: val starts after train, test after val.
OFFSET = {"train": 0, "val": 64, "test": 80}


def wnid(split: str, c: int) -> str:
    return f"n0{ {'train': 1, 'val': 2, 'test': 3}[split] }{c:07d}"


def images_for(split: str, classes: int, per_class: int, size: int, seed: int) -> np.ndarray:
    """``uint8 [classes * per_class, size, size, 3]``, class-major; each image a smooth colour
    field (JPEG-friendly) with a class- and image-dependent colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((classes * per_class, size, size, 3), np.uint8)
    for k in range(classes * per_class):
        base = rng.uniform(40, 215, size=3)
        tilt = rng.uniform(-30, 30, size=(2, 3))
        out[k] = np.clip(base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1], 0, 255)
    return out


def write_fixture(dataset: str, layout: str, root: Path, classes=(4, 3, 3), per_class=6,
                  seed=0, shuffle=True, protocol=2, jpeg_size=(97, 90)) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    size = SIZE[dataset]
    written = {}
    for s, (split, n_cls) in enumerate(zip(("train", "val", "test"), classes)):
        images = images_for(split, n_cls, per_class, size, seed + s)
        cls = np.repeat(np.arange(n_cls), per_class)
        order = np.random.default_rng(seed + 10 + s).permutation(len(cls)) if shuffle else \
            np.arange(len(cls))
        images, cls = images[order], cls[order]  # files need not be grouped by class
        names = [wnid(split, c) for c in range(n_cls)]
        if layout == "cache_pkl":  # learn2learn / Ren: {'image_data', 'class_dict'}
            class_dict = {names[c]: np.flatnonzero(cls == c).tolist() for c in range(n_cls)}
            with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
                pickle.dump({"image_data": images, "class_dict": class_dict}, f,
                            protocol=protocol)
        elif layout == "metaoptnet_pkl":  # Gidaris / MetaOptNet: {'data', 'labels', ...}
            labels = (cls + OFFSET[split]).tolist()
            pack = {"data": images, "labels": labels}
            if dataset == "miniimagenet":
                pack["catname2label"] = {names[c]: c + OFFSET[split] for c in range(n_cls)}
                name = {"train": "train_phase_train"}.get(split, split)
                path = root / f"miniImageNet_category_split_{name}.pickle"
            else:
                names = [str(c + OFFSET[split]) for c in range(n_cls)]
                prefix = "CIFAR_FS" if dataset == "cifarfs" else "FC100"
                path = root / f"{prefix}_{split}.pickle"
            with open(path, "wb") as f:
                pickle.dump(pack, f, protocol=protocol)
        elif layout == "metaoptnet_npz":  # {split}_images.npz + {split}_labels.pkl
            np.savez(root / f"{split}_images.npz", images=images)
            with open(root / f"{split}_labels.pkl", "wb") as f:
                pickle.dump({"labels": (cls + 7).tolist()}, f, protocol=protocol)
            names = [str(c + 7) for c in range(n_cls)]
        elif layout == "csv":  # Ravi & Larochelle: {split}.csv + images/*.jpg (any size)
            folder = root / "images"
            folder.mkdir(exist_ok=True)
            rows = []
            for k, c in enumerate(cls):
                file = f"{names[c]}{k + 1:08d}.jpg"
                img = Image.fromarray(images[k]).resize(jpeg_size, Image.Resampling.BICUBIC)
                img.save(folder / file, format="JPEG", quality=95)
                rows.append((file, names[c]))
            with open(root / f"{split}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["filename", "label"])
                w.writerows(sorted(rows, key=lambda r: (r[1], r[0])))  # as the Ravi CSVs
            order_rows = sorted(range(len(rows)), key=lambda k: (rows[k][1], rows[k][0]))
            images, cls = images[order_rows], cls[order_rows]
        else:
            raise ValueError(layout)
        written[split] = (images, cls, names)
    return written
