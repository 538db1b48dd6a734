"""The one image decoder used by train, evaluate, predict, check and serve.

Every image enters the library through `decode_image` (or `open_image`, which returns just the
picture). Its guards, in the order they run:

1. Paths: only regular files are read. A broken link, a link loop, a folder or a FIFO named
   `x.jpg` is refused with a reason instead of hanging or crashing. A 0-byte file is refused.
2. Only an allowlist of formats is identified (`ALLOWED_FORMATS`); the others, EPS (which runs
   Ghostscript) among them, are never handed to a plugin.
3. Decompression bombs: an image with more than `MAX_IMAGE_PIXELS` pixels is refused from its
   header, before any pixel memory is allocated. Pillow's bomb *warning* is turned into an error,
   and the limit is never `None`; the header check holds even if someone sets it to None.
4. Animated or multi-page images decode their first frame; `DecodedImage.animated` says so, so
   callers can count them.
5. EXIF orientation is applied (a corrupt EXIF block leaves the pixels as stored).
6. Every mode becomes 8-bit RGB correctly (`to_rgb`): 1, L, P, CMYK, YCbCr... convert; alpha (RGBA,
   LA, PA, P or L or RGB with a transparent colour) is composited onto the fixed `BACKGROUND`;
   16-bit and 32-bit integer images are rescaled to 0..255, never clipped.

Truncated, corrupt, empty and non-image files raise `UnreadableImageError` with the path and a
short reason. Exceptions outside `KNOWN_DECODE_ERRORS` (MemoryError, or a bug) are not caught:
they fail loudly rather than hide a problem.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from imgclf.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Pillow formats we open; anything else (EPS runs Ghostscript, for instance) is refused.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"})
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
# The most pixels one image may have: 2x Pillow's default warning limit, which is where Pillow
# itself refuses by default. ~179 MP is a 16k x 11k scan; 537 MB as 8-bit RGB.
MAX_IMAGE_PIXELS = 178_956_970
# Pillow warns above its limit and refuses above twice it. We set its limit to ours and turn the
# warning into an error while opening, so the effective limit is ours. Never None: None would
# disable Pillow's guard (ours, from the header, holds regardless).
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# `warnings.catch_warnings` swaps process-wide state, so threads take turns to open (parse the
# header: microseconds). Decoding the pixels, the expensive part, runs outside the lock.
_OPEN_LOCK = threading.Lock()
Image.init()  # register every plugin now, so the allowlist below can be checked against them
_OPEN_FORMATS = sorted(f for f in ALLOWED_FORMATS if f in Image.OPEN)
# What Pillow's plugins raise for truncated or corrupt data. Anything else propagates.
KNOWN_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Leading bytes of the allowed formats: a file that starts like one but fails to open is damaged.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "RIFF/WebP"),
)
_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_UINT16_TO_UINT8 = ((np.arange(65536, dtype=np.float64) * 255.0 / 65535.0) + 0.5).astype(np.uint8)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

ImageSource = str | Path | bytes | BinaryIO


class UnreadableImageError(DataError):
    """An image file could not be decoded. `reason` is a short, stable description."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(
            f"cannot read image {name!r}: {reason}",
            fix="replace or remove the file; `imgclf check DATA` lists every such file",
        )


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image and what the decoder learned about the file.

    Attributes:
        image: the picture as 8-bit RGB, EXIF orientation applied (first frame if animated).
        format: the Pillow format name, e.g. "JPEG".
        mode: the file's own pixel mode before conversion, e.g. "I;16", "CMYK", "P".
        size: (width, height) in the file's header, before EXIF rotation and draft scaling.
        animated: True when the file holds more than one frame (GIF, WebP, TIFF pages, MPO).
        exif_rotated: True when an EXIF orientation other than "as stored" was applied.
    """

    image: Image.Image
    format: str
    mode: str
    size: tuple[int, int]
    animated: bool = False
    exif_rotated: bool = False


def is_image_file(path: Path) -> bool:
    """True for visible files with an image extension (hidden and AppleDouble files are skipped)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def open_image(source: ImageSource, *, draft_size: int | None = None) -> Image.Image:
    """Decode an image into an RGB `PIL.Image`.

    Args:
        source: a path, raw bytes or a binary file object.
        draft_size: the side the image will be shrunk to; lets JPEG decode at a reduced scale,
            which makes large photos several times cheaper to read.

    Raises:
        UnreadableImageError: the data is not an allowed, intact image.

    Example:
        >>> img = open_image("cat.jpg")  # doctest: +SKIP
        >>> img.mode  # doctest: +SKIP
        'RGB'
    """
    return decode_image(source, draft_size=draft_size).image


