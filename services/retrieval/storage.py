"""Full-precision vector storage: the rows that search candidates are re-scored against.

``DenseVectors`` keeps float32 rows in memory. ``MappedVectors`` keeps float16 rows in a
memory-mapped working file: half the bytes, paged in and out by the OS, so ten million 512-d
vectors (10 GB) need not be resident. Neither is durable by itself: the write-ahead log and the
snapshots are; the working file is rebuilt from them at every start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

# Rows converted to float32 per step when scanning a float16 store.
SCAN_ROWS = 1 << 16


class VectorStorage(Protocol):
    dim: int
    dtype: np.dtype

    @property
    def capacity(self) -> int: ...

    @property
    def array(self) -> np.ndarray:
        """All ``capacity`` rows, in the storage dtype (a view; do not keep it across writes)."""
        ...

    def resize(self, capacity: int, used: int) -> None: ...

    def close(self) -> None: ...


class DenseVectors:
    """float32 rows in memory."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.dtype = np.dtype(np.float32)
        self._array = np.empty((0, dim), dtype=np.float32)

    @property
    def capacity(self) -> int:
        return len(self._array)

    @property
    def array(self) -> np.ndarray:
        return self._array

    def resize(self, capacity: int, used: int) -> None:
        array = np.empty((capacity, self.dim), dtype=np.float32)
        array[:used] = self._array[:used]
        self._array = array

    def close(self) -> None:
        self._array = np.empty((0, self.dim), dtype=np.float32)


class MappedVectors:
    """float16 rows in a memory-mapped file that grows by doubling (``ftruncate`` + remap)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.dim = dim
        self.dtype = np.dtype(np.float16)
        self.path = path
        path.unlink(missing_ok=True)  # a leftover of an earlier run: never trusted
        path.touch()
        self._array: np.ndarray = np.empty((0, dim), dtype=np.float16)

    @property
    def capacity(self) -> int:
        return len(self._array)

    @property
    def array(self) -> np.ndarray:
        return self._array

    def resize(self, capacity: int, used: int) -> None:
        # Never shrinks: a view of the old map still in use (a search's, a snapshot's) would
        # fault past a truncated end of file. The file is rebuilt at the next start anyway.
        if capacity <= len(self._array):
            return
        row_bytes = self.dim * self.dtype.itemsize
        with self.path.open("r+b") as f:
            os.ftruncate(f.fileno(), capacity * row_bytes)
        self._array = np.memmap(self.path, dtype=self.dtype, mode="r+", shape=(capacity, self.dim))

    def load_from(self, source: Path, rows: int) -> None:
        """Fill the first ``rows`` rows with a copy of a raw float16 file (a snapshot's), using
        the kernel's copy (a reflink on file systems that have them)."""
        self._array = np.empty((0, self.dim), dtype=self.dtype)
        nbytes = rows * self.dim * self.dtype.itemsize
        with source.open("rb") as src, self.path.open("wb") as dst:
            copy_bytes(src.fileno(), dst.fileno(), nbytes)
        self.resize(max(rows, 1), rows)

    def close(self) -> None:
        self._array = np.empty((0, self.dim), dtype=self.dtype)
        self.path.unlink(missing_ok=True)


def copy_bytes(src: int, dst: int, nbytes: int) -> None:
    """Copy ``nbytes`` from the current offset of ``src`` to ``dst``."""
    left = nbytes
    try:
        while left:
            copied = os.copy_file_range(src, dst, min(left, 1 << 30))
            if not copied:
                break
            left -= copied
    except OSError:
        pass  # not supported here (another file system): copy through user space
    while left:
        chunk = os.read(src, min(left, 1 << 24))
        if not chunk:
            raise OSError(f"source ended {left} bytes early")
        os.write(dst, chunk)
        left -= len(chunk)


def as_float32(rows: np.ndarray) -> np.ndarray:
    return rows if rows.dtype == np.float32 else rows.astype(np.float32)
