"""Scanning one file: decode it fully with the training decoder, hash its bytes and its picture.

`Entry` (a file to scan) and `FileResult` (what the scan learned) are shared by `check` (which
scans whole datasets and reports) and `scan_cache` (which stores results between runs). Part of
the data layer, below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from imgclf.data.decode import UnreadableImageError, decode_image
from imgclf.files import file_sha256

HASH_SIDE = 64  # px: JPEGs are decoded at reduced scale down to this for hashing (draft mode)


@dataclass(frozen=True)
class Entry:
    """One file to scan: its path, split (train/val/test, or "all" without splits) and class."""

    path: str
    split: str
    label: str


@dataclass
class FileResult:
    """What the scan learned about one file. `reason` is None when the file is usable."""

    entry: Entry
    reason: str | None = None
    size: tuple[int, int] | None = None  # (width, height) from the header
    format: str | None = None
    mode: str | None = None
    animated: bool = False
    exif_rotated: bool = False
    sha256: str | None = None
    dhash: int | None = None
    thumb: np.ndarray | None = field(default=None, repr=False)  # 4 x 4 x 3 uint8 colour thumbnail


# --------------------------------------------------------------------------------------------
# Scanning one file


def perceptual_hash(img: Image.Image) -> tuple[int, np.ndarray]:
    """A 64-bit difference hash (dHash) and a 4 x 4 x 3 colour thumbnail of an RGB image.

    dHash: shrink to 9 x 8 grey pixels and keep one bit per horizontal neighbour pair (is the
    right one brighter?). Re-encoding, resizing and small edits flip few bits; different pictures
    differ in about half. It ignores colour and says nothing about flat images (all bits 0), so
    near duplicates must also have similar colour thumbnails.

    Example:
        >>> bits, thumb = perceptual_hash(Image.new("RGB", (32, 32), (255, 0, 0)))
        >>> bits, thumb.shape
        (0, (4, 4, 3))
    """
    small = img.resize((36, 32), Image.Resampling.BOX, reducing_gap=2.0)
    grey = np.asarray(small.convert("L").resize((9, 8), Image.Resampling.BOX), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    value = int(np.packbits(bits).view(">u8")[0])
    thumb = np.asarray(small.resize((4, 4), Image.Resampling.BOX), dtype=np.uint8)
    return value, thumb


def scan_file(entry: Entry) -> FileResult:
    """Decode one file fully and hash it. Only `UnreadableImageError` is turned into a reason."""
    result = FileResult(entry)
    try:
        decoded = decode_image(entry.path, draft_size=HASH_SIDE)
    except UnreadableImageError as exc:
        result.reason = exc.reason
        return result
    result.size, result.format, result.mode = decoded.size, decoded.format, decoded.mode
    result.animated, result.exif_rotated = decoded.animated, decoded.exif_rotated
    result.dhash, result.thumb = perceptual_hash(decoded.image)
    try:
        result.sha256 = file_sha256(entry.path).hex()
    except OSError as exc:  # removed or unreadable between decoding and hashing
        result.reason = f"cannot read file: {exc.strerror or exc}"
    return result
