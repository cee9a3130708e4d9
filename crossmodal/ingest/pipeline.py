"""The ingestion pipeline behind ``crossmodal index``: read, hash, de-duplicate and upload
records through the gateway, with a worker pool, retries and a resumable journal.

Per batch of ``batch_size`` records: the images are read (files, or URLs behind the SSRF guard)
and hashed by the workers. A record whose bytes this run or the journal has already seen is a
duplicate of that item; so is one whose hash the collection already holds (asked in one request
per batch, when the gateway offers the hash lookup), or one the upload finds there (409
``duplicate_item``). What a duplicate brings (captions, tags, attributes) is merged into the item
(``POST /items/{id}/merge``, docs/metadata.md): the record is "merged" when that added something,
"duplicate" (already there) when it brought nothing new. The rest are uploaded, ``concurrency``
at a time; duplicates of this batch's own uploads are merged once those are done. Each finished
record goes to the journal, which is synced at the end of the batch.

An upload or a merge that fails for a passing reason (429, 5xx, timeouts, an item still pending
elsewhere) is retried with exponential backoff (honouring ``Retry-After``); a refusal (4xx) is
final. Ctrl-C stops handing out work, waits for the calls in flight, journals them, and reports.
"""

from __future__ import annotations

import hashlib
import mimetypes
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
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
from crossmodal.ingest.sources import IngestRecord, mark_repeats

OUTCOMES: Final = ("indexed", "merged", "duplicate", "failed")


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
    outcome: str  # indexed | merged | duplicate | failed
    sha256: str | None = None
    item_id: int | None = None
    error: str | None = None
    # A merge's attribute conflicts: the item's values, which it kept, and the record's.
    note: str | None = None


