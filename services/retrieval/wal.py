"""Durability primitives: the per-collection write-ahead log and atomic file replacement.

Log record on disk: ``<u32 payload length><u32 CRC32 of (length, payload)><payload>``, little
endian. Payload: ``<u8 op><u8 modality mask><u32 count><u32 dim>`` then ``count`` int64 ids and,
for an upsert, ``count * dim`` float32 components.

Every append is fsync'ed before the caller acknowledges the write, and appends are serialised, so
a crash can only tear the *last* record. Replay therefore discards an invalid final record (one
that runs past the end of the file, or is followed by nothing but zero bytes, as some file
systems leave after a crash) but refuses to skip an invalid record followed by more data: that is
damage to acknowledged writes, which must be surfaced rather than silently dropped.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

log = logging.getLogger(__name__)

MODALITIES: tuple[str, ...] = ("image", "text")
_MASK = {"image": 1, "text": 2}

_OP_UPSERT = 1
_OP_DELETE = 2

_HEADER = struct.Struct("<II")  # payload length, CRC32
_BODY = struct.Struct("<BBII")  # op, modality mask, count, dim
_CHUNK = 1 << 20
_WAL_NAME = re.compile(r"^wal-(\d{10})\.log$")


class WalCorruptError(RuntimeError):
    """The log holds an invalid record that is not a torn tail: acknowledged data is damaged."""


class WalBrokenError(RuntimeError):
    """A failed append could not be rolled back; the log refuses further writes."""


@dataclass(frozen=True)
class Upsert:
    modality: str
    ids: np.ndarray  # int64, shape (n,)
    vectors: np.ndarray  # float32, shape (n, dim)


@dataclass(frozen=True)
class Delete:
    modalities: tuple[str, ...]
    ids: np.ndarray  # int64, shape (n,)


Record = Upsert | Delete


def encode(record: Record) -> bytes:
    """One framed log record, ready to append."""
    if isinstance(record, Upsert):
        n, dim = record.vectors.shape
        body = _BODY.pack(_OP_UPSERT, _MASK[record.modality], n, dim)
        payload = b"".join(
            (body, record.ids.astype("<i8").tobytes(), record.vectors.astype("<f4").tobytes())
        )
    else:
        mask = sum(_MASK[m] for m in record.modalities)
        body = _BODY.pack(_OP_DELETE, mask, len(record.ids), 0)
        payload = body + record.ids.astype("<i8").tobytes()
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", _crc(length, payload)) + payload


def _crc(length: bytes, payload: bytes) -> int:
    # The length is covered too, so a damaged length cannot pair with a matching payload.
    return zlib.crc32(payload, zlib.crc32(length))


def _decode(payload: bytes) -> Record:
    op, mask, n, dim = _BODY.unpack_from(payload)
    ids_end = _BODY.size + 8 * n
    modalities = tuple(m for m in MODALITIES if mask & _MASK[m])
    if op == _OP_UPSERT and len(modalities) == 1 and len(payload) == ids_end + 4 * n * dim:
        ids = np.frombuffer(payload, dtype="<i8", count=n, offset=_BODY.size)
        vectors = np.frombuffer(payload, dtype="<f4", offset=ids_end).reshape(n, dim)
        return Upsert(modalities[0], ids.astype(np.int64), vectors.astype(np.float32))
    if op == _OP_DELETE and modalities and len(payload) == ids_end:
        ids = np.frombuffer(payload, dtype="<i8", count=n, offset=_BODY.size)
        return Delete(modalities, ids.astype(np.int64))
    # The CRC matched, so this is not a torn write but a record this code cannot read.
    raise WalCorruptError(f"unknown log record (op={op}, mask={mask}, {len(payload)} bytes)")


@dataclass(frozen=True)
class ReplayResult:
    records: int
    valid_bytes: int  # the log is intact up to here
    discarded_bytes: int  # torn tail after valid_bytes


def replay(path: Path, apply: Callable[[Record], None], *, allow_torn_tail: bool) -> ReplayResult:
    """Apply every intact record of one log file in order. Streams the file, so a long log does
    not have to fit in memory twice."""
    size = path.stat().st_size
    records = 0
    offset = 0
    with path.open("rb") as f:
        while offset < size:
            header = f.read(_HEADER.size)
            end: int | None = None
            payload = b""
            if len(header) == _HEADER.size:
                length, crc = _HEADER.unpack(header)
                end = offset + _HEADER.size + length
                if _BODY.size <= length and end <= size:
                    payload = f.read(length)
                    if len(payload) == length and _crc(header[:4], payload) == crc:
                        apply(_decode(payload))
                        records += 1
                        offset = end
                        continue
            # An invalid record: torn tail, or damage in the middle of the log.
            if not allow_torn_tail or not _only_zeros_after(f, end, size):
                raise WalCorruptError(f"{path}: invalid record at byte {offset} of {size}")
            return ReplayResult(records, offset, size - offset)
    return ReplayResult(records, offset, 0)


def _only_zeros_after(f: BinaryIO, end: int | None, size: int) -> bool:
    if end is None or end >= size:
        return True
    f.seek(end)
    while chunk := f.read(_CHUNK):
        if chunk.count(0) != len(chunk):
            return False
    return True


def wal_path(directory: Path, generation: int) -> Path:
    return directory / f"wal-{generation:010d}.log"


def generations(directory: Path) -> list[int]:
    """The generations of the log files in ``directory``, oldest first."""
    found = (_WAL_NAME.match(p.name) for p in directory.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


class WalWriter:
    """Appends records to one log file; ``append`` returns only once the record is on disk."""

    def __init__(self, path: Path) -> None:
        existed = path.exists()
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._broken = False
        if not existed:
            # The new file's directory entry must be durable too, or a crash could lose the
            # whole file along with records acknowledged from it.
            os.fsync(self._fd)
            fsync_dir(path.parent)

    @property
    def size(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if self._broken or self._fd < 0:
            raise WalBrokenError(f"{self.path} does not accept writes")
        start = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            _datasync(self._fd)
        except BaseException:
            # A partial record must not stay in front of later ones: replay would stop at it.
            try:
                os.ftruncate(self._fd, start)
                os.fsync(self._fd)
            except OSError:
                self._broken = True
            raise
        self._size = start + len(data)

    def truncate(self, size: int) -> None:
        """Cut a torn tail off before appending after it."""
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        self._size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _datasync(fd: int) -> None:
    # fdatasync also flushes the file size, which is all the metadata an append changes.
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS
        os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    """Make creations, renames and deletions inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` so that a crash leaves either the old or the new file, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
