"""The ingestion journal: what ``crossmodal index`` has finished, so an interrupted run resumes
where it stopped.

One JSON object per line, appended and flushed as each record finishes, and fsync'ed after each
batch: ``{"key", "sha256", "outcome", "item_id", "error", "note"}`` (``note``: the attribute
values a merge left as they were). A crash can lose at most the unsynced tail (a torn last line
is ignored); records lost that way are sent again and the server answers 409 ``duplicate_item``
for those already indexed, and merging what they bring adds nothing twice: nothing is stored
twice, because idempotency rests on the content hash, with the journal only saving the work of
re-sending.

The first line names the collection; a journal of another collection is refused rather than used
to skip the wrong files.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from crossmodal.client import config_dir

DONE: Final = frozenset({"indexed", "merged", "duplicate"})


class JournalError(Exception):
    pass


@dataclass(frozen=True)
class Entry:
    key: str
    outcome: str  # indexed | merged | duplicate | failed
    sha256: str | None = None
    item_id: int | None = None
    error: str | None = None
    note: str | None = None


def default_journal_path(source: Path, collection: str) -> Path:
    """``~/.cache/crossmodal/journals/<collection>-<hash of the source path>.jsonl``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    root = Path(base) / "crossmodal" / "journals"
    if os.environ.get("CROSSMODAL_CONFIG_DIR"):  # tests and sandboxes keep everything together
        root = config_dir() / "journals"
    return root / f"{collection}-{digest}.jsonl"


class Journal:
    def __init__(self, path: Path, collection: str) -> None:
        self.path = path
        self.collection = collection
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._load()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8")
        if self._torn_tail():
            self._file.write("\n")  # keep a half-written line from swallowing the next entry
        if path.stat().st_size == 0:
            self._write({"journal": 1, "collection": collection})
            self.sync()

    def _load(self) -> None:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle):
                try:
                    data = json.loads(line)
                except ValueError:
                    continue  # a line torn by a crash
                if not isinstance(data, dict):
                    continue
                if number == 0 and "journal" in data:
                    if data.get("collection") != self.collection:
                        raise JournalError(
                            f"{self.path} is the journal of collection "
                            f"{data.get('collection')!r}, not {self.collection!r}"
                        )
                    continue
                if isinstance(data.get("key"), str) and isinstance(data.get("outcome"), str):
                    self.entries[data["key"]] = Entry(
                        data["key"],
                        data["outcome"],
                        data.get("sha256"),
                        data.get("item_id"),
                        data.get("error"),
                        data.get("note"),
                    )

    def _torn_tail(self) -> bool:
        with self.path.open("rb") as handle:
            if handle.seek(0, os.SEEK_END) == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"

    def _write(self, data: dict[str, Any]) -> None:
        self._file.write(json.dumps(data, ensure_ascii=False) + "\n")
        self._file.flush()

    def is_done(self, key: str) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.outcome in DONE

    def done_hashes(self) -> dict[str, str]:
        """sha256 → key of every finished record."""
        return {e.sha256: e.key for e in self.entries.values() if e.outcome in DONE and e.sha256}

    def done_items(self) -> dict[str, int]:
        """sha256 → the item of every finished record whose item is known."""
        return {
            e.sha256: e.item_id
            for e in self.entries.values()
            if e.outcome in DONE and e.sha256 and isinstance(e.item_id, int)
        }

    def record(self, entry: Entry) -> None:
        with self._lock:
            self.entries[entry.key] = entry
            self._write({k: v for k, v in entry.__dict__.items() if v is not None})

    def sync(self) -> None:
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