@dataclass
class IngestReport:
    total: int = 0  # records in the input
    resumed: int = 0  # finished by an earlier run (journal)
    indexed: int = 0
    merged: int = 0  # duplicates that added captions, tags or attributes to their item
    duplicates: int = 0  # duplicates that brought nothing new: already there
    failures: list[Outcome] = field(default_factory=list)
    # Merged records that offered other values for attributes their item has (kept).
    conflicts: list[Outcome] = field(default_factory=list)
    interrupted: bool = False
    # Why the run stopped before the end: the gateway refused its token (a 401 would refuse
    # every later upload too).
    stopped: str | None = None
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.indexed + self.merged + self.duplicates + len(self.failures)

    @property
    def items_per_second(self) -> float:
        """Items indexed per second: failures, merges and duplicates are not throughput."""
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
        # sha256 → the key of the record that owns it (this run's or the journal's), and the
        # item it became, once known.
        self._claims: dict[str, str] = dict(journal.done_hashes())
        self._items: dict[str, int] = dict(journal.done_items())
        self._claims_lock = threading.Lock()
        self._stop = threading.Event()
        self._refused: GatewayError | None = None
        self._hash_lookup = True

    def pending(self, records: Sequence[IngestRecord]) -> list[IngestRecord]:
        """The records an earlier run has not finished, each key once (``mark_repeats``)."""
        seen: set[str] = set()
        todo = []
        for record in mark_repeats(records):
            if record.key in seen or self.journal.is_done(record.key):
                continue
            seen.add(record.key)
            todo.append(record)
        return todo

    def run(self, records: Sequence[IngestRecord]) -> IngestReport:
        report = IngestReport(total=len(records))
        todo = self.pending(records)
        report.resumed = len({r.key for r in mark_repeats(records)}) - len(todo)
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
        # Calls whose outcome is not journaled yet; taken out before journaling, so an
        # interruption in the middle of that never journals one twice.
        unsettled: set[Future[list[Outcome]]] = set()
        try:
            loaded = [f.result() for f in [pool.submit(self._load, r) for r in batch]]
            uploads: list[_Loaded] = []
            followers: list[_Loaded] = []
            for item in loaded:
                if item.error is not None or item.sha256 is None:
                    error = item.error or "unreadable"
                    self._finish(Outcome(item.record.key, "failed", error=error), report)
                elif self._claim(item):
                    uploads.append(item)
                else:
                    followers.append(item)
            merges = self._known_items(uploads)
            same_image: dict[str, list[_Loaded]] = {}
            for item in followers:
                same_image.setdefault(item.sha256 or "", []).append(item)
            # First the images new to this run, then the duplicates of this run's images:
            # those merge into the items the first wave made, one image's in input order.
            for wave in (
                [partial(self._one, self._upload, item) for item in uploads]
                + [partial(self._one, self._merge, item, item_id) for item, item_id in merges],
                [partial(self._follow, group) for group in same_image.values()],
            ):
                if self._stop.is_set():
                    break
                unsettled = {pool.submit(call) for call in wave}
                while unsettled:
                    done, _ = wait(unsettled, timeout=0.5, return_when=FIRST_COMPLETED)
                    for future in done:
                        unsettled.discard(future)
                        for outcome in future.result():
                            self._finish(outcome, report)
        except KeyboardInterrupt:
            # Stop handing out work; let the calls already running finish and journal them,
            # since the server completes them anyway. A second Ctrl-C aborts the wait.
            self._stop.set()
            for future in list(unsettled):
                if future.cancel():
                    unsettled.discard(future)
            while unsettled:
                future = unsettled.pop()
                for outcome in future.result():
                    self._finish(outcome, report)
            report.interrupted = True
            raise
        finally:
            self.journal.sync()

    def _finish(self, outcome: Outcome, report: IngestReport) -> None:
        self.journal.record(
            Entry(
                outcome.key,
                outcome.outcome,
                outcome.sha256,
                outcome.item_id,
                outcome.error,
                outcome.note,
            )
        )
        self._learn(outcome)
        if outcome.outcome == "indexed":
            report.indexed += 1
        elif outcome.outcome == "merged":
            report.merged += 1
        elif outcome.outcome == "duplicate":
            report.duplicates += 1
        else:
            report.failures.append(outcome)
        if outcome.note and outcome.outcome != "failed":
            report.conflicts.append(outcome)
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

    def _claim(self, item: _Loaded) -> bool:
        """Make the record the owner of its bytes; False if this run or the journal already
        has an owner for them (the record is then a duplicate of that one's item)."""
        assert item.sha256 is not None
        with self._claims_lock:
            if item.sha256 in self._claims:
                return False
            self._claims[item.sha256] = item.record.key
            return True

    def _known_items(self, uploads: list[_Loaded]) -> list[tuple[_Loaded, int]]:
        """Take out of ``uploads`` the images the collection already holds, indexed: those are
        merged into their items instead (one hash lookup per batch instead of one upload per
        duplicate, when the gateway offers it)."""
        if not self._hash_lookup or not uploads:
            return []
        try:
            known = self.client.find_hashes(
                self.options.collection, [u.sha256 for u in uploads if u.sha256]
            )
        except GatewayError:
            return []  # only an optimisation: the uploads' 409s decide anyway
        if known is None:
            self._hash_lookup = False
            return []
        merges = []
        for item in list(uploads):
            match = known.get(item.sha256 or "")
            if match is not None and match.get("status") == "indexed":
                uploads.remove(item)
                merges.append((item, int(match["id"])))
        return merges

    def _learn(self, outcome: Outcome) -> None:
        """Remember the item a record's bytes became."""
        if outcome.outcome != "failed" and outcome.sha256 and outcome.item_id is not None:
            with self._claims_lock:
                self._items.setdefault(outcome.sha256, outcome.item_id)

    @staticmethod
    def _one(call: Callable[..., Outcome], *args: object) -> list[Outcome]:
        return [call(*args)]

    def _follow(self, same_image: list[_Loaded]) -> list[Outcome]:
        """Records whose bytes another record of this run (or of an earlier one) owns, one
        after the other: each merged into that record's item, or, while it has none (it
        failed), uploaded: the upload is its retry, and the server tells a duplicate."""
        outcomes = []
        for item in same_image:
            if self._stop.is_set():
                break  # not journaled: the next run takes it up
            with self._claims_lock:
                item_id = self._items.get(item.sha256 or "")
            outcome = self._upload(item) if item_id is None else self._merge(item, item_id)
            self._learn(outcome)
            outcomes.append(outcome)
        return outcomes

    def _upload(self, item: _Loaded) -> Outcome:
        record = item.record
        assert item.data is not None and item.sha256 is not None
        data = item.data
        name = Path(record.source.split("?")[0]).name or "image"
        guessed = mimetypes.guess_type(name)[0] or ""
        content_type = sniff_image_type(
            data, guessed if guessed.startswith("image/") else "image/jpeg"
        )

        def send() -> Outcome:
            try:
                created = self.client.add_item(
                    self.options.collection,
                    data,
                    filename=name,
                    content_type=content_type,
                    captions=record.captions,
                    attributes=dict(record.attributes),
                    tags=record.tags,
                    source_uri=record.source_uri,
                )
            except GatewayError as exc:
                if exc.status == 409 and exc.code == "duplicate_item" and exc.item_id is not None:
                    return Outcome(record.key, "duplicate", item.sha256, exc.item_id)
                raise
            return Outcome(record.key, "indexed", item.sha256, created.get("id"))

        outcome = self._retrying(item, send)
        if outcome.outcome == "duplicate" and outcome.item_id is not None:
            return self._merge(item, outcome.item_id)
        return outcome

    def _merge(self, item: _Loaded, item_id: int) -> Outcome:
        """What the record brings, merged into ``item_id``: "merged" when that added anything,
        "duplicate" when the item had it all."""
        record = item.record
        if not record.brings:
            return Outcome(record.key, "duplicate", item.sha256, item_id)

        def send() -> Outcome:
            merged = self.client.merge_item(
                item_id,
                captions=record.captions,
                tags=record.tags,
                attributes=dict(record.attributes),
            )
            added = (
                merged.get("added_captions")
                or merged.get("added_tags")
                or merged.get("added_attributes")
            )
            note = "; ".join(
                f"{c['key']}: kept {c['kept']!r}, not {c['offered']!r}"
                for c in merged.get("conflicts") or []
            )
            return Outcome(
                record.key,
                "merged" if added else "duplicate",
                item.sha256,
                item_id,
                note=note or None,
            )

        return self._retrying(item, send)

    def _retrying(self, item: _Loaded, send: Callable[[], Outcome]) -> Outcome:
        """``send()`` until it answers, retrying passing failures; a refusal is final."""
        record = item.record
        if self._refused is not None:  # queued before the run stopped
            return Outcome(record.key, "failed", item.sha256, error=str(self._refused))
        last: GatewayError | None = None
        for attempt in range(self.options.retries + 1):
            if attempt and self._stop.is_set():
                break
            try:
                return send()
            except GatewayError as exc:
                if exc.status == 401:
                    # The login is over (the client renews a token it can): every later call
                    # would be refused too, so the run stops here.
                    self._refused = self._refused or exc
                    self._stop.set()
                    return Outcome(record.key, "failed", item.sha256, error=str(exc))
                if not (exc.retryable or _pending(exc)):
                    return Outcome(record.key, "failed", item.sha256, exc.item_id, str(exc))
                last = exc
            if attempt < self.options.retries:
                delay = min(self.options.max_backoff, self.options.backoff * 2**attempt)
                if last is not None and last.retry_after:
                    delay = max(delay, min(last.retry_after, self.options.max_backoff))
                self._sleep(delay)
        reason = str(last) if last is not None else "interrupted"
        if last is not None and _pending(last):
            reason += " (if it stays pending, `crossmodal reconcile` repairs it)"
        return Outcome(record.key, "failed", item.sha256, error=reason)


def _pending(exc: GatewayError) -> bool:
    """The item is being indexed elsewhere: worth asking again in a moment."""
    return exc.code == "duplicate_pending" or (
        exc.code == "item_not_indexed" and exc.body.get("item_status") == "pending"
    )
