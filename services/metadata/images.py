"""Image checks and the content-addressed image store.

Files are named by the SHA-256 of their bytes under two levels of shard folders
(``ab/cd/abcd…``), so identical uploads share one file and no folder grows huge.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.images import inspect_image


@dataclass(frozen=True)
class CheckedImage:
    data: bytes
    sha256: str
    content_type: str


def check_image(data: bytes, *, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Accept ``data`` only if it is an image of an allowed format within the limits."""
    info = inspect_image(data, max_bytes=max_bytes, max_pixels=max_pixels, name="the image")
    return CheckedImage(data, hashlib.sha256(data).hexdigest(), info.content_type)


class ImageStore:
    """Content-addressed files. Callers hold ``lock(sha)`` around "write file + reference it" and
    "drop last reference + delete file" so the two cannot interleave (within this process)."""

    _STRIPES = 64

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / sha256

    @contextmanager
    def lock(self, sha256: str) -> Iterator[None]:
        with self._locks[int(sha256[:8], 16) % self._STRIPES]:
            yield

    def put(self, sha256: str, data: bytes) -> bool:
        """Store ``data`` under its hash; True if a new file was written, False if it existed."""
        target = self.path(sha256)
        if target.exists():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write a temporary file in the same folder, fsync, then rename: a reader or a crash
        # never sees a partial image under the final name.
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(data)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return True

    def remove(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the folder entry itself is flushed.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
