"""The ingestion pipeline behind ``crossmodal index``: read, hash, de-duplicate and upload
records through the gateway, with a worker pool, retries and a resumable journal.

Per batch of ``batch_size`` records: the images are read (files, or URLs behind the SSRF guard)
and hashed by the workers; records whose bytes this run or the journal has already indexed are
skipped; when the gateway offers the hash lookup, hashes the collection already holds are skipped
too; the rest are uploaded, ``concurrency`` at a time. Each finished record goes to the journal,
which is synced at the end of the batch.

An upload that fails for a passing reason (429, 5xx, timeouts, an item still pending elsewhere)
is retried with exponential backoff (honouring ``Retry-After``); a refusal (4xx) is final. A 409
``duplicate_item`` counts as done: the image is already indexed, which is what was wanted.
Ctrl-C stops handing out work, waits for the uploads in flight, journals them, and reports.
"""

from __future__ import annotations

import hashlib
import mimetypes
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from crossmodal.client import GatewayClient, GatewayError, sniff_image_type
from crossmodal.ingest.fetch import (
    DEFAULT_MAX_BYTES,
    FetchError,
    FetchPolicy,
    fetch_url,
    read_file,
)
from crossmodal.ingest.journal import Entry, Journal
from crossmodal.ingest.sources import IngestRecord

OUTCOMES: Final = ("indexed", "duplicate", "failed")


@dataclass(frozen=True)
class IngestOptions:
    collection: str
    concurrency: int = 4
    batch_size: int = 32
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_image_bytes: int = DEFAULT_MAX_BYTES
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)


@dataclass(frozen=True)
class Outcome:
    key: str
    outcome: str  # indexed | duplicate | failed
    sha256: str | None = None
    item_id: int | None = None
    error: str | None = None


@dataclass
class IngestReport:
    total: int = 0  # records in the input
    resumed: int = 0  # finished by an earlier run (journal)
    indexed: int = 0
    duplicates: int = 0
    failures: list[Outcome] = field(default_factory=list)
    interrupted: bool = False
    # Why the run stopped before the end: the gateway refused its token (a 401 would refuse
    # every later upload too).
    stopped: str | None = None
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.indexed + self.duplicates + len(self.failures)

    @property
    def items_per_second(self) -> float:
        """Items indexed per second: failures and duplicates are not throughput."""
        return self.indexed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Loaded:
    record: IngestRecord
    data: bytes | None = None
    sha256: str | None = None
    error: str | None = None


ProgressCallback = Callable[[Outcome], None]


