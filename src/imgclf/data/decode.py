"""The one image decoder used by train, evaluate, predict and serve.

Every image enters the library through `open_image`. It applies EXIF orientation, converts every
Pillow mode to RGB correctly (alpha is composited onto a fixed white background, 16-bit images
are rescaled rather than clipped) and turns the decoder's many failure modes into one
`UnreadableImageError` that names the file and the reason.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from imgclf.errors import DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Pillow formats we open; anything else (EPS runs Ghostscript, for instance) is refused.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"})
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
MAX_IMAGE_PIXELS = 178_956_970  # Pillow's default bomb limit (~179 MP); never None
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
Image.init()  # register every plugin now, so the allowlist below can be checked against them
_OPEN_FORMATS = sorted(f for f in ALLOWED_FORMATS if f in Image.OPEN)

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
        >>> img.mode
        'RGB'
    """
    name = str(source) if isinstance(source, (str, Path)) else "<bytes>"
    if isinstance(source, bytes):
        if not source:
            raise UnreadableImageError(name, "empty data (0 bytes)")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        try:
            if Path(source).stat().st_size == 0:
                raise UnreadableImageError(name, "empty file (0 bytes)")
        except OSError as exc:
            raise UnreadableImageError(name, f"cannot open file: {exc.strerror or exc}") from None
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x the pixel limit; we treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=_OPEN_FORMATS) as img:
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                img.seek(0)  # animated images: the first frame
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return to_rgb(img)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(name, f"too many pixels (decompression bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImageError(name, "not an image in an allowed format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Truncated or corrupt data surfaces as one of these from Pillow's plugins.
        raise UnreadableImageError(name, f"corrupt or truncated image: {exc}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without losing or saturating information."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(img, dtype=np.float64)
        # 16-bit data spans 0..65535 (and 'I' may hold the same range): rescale, never clip.
        top = 65535.0 if array.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
        array = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if img.mode == "F":
        array = np.asarray(img, dtype=np.float64)
        low, high = float(array.min(initial=0)), float(array.max(initial=1))
        array = (array - low) / max(high - low, 1e-12) * 255.0
        return Image.fromarray(array.astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV
