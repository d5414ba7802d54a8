"""Decoded images kept as uint8 at the model's input size: in RAM, or in an on-disk cache (``--cache-dir``).

A split decoded once is ``(N, 1, S, S)`` uint8 (49 KB per image at 224 px, a quarter of float32), turned
into the model's [-1024, 1024] floats one batch at a time, on the device that runs the model
(:func:`to_model_range`). The conversion is a 256-entry table computed with exactly the float32 numpy
operations of decoding (``k / 255``) and :func:`~mediscan.core.preprocessing.preprocess` (clip, scale), so
an 8-bit image at the input size gives bit for bit the floats the float path gave; a resized or 16-bit one
differs by at most half a grey level (1024 / 255 = 4.02 model units).

On disk one split is a folder ``<cache_dir>/<key>/`` holding ``pixels.u8`` (the raw array) and
``index.json``. The key (see :func:`mediscan.core.dataset.split_key`) hashes every file's path, label and
content hash plus the preprocessing, so a changed file or input size gives a new key and a new build. A
build is written into a hidden ``.building-*`` folder, flushed, and renamed into place only when complete,
so a run killed mid-write leaves nothing that is later trusted. An exclusive ``flock`` per key makes
concurrent builders on one machine (torchrun ranks, two runs) wait for the first one and then read its
result; the kernel releases the lock of a builder that dies, even by SIGKILL.

Batches are read from the file with ``preadv`` rather than through a memory map: the pages stay in the
kernel's page cache, which every process on the machine shares, instead of adding to each process's
resident set (pages of a mapping count towards RSS once touched).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from mediscan.core.preprocessing import scale_to_model_range

#: Bump when the stored bytes would change for the same files (decoder or quantisation changes).
FORMAT_VERSION = 1
PIXELS_NAME = "pixels.u8"
INDEX_NAME = "index.json"
_HINT = "choose another folder with --cache-dir, or leave --cache-dir out to keep the decoded images in RAM"

try:                      # POSIX; elsewhere concurrent builders each build and the first rename wins
    import fcntl
except ImportError:       # pragma: no cover - Windows
    fcntl = None


class CacheDirError(ValueError):
    """The cache folder cannot hold the cache (read-only, full, not a folder); the message says what to do."""


# ---------------------------------------------------------------------------------------------- conversion

def _model_range_table() -> torch.Tensor:
    # The same float32 numpy operations as imaging (k / 255) then preprocessing (clip, scale): exact match.
    levels = np.clip(np.arange(256, dtype=np.float32) / 255.0, 0.0, 1.0)
    return torch.from_numpy(scale_to_model_range(levels).astype(np.float32))


_TABLE = _model_range_table()
_TABLES: dict[torch.device, torch.Tensor] = {}


def quantize(square01: np.ndarray) -> np.ndarray:
    """A cropped and resized [0, 1] float image -> uint8 grey levels (rounded to nearest, clipped)."""
    return np.round(np.clip(square01, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 grey levels -> float32 in [-1024, 1024] on the same device; float input is returned unchanged."""
    if pixels.dtype != torch.uint8:
        return pixels
    table = _TABLES.get(pixels.device)
    if table is None:
        table = _TABLES.setdefault(pixels.device, _TABLE.to(pixels.device))
    # index_select with an int32 index: ~6x faster on the CPU than advanced indexing with int64
    return table.index_select(0, pixels.reshape(-1).int()).view(pixels.shape)


# ---------------------------------------------------------------------------------------------- the store

class PixelFile:
    """A ``(count, 1, size, size)`` uint8 array in a file, read a batch at a time (slices or index tensors).

    Indexing returns a CPU uint8 tensor, like indexing the in-RAM tensor it stands in for.
    """

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, path: str | Path, count: int, size: int):
        self.path = Path(path)
        self.count, self.size = count, size
        self.row_bytes = size * size
        self._fd = os.open(self.path, os.O_RDONLY)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.count, 1, self.size, self.size)

    @property
    def nbytes(self) -> int:
        return self.count * self.row_bytes

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, key) -> torch.Tensor:
        rows = _rows(key, self.count)
        out = torch.empty((len(rows), 1, self.size, self.size), dtype=torch.uint8)
        self.read_into(rows, out)
        return out[0] if isinstance(key, (int, np.integer)) else out     # an int drops the first axis

    def read_into(self, rows: np.ndarray, out: torch.Tensor) -> None:
        """Rows ``rows`` (an int array) into ``out`` (contiguous uint8, e.g. pinned), one read per run of
        adjacent rows."""
        flat = out.numpy().reshape(len(rows), self.row_bytes)
        start = 0
        while start < len(rows):
            end = start + 1
            while end < len(rows) and rows[end] == rows[end - 1] + 1:
                end += 1
            view = memoryview(flat[start:end]).cast("B")
            if os.preadv(self._fd, [view], int(rows[start]) * self.row_bytes) != len(view):
                raise OSError(errno.EIO, f"{self.path} is shorter than its index says; delete its folder to "
                                         f"rebuild the cache")
            start = end

    def __del__(self):
        try:
            os.close(self._fd)
        except (AttributeError, OSError):
            pass


def _rows(key, count: int) -> np.ndarray:
    if isinstance(key, slice):
        return np.arange(count, dtype=np.int64)[key]
    if isinstance(key, torch.Tensor):
        key = key.detach().cpu().numpy()
    rows = np.asarray(key, dtype=np.int64).reshape(-1)
    rows = np.where(rows < 0, rows + count, rows)
    if rows.size and (rows.min() < 0 or rows.max() >= count):
        raise IndexError(f"index out of range for {count} cached images")
    return rows


def gather(pixels, index, device: torch.device | str) -> torch.Tensor:
    """Rows ``index`` (slice or int tensor) of ``pixels`` (a tensor anywhere, or a :class:`PixelFile`) on
    ``device``, in their stored dtype. Host rows bound for a GPU go through pinned memory, copied
    asynchronously; on the CPU this is plain indexing."""
    device = torch.device(device)
    if isinstance(pixels, torch.Tensor) and pixels.device.type != "cpu":
        chosen = pixels[index] if isinstance(index, slice) else pixels[index.to(pixels.device)]
        return chosen.to(device)
    if device.type != "cuda":
        return pixels[index].to(device)
    rows = _rows(index, len(pixels))
    # Pinned buffers come from the caching host allocator, which keeps a buffer out of reuse until the
    # asynchronous copy that reads it has finished, so a fresh one per batch is safe without a sync.
    out = torch.empty((len(rows),) + tuple(pixels.shape[1:]), dtype=pixels.dtype, pin_memory=True)
    if isinstance(pixels, PixelFile):
        pixels.read_into(rows, out)
    else:
        torch.index_select(pixels, 0, torch.from_numpy(rows), out=out)
    return out.to(device, non_blocking=True)


# ------------------------------------------------------------------------------------------ cache folders

def open_entry(cache_dir: str | Path, key: str) -> tuple[PixelFile, dict] | None:
    """The committed cache ``key`` (its pixels and index), or None when there is none or it does not check out."""
    folder = Path(cache_dir) / key
    try:
        index = json.loads((folder / INDEX_NAME).read_text())
        count, size = int(index["count"]), int(index["size"])
        if index.get("format") != FORMAT_VERSION or index.get("key") != key:
            return None
        if (folder / PIXELS_NAME).stat().st_size != count * size * size:
            return None
        return PixelFile(folder / PIXELS_NAME, count, size), index
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_writable(cache_dir: str | Path, needed_bytes: int) -> None:
    """Raise :class:`CacheDirError` unless ``cache_dir`` can be created, written, and has room for
    ``needed_bytes`` more (plus 1 % and 16 MB of slack)."""
    folder = Path(cache_dir)
    if folder.exists() and not folder.is_dir():
        raise CacheDirError(f"--cache-dir {folder}: this is a file, not a folder; {_HINT}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise CacheDirError(f"--cache-dir {folder}: cannot write there ({exc.strerror or exc}): the folder or "
                            f"its disk is read-only or not yours; {_HINT}") from None
    free = shutil.disk_usage(folder).free
    wanted = needed_bytes + needed_bytes // 100 + 16 * 2**20
    if free < wanted:
        raise CacheDirError(f"--cache-dir {folder}: the disk is too full: the cache needs {wanted / 2**20:.0f} MB, "
                            f"{free / 2**20:.0f} MB are free; free some space, or {_HINT}")


@contextmanager
def _key_lock(cache_dir: Path, key: str) -> Iterator[None]:
    """Exclusive lock for building ``key``; the kernel drops it if the holder dies (even by SIGKILL)."""
    if fcntl is None:                         # pragma: no cover
        yield
        return
    with open(cache_dir / f".{key}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


#: ``fill(write)`` calls ``write(row_number, uint8 (S, S) image)`` for every image it decodes (from any
#: thread) and returns the index: JSON-able, with ``kept``, the ascending row numbers that hold an image.
Fill = Callable[[Callable[[int, np.ndarray], None]], dict]


def build_entry(cache_dir: str | Path, key: str, count: int, size: int, fill: Fill) -> tuple[PixelFile, dict, bool]:
    """Open cache ``key``, building it first if no committed one exists (waiting for a concurrent builder).

    ``fill`` (see :data:`Fill`) writes the rows; they are then compacted to ``len(kept)``. Returns the pixels,
    the index and whether this call built it. Disk errors become :class:`CacheDirError`.
    """
    cache_dir = Path(cache_dir)
    found = open_entry(cache_dir, key)
    if found is not None:
        return (*found, False)
    check_writable(cache_dir, count * size * size)
    with _key_lock(cache_dir, key):
        found = open_entry(cache_dir, key)   # built by whoever held the lock before us
        if found is not None:
            return (*found, False)
        final = cache_dir / key
        for stale in [final, *cache_dir.glob(f".building-{key}-*")]:   # damaged, or left by a dead builder
            shutil.rmtree(stale, ignore_errors=True)
        building = cache_dir / f".building-{key}-{socket.gethostname()}-{os.getpid()}"
        try:
            _write_entry(building, key, count, size, fill)
            _commit(building, final)
        except OSError as exc:
            shutil.rmtree(building, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG):
                raise CacheDirError(f"--cache-dir {cache_dir}: writing the cache failed ({exc.strerror}); free "
                                    f"some space, or {_HINT}") from None
            raise
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    found = open_entry(cache_dir, key)
    if found is None:
        raise CacheDirError(f"--cache-dir {cache_dir}: the cache just written cannot be read back; {_HINT}")
    return (*found, True)


def _write_entry(folder: Path, key: str, count: int, size: int, fill: Fill) -> None:
    """pixels.u8 and index.json in ``folder``, flushed to disk. Rows go in with ``pwrite``, not through a
    map, so the builder's resident memory does not grow with the file."""
    folder.mkdir(parents=True)
    row_bytes = size * size
    fd = os.open(folder / PIXELS_NAME, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if count:
            _allocate(fd, count * row_bytes)

        def write(row: int, image: np.ndarray) -> None:
            data = np.ascontiguousarray(image, dtype=np.uint8).reshape(-1)
            if data.size != row_bytes or os.pwrite(fd, memoryview(data), row * row_bytes) != row_bytes:
                raise OSError(errno.EIO, f"short write to {folder / PIXELS_NAME}")

        index = fill(write)
        kept = list(index["kept"])
        for target, source in enumerate(kept):          # files that failed to decode drop out
            if target != source:
                os.pwrite(fd, os.pread(fd, row_bytes, source * row_bytes), target * row_bytes)
        os.ftruncate(fd, len(kept) * row_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    index = {**index, "format": FORMAT_VERSION, "key": key, "count": len(kept), "size": size}
    with open(folder / INDEX_NAME, "w") as handle:
        json.dump(index, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _allocate(fd: int, nbytes: int) -> None:
    """Reserve the file's blocks now, so a full disk fails here and not in the middle of decoding."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, nbytes)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    os.ftruncate(fd, nbytes)


def _commit(building: Path, final: Path) -> None:
    """Rename the finished folder into place (atomic), then flush the parent folder's entry."""
    os.rename(building, final)
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
