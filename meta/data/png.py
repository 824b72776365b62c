"""A minimal PNG decoder in numpy + zlib (no Pillow needed).

Enough for the Omniglot images (105x105, 1-bit grayscale, non-interlaced) and for the
common non-interlaced cases: grayscale at bit depth 1/2/4/8/16, grayscale + alpha, RGB and
RGBA at 8/16 bits, and palette images at 1/2/4/8 bits. All five PNG row filters (None, Sub,
Up, Average, Paeth) are undone. Chunk CRCs are checked. Interlaced (Adam7) images are
delegated to Pillow when it is importable and rejected otherwise.

Samples are returned as stored, not rescaled: a 1-bit grayscale image gives a ``uint8`` array
of 0 (black) and 1 (white).
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np

__all__ = ["decode_png", "read_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Decode the PNG file at ``path``; see :func:`decode_png`."""
    with open(path, "rb") as f:
        return decode_png(f.read())


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes into an array of raw sample values.

    Returns ``[height, width]`` for grayscale, ``[height, width, channels]`` otherwise
    (palette images are expanded to RGB through ``PLTE``; ``tRNS`` is ignored). The dtype is
    ``uint8`` for bit depths up to 8 and ``uint16`` for 16. Raises ``ValueError`` on a
    malformed or unsupported file.
    """
    if data[:8] != _SIGNATURE:
        raise ValueError("not a PNG file (bad signature)")
    header, palette, idat = _read_chunks(data)
    width, height, depth, ctype, compression, filter_method, interlace = header
    if ctype not in _CHANNELS or depth not in _DEPTHS[ctype]:
        raise ValueError(f"unsupported PNG colour type {ctype} with bit depth {depth}")
    if compression != 0 or filter_method != 0:
        raise ValueError("unsupported PNG compression or filter method")
    if interlace != 0:
        return _pillow_fallback(data, "interlaced PNG")
    channels = _CHANNELS[ctype]
    bits_per_pixel = depth * channels
    stride = (width * bits_per_pixel + 7) // 8
    bpp = max(1, bits_per_pixel // 8)  # filter distance in bytes
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as err:
        raise ValueError(f"corrupt PNG image data: {err}") from None
    rows = _unfilter(raw, height, stride, bpp)
    pixels = _unpack(rows, width, depth, channels)
    if ctype == 3:
        if palette is None:
            raise ValueError("palette PNG without a PLTE chunk")
        if pixels.size and int(pixels.max()) >= len(palette):
            raise ValueError("PNG palette index out of range")
        return palette[pixels]
    return pixels


def _read_chunks(data: bytes) -> tuple[tuple[int, ...], np.ndarray | None, list[bytes]]:
    pos, header, palette, idat, ended = 8, None, None, [], False
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            raise ValueError(f"truncated PNG chunk {kind!r}")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise ValueError(f"corrupt PNG chunk {kind!r} (bad CRC)")
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"PLTE":
            palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            ended = True
            break
    if header is None or not idat:
        raise ValueError("PNG without IHDR or IDAT chunk" + ("" if ended else " (truncated file)"))
    return header, palette, idat


def _unfilter(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo the per-row filters; returns ``[height, stride]`` uint8 bytes."""
    buf = np.frombuffer(raw, np.uint8)
    if buf.size < height * (stride + 1):
        raise ValueError("truncated PNG image data")
    rows = buf[: height * (stride + 1)].reshape(height, stride + 1)
    kinds, out = rows[:, 0], rows[:, 1:].copy()
    if not kinds.any():  # all rows unfiltered: the common case for Omniglot
        return out
    prev = np.zeros(stride, np.uint8)
    for r in range(height):
        kind, line = int(kinds[r]), out[r]
        if kind == 1:  # Sub: running sum along each byte lane, modulo 256
            line[:] = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).ravel()
        elif kind == 2:  # Up
            line += prev
        elif kind in (3, 4):  # Average, Paeth: inherently sequential
            line[:] = _sequential(line.tolist(), prev.tolist(), bpp, paeth=kind == 4)
        elif kind != 0:
            raise ValueError(f"bad PNG filter type {kind}")
        prev = line
    return out


def _sequential(cur: list[int], up: list[int], bpp: int, paeth: bool) -> list[int]:
    for x in range(len(cur)):
        a = cur[x - bpp] if x >= bpp else 0
        b = up[x]
        if paeth:
            c = up[x - bpp] if x >= bpp else 0
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
        else:
            pred = (a + b) >> 1
        cur[x] = (cur[x] + pred) & 0xFF
    return cur


def _unpack(rows: np.ndarray, width: int, depth: int, channels: int) -> np.ndarray:
    height = rows.shape[0]
    if depth == 8:
        pixels = rows[:, : width * channels]
    elif depth == 16:
        pixels = rows[:, : width * channels * 2].copy().view(">u2").astype(np.uint16)
    else:  # 1, 2 or 4 bits, single channel: MSB first within each byte
        bits = np.unpackbits(rows, axis=1).reshape(height, -1, depth)
        weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
        pixels = (bits * weights).sum(axis=-1, dtype=np.uint8)[:, :width]
    if channels > 1:
        pixels = pixels.reshape(height, width, channels)
    return np.ascontiguousarray(pixels)


def _pillow_fallback(data: bytes, what: str) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ValueError(f"{what} is not supported without Pillow") from None
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    return array.astype(np.uint8) if array.dtype == bool else array