def decode_image(
    source: ImageSource, *, draft_size: int | None = None, name: str | None = None
) -> DecodedImage:
    """Decode an image and report its format, original mode and size, animation and EXIF rotation.

    Args:
        source: a path, raw bytes or a binary file object.
        draft_size: the side the image will be shrunk to (JPEG then decodes at a reduced scale;
            the whole file is still read, so truncation is still detected).
        name: how to name the source in errors; defaults to the path, or "<bytes>".

    Raises:
        UnreadableImageError: the data is not an allowed, intact image.

    Example:
        >>> decoded = decode_image("scan.png")  # doctest: +SKIP
        >>> decoded.mode, decoded.image.mode  # doctest: +SKIP
        ('I;16', 'RGB')
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "<bytes>"
    if isinstance(source, bytes):
        if not source:
            raise UnreadableImageError(name, "empty file (0 bytes)")
        return _decode(io.BytesIO(source), name, draft_size)
    if isinstance(source, (str, Path)):
        _check_regular_file(Path(source), name)
        try:
            handle = open(source, "rb")  # noqa: SIM115 - closed below, after decoding
        except OSError as exc:
            raise UnreadableImageError(name, f"cannot open file: {exc.strerror or exc}") from None
        with handle:
            return _decode(handle, name, draft_size)
    return _decode(source, name, draft_size)


def _check_regular_file(path: Path, name: str) -> None:
    """Refuse what is not a non-empty regular file, without ever opening it (a FIFO would block)."""
    try:
        info = os.stat(path)  # follows symbolic links
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnreadableImageError(name, "symbolic link loop") from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise UnreadableImageError(name, "broken symbolic link (its target does not exist)") from None
        raise UnreadableImageError(name, f"cannot open file: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UnreadableImageError(name, "not a regular file (a folder, FIFO or device)")
    if info.st_size == 0:
        raise UnreadableImageError(name, "empty file (0 bytes)")


def _decode(handle: BinaryIO, name: str, draft_size: int | None) -> DecodedImage:
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(handle, formats=_OPEN_FORMATS)
        with img:
            return _decode_opened(img, name, draft_size)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1))} pixels" if found else str(exc)
        raise UnreadableImageError(name, _bomb_reason(pixels)) from None
    except Image.UnidentifiedImageError:
        raise UnreadableImageError(name, _not_an_image_reason(handle)) from None
    except KNOWN_DECODE_ERRORS as exc:
        # Truncated or corrupt data surfaces as one of these from Pillow's plugins.
        text = str(exc) or type(exc).__name__
        if "truncated" in text:
            raise UnreadableImageError(name, f"truncated image data: {text}") from None
        raise UnreadableImageError(name, f"corrupt image data: {text}") from None


def _decode_opened(img: Image.Image, name: str, draft_size: int | None) -> DecodedImage:
    width, height = img.size
    if width <= 0 or height <= 0:
        raise UnreadableImageError(name, f"image has no pixels ({width} x {height})")
    if width * height > MAX_IMAGE_PIXELS:
        # Checked here too so the guard holds whatever warning filters or Pillow limit are active.
        raise UnreadableImageError(name, _bomb_reason(f"{width} x {height} = {width * height} pixels"))
    fmt, mode = str(img.format), img.mode
    if draft_size and fmt in ("JPEG", "MPO"):
        img.draft("RGB", (draft_size, draft_size))
    img.load()  # the first frame: a freshly opened image is positioned on it
    orientation = _orientation(img)
    rgb = to_rgb(img)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    if rgb is img:
        rgb = img.copy()  # detach from the file, which is closed when we return
    return DecodedImage(
        image=rgb,
        format=fmt,
        mode=mode,
        size=(width, height),
        animated=_is_animated(img),
        exif_rotated=orientation in _TRANSPOSE,
    )


def _bomb_reason(pixels: str) -> str:
    return f"too many pixels (decompression-bomb guard): {pixels}, limit {MAX_IMAGE_PIXELS}"


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = as stored). A corrupt EXIF block counts as 1: the pixels are fine."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
    except KNOWN_DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) else 1


def _is_animated(img: Image.Image) -> bool:
    """True for files with more than one frame; a damaged later frame still counts as animated."""
    try:
        return bool(getattr(img, "is_animated", False))
    except KNOWN_DECODE_ERRORS:
        return True  # there is data after the first frame, but it does not parse


def _not_an_image_reason(handle: BinaryIO) -> str:
    """Say what a file that is not an allowed image seems to be, from its first bytes."""
    try:
        handle.seek(0)
        head = handle.read(512)
    except (OSError, ValueError):
        head = b""
    if head[4:8] == b"ftyp":
        return "not an image in an allowed format (HEIC/AVIF/MP4 container)"
    if head.startswith(b"%PDF"):
        return "not an image: a PDF document"
    if head.lstrip().startswith((b"<svg", b"<?xml", b"<!DOCTYPE", b"<html")):
        return "not an image: SVG/XML/HTML text"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "not an image: a text file"
    for magic, fmt in _SIGNATURES:
        if head.startswith(magic):
            return f"corrupt or truncated {fmt} header"
    return f"not an image in an allowed format ({', '.join(_OPEN_FORMATS)})"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without losing or saturating information.

    Transparent pixels (an alpha channel, or a colour marked transparent) are composited onto
    `BACKGROUND`; integer images wider than 8 bits are rescaled linearly to 0..255.

    Example:
        >>> to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0))
        (255, 255, 255)
    """
    transparency = img.info.get("transparency")
    if img.mode == "RGB" and transparency is None:
        return img
    if img.mode in _INTEGER_MODES:
        array = np.asarray(img)
        gray = Image.fromarray(_rescale_integers(array, img.mode), mode="L")
        if isinstance(transparency, int):
            alpha = np.where(array == transparency, 0, 255).astype(np.uint8)
            return _composite(Image.merge("LA", (gray, Image.fromarray(alpha, mode="L"))))
        return gray.convert("RGB")
    if img.mode == "F":
        array = np.nan_to_num(np.asarray(img, dtype=np.float64))
        low, high = float(array.min(initial=0)), float(array.max(initial=1))
        array = (array - low) / max(high - low, 1e-12) * 255.0
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in _ALPHA_MODES:
        return _composite(img)
    if transparency is not None and img.mode in ("P", "L", "RGB", "1"):
        # Pillow turns the transparent colour (or palette entries) into alpha on this conversion.
        return _composite(img.convert("RGBA"))
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _rescale_integers(array: np.ndarray, mode: str) -> np.ndarray:
    """Map 16/32-bit integer pixels to uint8 linearly: 0..65535 (or 0..255, or min..max) -> 0..255."""
    if mode.startswith("I;16"):
        # A 64 K-entry lookup table: no float copy of a possibly 100-megapixel image.
        return _UINT16_TO_UINT8[array.astype(np.uint16, copy=False)]
    low, high = int(array.min(initial=0)), int(array.max(initial=0))
    if low >= 0 and high <= 65535:
        top, low = (65535.0 if high > 255 else 255.0), 0
    else:  # 32-bit data beyond 16 bits, or negative values: stretch what is there
        top = float(high - low) or 1.0
    scaled = (array.astype(np.float32) - np.float32(low)) * np.float32(255.0 / top) + np.float32(0.5)
    return scaled.astype(np.uint8)


def _composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
