"""The one decoder: every kind of messy file, its guards, and a bounded fuzz test."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from messy_data import jpeg_bytes, png_bytes, png_header_claiming, write_messy_folder
from PIL import Image

from imgclf.data import decode
from imgclf.data.decode import UnreadableImageError, decode_image, open_image, to_rgb


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("messy")
    return root, write_messy_folder(root, per_class=2, test_per_class=1)


def test_every_kind_of_file_has_the_expected_outcome(messy) -> None:  # type: ignore[no-untyped-def]
    _, kinds = messy
    assert len({k.name for k in kinds}) >= 15
    wrong = []
    for kind in kinds:
        if kind.outcome == "ignored":
            continue  # discovery's business: see test_check.py
        try:
            decoded = decode_image(kind.path)
        except UnreadableImageError as exc:
            if kind.outcome != "unusable" or kind.reason not in exc.reason:
                wrong.append(f"{kind.name}: unreadable ({exc.reason}), expected {kind.outcome} {kind.reason!r}")
            elif str(kind.path) != exc.name:
                wrong.append(f"{kind.name}: error names {exc.name!r}")
            continue
        if kind.outcome != "usable":
            wrong.append(f"{kind.name}: decoded, expected unusable ({kind.reason})")
            continue
        if decoded.image.mode != "RGB":
            wrong.append(f"{kind.name}: mode {decoded.image.mode}")
        if kind.verify is not None:
            try:
                kind.verify(decoded)
            except AssertionError as exc:
                wrong.append(f"{kind.name}: {exc}")
    assert not wrong, "\n".join(wrong)


def test_bomb_guard_holds_whatever_pillow_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    # Someone sets Pillow's limit to None and silences warnings: the header check still refuses.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for width, height in ((100_000, 100_000), (15_000, 13_000)):
            with pytest.raises(UnreadableImageError, match="too many pixels"):
                decode_image(png_header_claiming(width, height))
    assert decode.MAX_IMAGE_PIXELS is not None


def test_formats_outside_the_allowlist_are_refused() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"  # Pillow would run Ghostscript
    with pytest.raises(UnreadableImageError, match="not an image"):
        decode_image(eps)
    ico = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(ico, "ICO")
    with pytest.raises(UnreadableImageError, match="not an image in an allowed format"):
        decode_image(ico.getvalue())


def test_sources_paths_bytes_and_file_objects_agree(tmp_path: Path) -> None:
    data = png_bytes(Image.new("RGB", (5, 3), (9, 8, 7)))
    (tmp_path / "a.png").write_bytes(data)
    images = [open_image(tmp_path / "a.png"), open_image(str(tmp_path / "a.png")), open_image(data),
              open_image(io.BytesIO(data))]
    assert all(img.size == (5, 3) and img.getpixel((0, 0)) == (9, 8, 7) for img in images)
    with pytest.raises(UnreadableImageError, match="empty"):
        open_image(b"")
    with pytest.raises(UnreadableImageError, match="not a regular file"):
        open_image(tmp_path)


def test_transparent_colour_without_alpha_channel_is_composited() -> None:
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    rgb.putpixel((3, 3), (200, 0, 0))
    decoded = decode_image(png_bytes(rgb, transparency=(10, 20, 30)))
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.image.getpixel((3, 3)) == (200, 0, 0)


def test_integer_modes_are_rescaled_never_clipped() -> None:
    wide = Image.fromarray(np.array([[0, 1000, 70000, 140000]], dtype=np.int32), mode="I")
    assert [to_rgb(wide).getpixel((x, 0))[0] for x in range(4)] == [0, 2, 128, 255]
    sixteen = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert [to_rgb(sixteen).getpixel((x, 0))[0] for x in range(3)] == [0, 1, 255]


def test_unknown_exceptions_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_bytes(Image.new("RGB", (4, 4)))

    def broken_open(*args: object, **kwargs: object) -> Image.Image:
        raise RuntimeError("a bug, not bad data")

    monkeypatch.setattr(decode.Image, "open", broken_open)
    with pytest.raises(RuntimeError, match="a bug"):
        decode_image(data)


# --------------------------------------------------------------------------------------------
# Fuzzing


def _fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC, so that mutations get past the CRC check into the decoder."""
    out, pos = bytearray(data[:8]), 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        out += data[pos:end] + struct.pack(">I", zlib.crc32(data[pos + 4 : end]) & 0xFFFFFFFF)
        pos = end + 4
    return bytes(out + data[pos:])


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    kind = rng.integers(0, 5)
    if kind == 0:  # flip a few bytes
        for _ in range(rng.integers(1, 8)):
            b[rng.integers(0, len(b))] = rng.integers(0, 256)
    elif kind == 1:  # truncate
        b = b[: rng.integers(0, len(b))]
    elif kind == 2:  # insert random bytes
        i = rng.integers(0, len(b))
        b[i:i] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
    elif kind == 3:  # delete a run
        i = rng.integers(0, len(b))
        del b[i : i + rng.integers(1, 200)]
    else:  # overwrite 4 bytes with a hostile integer (sizes, lengths, offsets)
        i = rng.integers(0, len(b) - 4)
        b[i : i + 4] = struct.pack(">I", int(rng.choice([0, 1, 255, 30000, 65535, 0x7FFFFFFF, 0xFFFFFFFF])))
    return bytes(b)


def test_fuzzed_jpeg_and_png_only_raise_unreadable_image_error() -> None:
    rng = np.random.default_rng(20240601)
    pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    seeds = [
        ("JPEG", jpeg_bytes(picture, quality=90)),
        ("JPEG", jpeg_bytes(picture, progressive=True)),
        ("PNG", png_bytes(picture)),
        ("PNG", png_bytes(picture.convert("P"))),
        ("PNG", png_bytes(picture.convert("RGBA"))),
        ("PNG", png_bytes(Image.fromarray(pixels[..., 0].astype(np.uint16) * 257))),
    ]
    outcomes = {"decoded": 0, "unreadable": 0}
    escaped, slow = [], []
    started = time.perf_counter()
    for n in range(3000):
        fmt, data = seeds[n % len(seeds)]
        mutated = _mutate(data, rng)
        if fmt == "PNG" and n % 2:
            mutated = _fix_png_crcs(mutated)
        t = time.perf_counter()
        try:
            decode_image(mutated, draft_size=32 if n % 3 == 0 else None)
            outcomes["decoded"] += 1
        except UnreadableImageError:
            outcomes["unreadable"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            escaped.append(f"#{n} {fmt}: {type(exc).__name__}: {exc}")
        seconds = time.perf_counter() - t
        if seconds > 5.0:
            slow.append(f"#{n} {fmt}: {seconds:.1f} s")
    assert not escaped, "\n".join(escaped[:20])
    assert not slow, "\n".join(slow)
    # The mutations must actually exercise both paths, or the test proves nothing.
    assert outcomes["decoded"] > 100 and outcomes["unreadable"] > 1000, outcomes
    assert time.perf_counter() - started < 60