class Ingestor:
    def __init__(
        self,
        client: GatewayClient,
        options: IngestOptions,
        journal: Journal,
        *,
        on_progress: ProgressCallback | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.options = options
        self.journal = journal
        self.on_progress = on_progress
        self._sleep = sleep
        self._claims: dict[str, str] = dict(journal.done_hashes())
        self._claims_lock = threading.Lock()
        self._stop = threading.Event()
        self._refused: GatewayError | None = None
        self._hash_lookup = True

    def pending(self, records: Sequence[IngestRecord]) -> list[IngestRecord]:
        """The records an earlier run has not finished (each source once)."""
        seen: set[str] = set()
        todo = []
        for record in records:
            if record.key in seen or self.journal.is_done(record.key):
                continue
            seen.add(record.key)
            todo.append(record)
        return todo

    def run(self, records: Sequence[IngestRecord]) -> IngestReport:
        report = IngestReport(total=len(records))
        todo = self.pending(records)
        report.resumed = len({r.key for r in records}) - len(todo)
        started = time.monotonic()
        size = max(1, self.options.batch_size)
        pool = ThreadPoolExecutor(max(1, self.options.concurrency), thread_name_prefix="ingest")
        try:
            for start in range(0, len(todo), size):
                if self._stop.is_set():
                    break
                self._run_batch(pool, todo[start : start + size], report)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self.journal.sync()
            report.seconds = time.monotonic() - started
        if self._refused is not None:
            report.stopped = self._refused.detail
        return report

    def _run_batch(
        self, pool: ThreadPoolExecutor, batch: list[IngestRecord], report: IngestReport
    ) -> None:
        # Uploads whose outcome is not journaled yet; taken out before journaling, so an
        # interruption in the middle of that never journals one twice.
        unsettled: set[Future[Outcome]] = set()
        try:
            loaded = [f.result() for f in [pool.submit(self._load, r) for r in batch]]
            uploads: list[_Loaded] = []
            for item in loaded:
                early = self._settle_early(item)
                if early is not None:
                    self._finish(early, report)
                else:
                    uploads.append(item)
            self._skip_known_hashes(uploads, report)
            unsettled = {pool.submit(self._upload, item) for item in uploads if item.data}
            while unsettled:
                done, _ = wait(unsettled, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in done:
                    unsettled.discard(future)
                    self._finish(future.result(), report)
        except KeyboardInterrupt:
            # Stop handing out work; let the uploads already running finish and journal them,
            # since the server completes them anyway. A second Ctrl-C aborts the wait.
            self._stop.set()
            for future in list(unsettled):
                if future.cancel():
                    unsettled.discard(future)
            while unsettled:
                future = unsettled.pop()
                self._finish(future.result(), report)
            report.interrupted = True
            raise
        finally:
            self.journal.sync()

    def _finish(self, outcome: Outcome, report: IngestReport) -> None:
        self.journal.record(
            Entry(outcome.key, outcome.outcome, outcome.sha256, outcome.item_id, outcome.error)
        )
        if outcome.outcome == "indexed":
            report.indexed += 1
        elif outcome.outcome == "duplicate":
            report.duplicates += 1
        else:
            report.failures.append(outcome)
        if self.on_progress is not None:
            self.on_progress(outcome)

    # --- steps ------------------------------------------------------------------------------

    def _load(self, record: IngestRecord) -> _Loaded:
        if self._stop.is_set():
            return _Loaded(record, error="interrupted")
        try:
            if record.is_url:
                data = fetch_url(record.source, self.options.fetch_policy).data
            else:
                data = read_file(record.source, self.options.max_image_bytes)
        except FetchError as exc:
            return _Loaded(record, error=str(exc))
        return _Loaded(record, data, hashlib.sha256(data).hexdigest())

    def _settle_early(self, item: _Loaded) -> Outcome | None:
        """An outcome without uploading: unreadable, or bytes this run already has."""
        if item.error is not None or item.sha256 is None:
            return Outcome(item.record.key, "failed", error=item.error or "unreadable")
        with self._claims_lock:
            owner = self._claims.get(item.sha256)
            if owner is None:
                self._claims[item.sha256] = item.record.key
                return None
        return Outcome(item.record.key, "duplicate", item.sha256, error=f"same image as {owner}")

    def _skip_known_hashes(self, uploads: list[_Loaded], report: IngestReport) -> None:
        # One request per batch instead of one upload per duplicate (when the gateway offers it).
        if not self._hash_lookup or not uploads:
            return
        try:
            known = self.client.find_hashes(
                self.options.collection, [u.sha256 for u in uploads if u.sha256]
            )
        except GatewayError:
            return  # only an optimisation: the uploads' 409s decide anyway
        if known is None:
            self._hash_lookup = False
            return
        for item in list(uploads):
            match = known.get(item.sha256 or "")
            if match is not None and match.get("status") == "indexed":
                uploads.remove(item)
                self._finish(
                    Outcome(item.record.key, "duplicate", item.sha256, match.get("id")), report
                )

    def _upload(self, item: _Loaded) -> Outcome:
        record = item.record
        assert item.data is not None and item.sha256 is not None
        name = Path(record.source.split("?")[0]).name or "image"
        guessed = mimetypes.guess_type(name)[0] or ""
        content_type = sniff_image_type(
            item.data, guessed if guessed.startswith("image/") else "image/jpeg"
        )
        if self._refused is not None:  # queued before the run stopped
            return Outcome(record.key, "failed", item.sha256, error=str(self._refused))
        last: GatewayError | None = None
        for attempt in range(self.options.retries + 1):
            if attempt and self._stop.is_set():
                break
            try:
                created = self.client.add_item(
                    self.options.collection,
                    item.data,
                    filename=name,
                    content_type=content_type,
                    captions=record.captions,
                    attributes=dict(record.attributes),
                    tags=record.tags,
                    source_uri=record.source_uri,
                )
                return Outcome(record.key, "indexed", item.sha256, created.get("id"))
            except GatewayError as exc:
                if exc.status == 409 and exc.code == "duplicate_item":
                    return Outcome(record.key, "duplicate", item.sha256, exc.item_id)
                if exc.status == 401:
                    # The login is over (the client renews a token it can): every later upload
                    # would be refused too, so the run stops here.
                    self._refused = self._refused or exc
                    self._stop.set()
                    return Outcome(record.key, "failed", item.sha256, error=str(exc))
                if not (exc.retryable or exc.code == "duplicate_pending"):
                    return Outcome(record.key, "failed", item.sha256, exc.item_id, str(exc))
                last = exc
            if attempt < self.options.retries:
                delay = min(self.options.max_backoff, self.options.backoff * 2**attempt)
                if last is not None and last.retry_after:
                    delay = max(delay, min(last.retry_after, self.options.max_backoff))
                self._sleep(delay)
        reason = str(last) if last is not None else "interrupted"
        if last is not None and last.code == "duplicate_pending":
            reason += " (if it stays pending, `crossmodal reconcile` repairs it)"
        return Outcome(record.key, "failed", item.sha256, error=reason)
