"""Files on disk: atomic writes, content hashes and the cache root.

The bottom layer (with errors, config, progress and distributed): it imports nothing else of imgclf,
and every layer above writes and hashes files through it.

- **Atomic writes.** A file is written under a temporary name in its own folder, flushed to disk
  (fsync), then renamed over the target (`os.replace`, atomic on POSIX and Windows), and the folder
  is flushed. A reader sees the old file or the new one, never a mix; a killed write leaves only a
  `.tmp-*` file. Caches that can recompute a lost file skip the flushes (`durable=False`).
- **Content hashes.** The SHA-256 of a file's bytes (its first `DIGEST_BYTES` are the feature
  cache's content key), and a digest of a module's weights (the key of the cached features and of
  the cached OpenVINO conversions).
- **The cache root**: `$IMGCLF_CACHE`, else `~/.cache/imgclf` (datasets, scans, features, converted
  networks).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

TEMP_PREFIX = ".tmp-"  # the temporary files of atomic writes (`training.checkpoint` deletes stale ones)
DIGEST_BYTES = 16  # content keys: the first 128 bits of a SHA-256; collisions are out of reach for any image collection
_CHUNK = 1 << 20  # bytes read at a time when hashing a file


def cache_dir() -> Path:
    """Where imgclf keeps downloads and caches: `$IMGCLF_CACHE`, else `~/.cache/imgclf`.

    Example:
        >>> cache_dir() / "features"  # doctest: +SKIP
        PosixPath('/home/me/.cache/imgclf/features')
    """
    return Path(os.environ.get("IMGCLF_CACHE", Path.home() / ".cache" / "imgclf")).expanduser()


# --------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path: str | Path, write: Callable[[Path], object], *, durable: bool = True) -> Path:
    """Call `write(temp)` to write a file at a temporary path beside `path`, then move it onto `path`.

    For writers that take a file name (safetensors, `np.savez`, ...). On any exception the
    temporary file is deleted and the exception raised again; `path` is then untouched.

    Args:
        path: the file to (re)place.
        write: writes the whole file at the path it is given.
        durable: flush the file and the folder to disk, so the new content survives a power cut.
            Caches whose readers recompute an unreadable file pass False and save the flushes.

    Example:
        >>> from safetensors.torch import save_file  # doctest: +SKIP
        >>> atomic_write("cache/shard.safetensors", lambda temp: save_file(tensors, str(temp)))  # doctest: +SKIP
    """
    path = Path(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    try:
        write(temp)
        move_into_place(temp, path, durable=durable)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    """Write `text` (UTF-8) to `path` so that readers see the old or the new content, never a mix.

    Example:
        >>> atomic_write_text(Path("runs/x/finished.json"), "{}\\n")  # doctest: +SKIP
    """
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"), durable=durable)


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """Write `data` to `path` so that readers see the old or the new content, never a mix.

    Example:
        >>> atomic_write_bytes(Path("runs/x/blob.bin"), b"\\x00")  # doctest: +SKIP
    """
    return atomic_write(path, lambda temp: temp.write_bytes(data), durable=durable)


def move_into_place(temp: Path, path: Path, *, durable: bool = True) -> None:
    """Rename the finished file `temp` onto `path` (same folder): the last step of an atomic write.

    Used directly where one writer makes several files that must land in order (OpenVINO's
    `.bin`, then the `.xml` that names it).
    """
    if durable:
        fsync_file(temp)
    os.replace(temp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable without this
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Content hashes


def file_sha256(path: str | Path) -> bytes:
    """The SHA-256 of a file's bytes (32 bytes; content keys keep the first `DIGEST_BYTES`).

    Raises:
        OSError: the file cannot be read.

    Example:
        >>> file_sha256("photos/cat/1.jpg").hex()  # doctest: +SKIP
        '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):  # hashlib releases the GIL on large updates
            digest.update(chunk)
    return digest.digest()


def weights_digest(module: nn.Module) -> str:
    """Hash of every parameter and buffer of `module` (names, shapes, dtypes and bytes).

    Hashing all the bytes is cheap next to one forward pass over a dataset: about 20 ms for lite0
    (19 MB) and well under a second for VGG19 (550 MB).

    Example:
        >>> weights_digest(nn.Linear(2, 2)) == weights_digest(nn.Linear(2, 2))  # random inits differ
        False
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        hash_tensor(digest, tensor, name)
    return digest.hexdigest()


def hash_tensor(digest: Any, tensor: torch.Tensor, label: str = "") -> None:
    """Add `label`, `tensor`'s shape and dtype, and its bytes to a hashlib `digest`.

    Example:
        >>> digest = hashlib.blake2b(digest_size=16)
        >>> hash_tensor(digest, torch.zeros(2), "bias")
    """
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{label}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
