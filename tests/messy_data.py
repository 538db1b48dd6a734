"""A generator of messy image folders: every kind of bad or unusual file that real data holds.

`write_messy_folder(root)` writes a split-folder dataset (train/ and test/, class folders cat, dog,
bird, plus an empty class folder) of learnable good images, seeded with the kinds in `KINDS`.
It returns one `Kind` per seeded file: where it is, and what the decoder and `imgclf check`
must make of it:

- "unusable": decoding raises UnreadableImageError whose reason contains `reason`;
- "usable": it decodes; `verify(decoded)` checks the conversion was right;
- "ignored": discovery leaves it out (hidden files, links to folders), with that reason.

Everything is small: the pixel bombs are headers of a few dozen bytes, the "huge" image is a
4000 x 3000 solid JPEG of about 190 KB.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import CLASS_COLOURS, make_image
from PIL import Image

CLASSES = ("bird", "cat", "dog")
EMPTY_CLASS = "empty"


@dataclass
class Kind:
    name: str
    path: Path
    outcome: str  # "unusable", "usable" or "ignored"
    reason: str = ""  # a fragment of the reason (unusable, ignored)
    verify: Callable[[object], None] | None = None  # checks a DecodedImage (usable)
    split: str = "train"
    label: str = ""


# --------------------------------------------------------------------------------------------
# Byte-level builders


def png_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def jpeg_bytes(img: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def smooth_picture(size: int = 96) -> Image.Image:
    """A picture with structure at every scale (gradients and a disc): stable under re-encoding."""
    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.35) ** 2 + (y - 0.6) ** 2) < 0.06
    red = 255 * x
    green = 255 * (1 - y) * (1 - disc)
    blue = 128 + 127 * np.sin(6 * x) * disc
    return Image.fromarray(np.stack([red, green, blue], axis=-1).clip(0, 255).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Checks for the usable kinds (each takes a DecodedImage)


def _near(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


def _verify_exif(d) -> None:  # type: ignore[no-untyped-def]
    # Stored 60 wide x 30 high, red on the left, blue on the right; orientation 6 means "rotate
    # 90 degrees clockwise to display": 30 wide x 60 high, red on top, blue at the bottom.
    assert d.size == (60, 30) and d.image.size == (30, 60) and d.exif_rotated
    assert _near(d.image.getpixel((15, 5)), (255, 0, 0), 40)
    assert _near(d.image.getpixel((15, 55)), (0, 0, 255), 40)


def _verify_cmyk(d) -> None:  # type: ignore[no-untyped-def]
    assert d.mode == "CMYK" and d.image.mode == "RGB"
    assert _near(d.image.getpixel((4, 4)), (0, 255, 255), 20)  # cyan ink is cyan, not inverted


def _verify_16bit(d) -> None:  # type: ignore[no-untyped-def]
    # Columns hold 0, 16384, 32768, 49152, 65535: rescaled, not clipped, they spread over 0..255.
    assert d.mode.startswith("I;16")
    row = [d.image.getpixel((x, 0))[0] for x in range(5)]
    assert row == [0, 64, 128, 191, 255], row


def _white_where_transparent(d) -> None:  # type: ignore[no-untyped-def]
    assert d.image.getpixel((0, 0)) == (255, 255, 255)


def _verify_palette(d) -> None:  # type: ignore[no-untyped-def]
    assert d.mode == "P"
    assert d.image.getpixel((0, 0)) == (255, 255, 255)  # transparent entry -> background
    assert d.image.getpixel((7, 7)) == (255, 0, 0)  # opaque entry keeps its colour


def _verify_rgba(d) -> None:  # type: ignore[no-untyped-def]
    assert d.mode == "RGBA"
    assert d.image.getpixel((0, 0)) == (255, 255, 255)  # transparent black is white, not black
    assert d.image.getpixel((15, 15)) == (0, 128, 0)  # opaque green stays green


def _verify_la(d) -> None:  # type: ignore[no-untyped-def]
    assert d.mode == "LA"
    assert d.image.getpixel((0, 0)) == (255, 255, 255)
    assert d.image.getpixel((15, 15)) == (40, 40, 40)


def _verify_one_bit(d) -> None:  # type: ignore[no-untyped-def]
    assert d.mode == "1"
    assert d.image.getpixel((0, 0)) == (0, 0, 0) and d.image.getpixel((15, 15)) == (255, 255, 255)


def _verify_animated(d) -> None:  # type: ignore[no-untyped-def]
    assert d.animated and d.format == "GIF"
    assert _near(d.image.getpixel((4, 4)), (255, 0, 0), 8)  # the first frame (red)


def _verify_huge(d) -> None:  # type: ignore[no-untyped-def]
    assert d.size == (4000, 3000)
    assert _near(d.image.getpixel((d.image.width // 2, d.image.height // 2)), (0, 128, 0), 6)


def _verify_unicode(d) -> None:  # type: ignore[no-untyped-def]
    assert d.format == "PNG" and d.image.size == (24, 24)


# --------------------------------------------------------------------------------------------
# The folder


def write_messy_folder(root: Path, *, per_class: int = 80, test_per_class: int = 8, seed: int = 0) -> list[Kind]:
    """Write the dataset under `root` and return the seeded kinds (see the module docstring).

    With the defaults, 13 of about 300 image files are unusable (4.3%, under the 5% default).
    """
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_image(CLASS_COLOURS[c], rng, 24).save(folder / f"{i:03d}.png")
    (root / "train" / EMPTY_CLASS).mkdir()
    kinds: list[Kind] = []

    def add(name: str, rel: str, data: bytes | None, outcome: str, reason: str = "",
            verify: Callable[[object], None] | None = None) -> Path:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is not None:
            path.write_bytes(data)
        parts = Path(rel).parts
        kinds.append(Kind(name, path, outcome, reason, verify, split=parts[0], label=parts[1]))
        return path

    good_jpeg = jpeg_bytes(make_image(CLASS_COLOURS[0], rng, 64), quality=90)
    good_png = png_bytes(make_image(CLASS_COLOURS[1], rng, 64))

    # --- unusable ---------------------------------------------------------------------------
    add("truncated jpeg", "train/bird/truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "unusable", "truncated")
    add("truncated jpeg in test", "test/dog/truncated.jpg", good_jpeg[: len(good_jpeg) * 2 // 3], "unusable",
        "truncated")
    add("truncated png", "train/cat/truncated.png", good_png[: len(good_png) // 2], "unusable", "truncated")
    corrupt = bytearray(good_png)
    idat = corrupt.index(b"IDAT")
    corrupt[idat + 20 : idat + 28] = b"\x00" * 8  # IDAT bytes damaged: its CRC no longer matches
    add("corrupt png (bad CRC)", "train/dog/bad_crc.png", bytes(corrupt), "unusable", "corrupt")
    add("zero-byte file", "train/cat/zero.jpg", b"", "unusable", "empty file")
    add("text named .jpg", "train/dog/notes.jpg", b"these are my notes, not a photo\n" * 4, "unusable",
        "not an image: a text file")
    add("pixel bomb (10 gigapixels)", "train/bird/bomb.png", png_header_claiming(100_000, 100_000), "unusable",
        "too many pixels")
    # 195 MP: inside Pillow's *warning* band (1x-2x its limit), which we treat as an error too.
    add("pixel bomb (warning band)", "train/cat/bomb_warning.png", png_header_claiming(15_000, 13_000),
        "unusable", "too many pixels")
    pcx = io.BytesIO()
    make_image(CLASS_COLOURS[2], rng, 16).save(pcx, "PCX")
    add("format outside the allowlist (PCX named .png)", "train/bird/pcx.png", pcx.getvalue(), "unusable",
        "not an image in an allowed format")
    broken = add("broken symbolic link", "train/cat/broken_link.jpg", None, "unusable", "broken symbolic link")
    os.symlink(root / "train" / "cat" / "does-not-exist.jpg", broken)
    loop_a = add("symbolic link loop", "train/dog/loop_a.jpg", None, "unusable", "symbolic link loop")
    os.symlink(root / "train" / "dog" / "loop_b.jpg", loop_a)
    os.symlink(loop_a, root / "train" / "dog" / "loop_b.jpg")
    kinds.append(Kind("symbolic link loop (other end)", root / "train" / "dog" / "loop_b.jpg", "unusable",
                      "symbolic link loop", split="train", label="dog"))
    fifo = add("FIFO named .jpg", "train/bird/pipe.jpg", None, "unusable", "not a regular file")
    os.mkfifo(fifo)

    # --- usable but unusual -------------------------------------------------------------------
    exif_img = Image.new("RGB", (60, 30), (0, 0, 255))
    exif_img.paste((255, 0, 0), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    add("EXIF-rotated", "train/cat/exif_rotated.jpg", jpeg_bytes(exif_img, exif=exif.tobytes(), quality=95),
        "usable", verify=_verify_exif)
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # full cyan ink, nothing else: RGB (0, 255, 255)
    add("CMYK JPEG", "train/dog/cmyk.jpg", jpeg_bytes(cmyk, quality=95), "usable", verify=_verify_cmyk)
    levels = np.tile(np.array([0, 16384, 32768, 49152, 65535], dtype=np.uint16), (4, 1))
    add("16-bit greyscale PNG", "train/bird/sixteen_bit.png", png_bytes(Image.fromarray(levels)), "usable",
        verify=_verify_16bit)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (4, 4, 8, 8))
    add("palette with transparency", "train/cat/palette_transparent.png", png_bytes(palette, transparency=0),
        "usable", verify=_verify_palette)
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (8, 8, 16, 16))
    add("RGBA", "train/dog/rgba.png", png_bytes(rgba), "usable", verify=_verify_rgba)
    la = Image.new("LA", (16, 16), (0, 0))
    la.paste((40, 255), (8, 8, 16, 16))
    add("LA (grey + alpha)", "train/bird/la.png", png_bytes(la), "usable", verify=_verify_la)
    one_bit = Image.new("1", (16, 16), 0)
    one_bit.paste(1, (8, 8, 16, 16))
    add("1-bit", "train/cat/one_bit.png", png_bytes(one_bit), "usable", verify=_verify_one_bit)
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated GIF", "train/dog/animated.gif", gif.getvalue(), "usable", verify=_verify_animated)
    add("huge but legitimate (4000 x 3000)", "train/bird/huge.jpg",
        jpeg_bytes(Image.new("RGB", (4000, 3000), (0, 128, 0)), quality=85), "usable", verify=_verify_huge)
    add("Unicode name with spaces", "train/cat/café 猫 photo 1.png", png_bytes(make_image(CLASS_COLOURS[1], rng, 24)),
        "usable", verify=_verify_unicode)

    # --- duplicates ----------------------------------------------------------------------------
    shutil.copyfile(root / "train" / "cat" / "000.png", root / "test" / "cat" / "copy_of_train_000.png")
    kinds.append(Kind("exact duplicate across train and test", root / "test" / "cat" / "copy_of_train_000.png",
                      "usable", "exact duplicate", split="test", label="cat"))
    picture = smooth_picture()
    add("near duplicate (train side)", "train/bird/smooth.png", png_bytes(picture), "usable")
    resized = picture.resize((88, 88), Image.Resampling.BICUBIC)
    add("near duplicate across train and test (re-encoded, resized)", "test/bird/smooth_small.jpg",
        jpeg_bytes(resized, quality=70), "usable")

    # --- ignored -------------------------------------------------------------------------------
    add("hidden .DS_Store", "train/cat/.DS_Store", b"\x00\x00\x00\x01Bud1" + b"\x00" * 64, "ignored", "hidden file")
    add("AppleDouble ._ file", "train/dog/._000.png", b"\x00\x05\x16\x07" + b"\x00" * 80, "ignored", "hidden file")
    add("hidden .ipynb_checkpoints folder", "train/bird/.ipynb_checkpoints/bad-checkpoint.jpg", b"junk",
        "ignored", "hidden folder")
    (root / "train" / ".DS_Store").write_bytes(b"\x00" * 32)  # next to the class folders
    link = root / "train" / "cat" / "up"
    os.symlink(root / "train", link)  # a link to a folder above: following it would loop
    kinds.append(Kind("link to a folder (loop)", link, "ignored", "link to a folder", split="train", label="cat"))
    return kinds


def bad_paths(kinds: list[Kind]) -> set[str]:
    return {str(k.path) for k in kinds if k.outcome == "unusable"}
