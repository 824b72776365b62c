"""Image decoding and resizing, all through Pillow (``PIL``).

Arrays are ``uint8`` ``[H, W]`` (grayscale) or ``[H, W, 3]`` (RGB), NumPy, rows first.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["open_image", "read_rgb", "read_many_rgb", "resize_rgb", "RESAMPLE"]

#: Resampling filters by name (Pillow's ``Image.Resampling``).
RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "box": Image.Resampling.BOX,
    "nearest": Image.Resampling.NEAREST,
}


def open_image(source: bytes | str | os.PathLike, name: str | None = None) -> Image.Image:
    """Decode an image file (path) or its bytes with Pillow, fully (not lazily).

    Raises ``ValueError`` naming ``name`` (or the path) when Pillow cannot read it.
    """
    label = name or (os.fspath(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            return img.copy() if img.mode != "P" else img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"cannot decode image {label}: {err}") from None


def read_rgb(path: str | os.PathLike, size: int | None, resample: str = "lanczos") -> np.ndarray:
    """``uint8 [size, size, 3]``: the image at ``path`` in RGB, resized to ``size x size`` with
    ``resample`` when it has another size (the aspect ratio is not kept, as in the Mini-ImageNet
    preprocessing of Finn et al.); ``size=None`` keeps the file's size."""
    img = open_image(path).convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), resample=RESAMPLE[resample])
    return np.asarray(img, dtype=np.uint8)


def read_many_rgb(paths: list[Path], size: int | None, resample: str = "lanczos",
                  workers: int | None = None) -> np.ndarray:
    """``uint8 [len(paths), size, size, 3]`` via :func:`read_rgb` on a thread pool (Pillow
    releases the GIL while it decodes and resizes)."""
    if not paths:
        raise ValueError("no images to read")
    workers = workers or min(8, os.cpu_count() or 1)
    first = read_rgb(paths[0], size, resample)
    out = np.empty((len(paths), *first.shape), np.uint8)
    out[0] = first

    def one(k: int) -> None:
        image = read_rgb(paths[k], size, resample)
        if image.shape != first.shape:
            raise ValueError(f"{paths[k]} is {image.shape[1]}x{image.shape[0]}, but "
                             f"{paths[0]} is {first.shape[1]}x{first.shape[0]}: pass a size "
                             "to resize them all")
        out[k] = image

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(1, len(paths))))
    return out


def resize_rgb(images: np.ndarray, size: int, resample: str = "lanczos") -> np.ndarray:
    """Resize ``uint8 [N, H, W, 3]`` to ``[N, size, size, 3]`` with Pillow (``resample``)."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
    for k, image in enumerate(images):
        img = Image.fromarray(image)
        out[k] = np.asarray(img.resize((size, size), resample=RESAMPLE[resample]))
    return out
