"""The ingestion pipeline: resumable after an interruption or a crash without duplicates,
retries, de-duplication by content hash with what duplicates bring merged into their items, the
failure summary.

The "gateway" here is a thin stand-in in front of a real metadata service (SQLite, in process):
POST /items stores the item and marks it indexed, as the gateway's item flow does after the
vectors are durable, and POST /items/{id}/merge is metadata's merge, so duplicates are decided
and merged by the real duplicate policy.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from crossmodal.client import GatewayClient
from crossmodal.ingest import IngestOptions, Ingestor, IngestRecord, Journal, JournalError
from crossmodal.ingest.journal import Entry
from services.metadata.app import create_app
from services.metadata.settings import MetadataSettings
from tests.service_tokens import KEYS, service_headers

COLLECTION = "bulk"


def png(n: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 6), (n % 256, (n * 7) % 256, 99)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeGateway:
    """POST /items → metadata POST /items + PATCH indexed; merges and hashes passed through;
    hooks to fail chosen requests first."""

    def __init__(self, metadata: TestClient, *, hash_lookup: bool = True) -> None:
        self.metadata = metadata
        self.hash_lookup = hash_lookup
        self.posts = 0
        self.merges = 0
        self.lock = threading.Lock()
        self.before_post: Callable[[int], httpx.Response | None] | None = None
        self.before_merge: Callable[[int], httpx.Response | None] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/merge"):
            with self.lock:
                self.merges += 1
                number = self.merges
            injected = self.before_merge(number) if self.before_merge is not None else None
            if injected is not None:
                return injected
            answer = self.metadata.post(
                request.url.path,
                content=request.read(),
                headers={"content-type": "application/json"},
            )
            return httpx.Response(answer.status_code, content=answer.content)
        if request.url.path.endswith("/hashes"):
            if not self.hash_lookup:
                return httpx.Response(404, json={"code": "not_found", "detail": "no route"})
            answer = self.metadata.post(
                request.url.path,
                content=request.read(),
                headers={"content-type": "application/json"},
            )
            return httpx.Response(answer.status_code, content=answer.content)
        assert request.url.path == "/items" and request.method == "POST"
        with self.lock:
            self.posts += 1
            number = self.posts
        if self.before_post is not None:
            injected = self.before_post(number)
            if injected is not None:
                return injected
        answer = self.metadata.post(
            "/items",
            content=request.read(),
            headers={"content-type": request.headers["content-type"]},
        )
        if answer.status_code != 201:
            return httpx.Response(answer.status_code, content=answer.content)
        item = answer.json()
        done = self.metadata.patch(f"/items/{item['id']}", json={"status": "indexed"})
        return httpx.Response(201, content=done.content)


@pytest.fixture
def metadata(tmp_path: Path) -> Iterator[TestClient]:
    settings = MetadataSettings(
        database_url=f"sqlite:///{tmp_path / 'meta.db'}", image_dir=tmp_path / "stored"
    )
    with TestClient(
        create_app(settings, token_keys=KEYS), headers=service_headers("metadata")
    ) as client:
        yield client


@pytest.fixture
def gateway(metadata: TestClient) -> FakeGateway:
    return FakeGateway(metadata)


def client_for(gateway: FakeGateway) -> GatewayClient:
    return GatewayClient("http://gateway.test", token="t", transport=httpx.MockTransport(gateway))


@pytest.fixture
def folder(tmp_path: Path) -> list[IngestRecord]:
    root = tmp_path / "images"
    root.mkdir()
    records = []
    for n in range(12):
        path = root / f"{n:02d}.png"
        path.write_bytes(png(n))
        records.append(
            IngestRecord(str(path), (f"caption {n}",), {"n": n}, ("batch",) if n % 2 else ())
        )
    return records


def items_in(metadata: TestClient) -> list[dict[str, Any]]:
    states = metadata.get(f"/collections/{COLLECTION}/items", params={"limit": 1000})
    return states.json()["items"] if states.status_code == 200 else []


def ingest(
    gateway: FakeGateway,
    records: list[IngestRecord],
    journal_path: Path,
    **options: Any,
) -> Any:
    on_progress = options.pop("on_progress", None)
    with client_for(gateway) as client, Journal(journal_path, COLLECTION) as journal:
        ingestor = Ingestor(
            client,
            IngestOptions(COLLECTION, **{"concurrency": 3, "batch_size": 4, **options}),
            journal,
            on_progress=on_progress,
            sleep=lambda _seconds: None,
        )
        return ingestor.run(records)


def test_everything_is_indexed_once_with_captions_and_attributes(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    report = ingest(gateway, folder, tmp_path / "j.jsonl")
    assert (report.indexed, report.duplicates, report.failures) == (12, 0, [])
    assert not report.interrupted and report.items_per_second > 0
    states = items_in(metadata)
    assert len(states) == 12 and {s["status"] for s in states} == {"indexed"}
    # Uploads run concurrently, so ids follow completion order: find record 3 by its attributes.
    items = [metadata.get(f"/items/{s['id']}").json() for s in states]
    (item,) = [i for i in items if i["attributes"].get("n") == 3]
    assert item["captions"][0]["text"] == "caption 3"
    assert item["attributes"] == {"n": 3} and item["tags"] == ["batch"]
    assert item["source_uri"] is None  # a local file: no origin a reader could follow


def test_interrupted_run_resumes_without_duplicates(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    journal = tmp_path / "j.jsonl"
    seen: list[str] = []

    def ctrl_c_after_five(outcome: Any) -> None:
        seen.append(outcome.key)
        if len(seen) == 5:
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    first = ingest(gateway, folder, journal, on_progress=ctrl_c_after_five)
    assert first.interrupted
    done = first.indexed
    # The uploads in flight when Ctrl-C came were finished and journaled, nothing more started.
    assert 5 <= done < 12
    assert len(items_in(metadata)) == done == gateway.posts

    posts_before = gateway.posts
    second = ingest(gateway, folder, journal)
    assert not second.interrupted
    assert second.resumed == done
    assert (second.indexed, second.duplicates, second.failures) == (12 - done, 0, [])
    # Only the rest was sent: the journal, not the server, skipped the finished ones.
    assert gateway.posts - posts_before == 12 - done
    states = items_in(metadata)
    assert len(states) == 12
    assert len({s["image_sha256"] for s in states}) == 12


def test_a_crash_that_loses_the_journal_tail_still_makes_no_duplicates(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    journal = tmp_path / "j.jsonl"
    ingest(gateway, folder, journal)
    lines = journal.read_text().splitlines()
    # A crash before the last fsync: the last 4 entries never reached the disk, and the line
    # being written was torn in half.
    journal.write_text("\n".join(lines[:-4]) + "\n" + lines[-4][:10])
    gateway.hash_lookup = False  # an older gateway: only the uploads' 409s can tell

    report = ingest(gateway, folder, journal)
    assert (report.indexed, report.duplicates, report.resumed) == (0, 4, 8)
    assert len(items_in(metadata)) == 12
    # Now journaled: a third run sends nothing at all.
    posts = gateway.posts
    third = ingest(gateway, folder, journal)
    assert third.resumed == 12 and gateway.posts == posts


def test_hash_lookup_skips_uploads_of_known_images(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    ingest(gateway, folder[:6], tmp_path / "first.jsonl")
    posts = gateway.posts
    # Another journal (another machine, or a moved folder): the server still knows the hashes.
    report = ingest(gateway, folder, tmp_path / "second.jsonl")
    assert (report.indexed, report.duplicates) == (6, 6)
    assert gateway.posts - posts == 6


def captions_of(metadata: TestClient, item_id: int) -> list[str]:
    return [c["text"] for c in metadata.get(f"/items/{item_id}").json()["captions"]]


def test_same_bytes_twice_in_the_input(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    copy = Path(folder[0].source).with_name("copy-of-00.png")
    copy.write_bytes(Path(folder[0].source).read_bytes())
    records = [*folder[:3], IngestRecord(str(copy), ("another caption",))]
    report = ingest(gateway, records, tmp_path / "j.jsonl", concurrency=4, batch_size=10)
    assert (report.indexed, report.merged, report.duplicates) == (3, 1, 0)
    assert len(items_in(metadata)) == 3
    (item,) = [s for s in items_in(metadata) if len(s["caption_ids"]) == 2]
    assert captions_of(metadata, item["id"]) == ["caption 0", "another caption"]


def test_duplicates_merge_what_they_bring_into_their_item(
    gateway: FakeGateway, metadata: TestClient, tmp_path: Path
) -> None:
    # Six flags drawn alike, the same stamp in two folders, a file listed twice: every caption
    # of the input ends up on the item, across batches, and each record is counted once.
    flag = tmp_path / "fr.png"
    flag.write_bytes(png(1))
    (tmp_path / "mf.png").write_bytes(png(1))
    (tmp_path / "copy.png").write_bytes(png(1))
    (tmp_path / "other.png").write_bytes(png(2))
    records = [
        IngestRecord(str(flag), ("flag: France",), {"emoji": "FR"}, ("flag",)),
        IngestRecord(str(tmp_path / "other.png"), ("something else",)),
        IngestRecord(str(tmp_path / "mf.png"), ("flag: St. Martin",), {"emoji": "MF", "n": 2}),
        IngestRecord(str(flag), ("flag: Clipperton",), {}, ("island",)),  # the same path again
        IngestRecord(str(tmp_path / "copy.png")),  # brings nothing
        IngestRecord(str(flag), ("flag: France",), {"emoji": "FR"}, ("flag",)),  # nothing new
    ]
    journal = tmp_path / "j.jsonl"
    report = ingest(gateway, records, journal, concurrency=2, batch_size=2)
    assert (report.indexed, report.merged, report.duplicates, report.failures) == (2, 2, 2, [])
    assert report.total == 6 and report.resumed == 0
    assert gateway.posts == 2  # duplicates are merged, never uploaded again
    (item,) = [s for s in items_in(metadata) if len(s["caption_ids"]) > 1]
    stored = metadata.get(f"/items/{item['id']}").json()
    assert [c["text"] for c in stored["captions"]] == [
        "flag: France",
        "flag: St. Martin",
        "flag: Clipperton",
    ]
    assert stored["tags"] == ["flag", "island"]
    # The item's value stays; the record's other value is reported, not lost without a word.
    assert stored["attributes"] == {"emoji": "FR", "n": 2}
    (conflict,) = report.conflicts
    assert conflict.key == str(tmp_path / "mf.png") and conflict.item_id == item["id"]
    assert conflict.note == "emoji: kept 'FR', not 'MF'"
    assert "emoji: kept 'FR'" in journal.read_text()

    # Everything is journaled as done: a second run sends nothing.
    posts, merges = gateway.posts, gateway.merges
    again = ingest(gateway, records, journal, concurrency=2, batch_size=2)
    assert again.resumed == 6 and again.processed == 0
    assert (gateway.posts, gateway.merges) == (posts, merges)


def test_a_duplicate_of_an_item_indexed_earlier_is_merged_into_it(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    ingest(gateway, folder[:2], tmp_path / "first.jsonl")
    copy = Path(folder[0].source).with_name("elsewhere.png")
    copy.write_bytes(Path(folder[0].source).read_bytes())
    posts = gateway.posts
    # Another journal, another run: the hash lookup finds the item.
    records = [IngestRecord(str(copy), ("the same picture, filed elsewhere",))]
    report = ingest(gateway, records, tmp_path / "second.jsonl")
    assert (report.indexed, report.merged) == (0, 1) and gateway.posts == posts
    (item,) = [s for s in items_in(metadata) if len(s["caption_ids"]) == 2]
    assert captions_of(metadata, item["id"]) == [
        "caption 0",
        "the same picture, filed elsewhere",
    ]

    # Without the lookup (an older gateway), the upload's 409 names the item to merge into.
    gateway.hash_lookup = False
    records = [IngestRecord(str(copy), ("and once more",))]
    report = ingest(gateway, records, tmp_path / "third.jsonl")
    assert (report.indexed, report.merged, report.failures) == (0, 1, [])
    assert gateway.posts == posts + 1
    assert captions_of(metadata, item["id"])[-1] == "and once more"


def test_a_merge_into_an_item_still_pending_is_retried(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    def pending_once(number: int) -> httpx.Response | None:
        if number == 1:
            body = {"code": "item_not_indexed", "detail": "pending", "item_status": "pending"}
            return httpx.Response(409, json=body)
        return None

    gateway.before_merge = pending_once
    copy = Path(folder[0].source).with_name("again.png")
    copy.write_bytes(Path(folder[0].source).read_bytes())
    records = [folder[0], IngestRecord(str(copy), ("a second caption",))]
    report = ingest(gateway, records, tmp_path / "j.jsonl", retries=2)
    assert (report.indexed, report.merged, report.failures) == (1, 1, [])
    assert gateway.merges == 2

    def always_full(_number: int) -> httpx.Response:
        return httpx.Response(409, json={"code": "item_limit", "detail": "33 captions"})

    gateway.before_merge = always_full
    records = [IngestRecord(str(copy), ("one too many",))]
    report = ingest(gateway, records, tmp_path / "k.jsonl", retries=2)
    (failure,) = report.failures
    assert "item_limit" in (failure.error or "") and gateway.merges == 3  # a 409 is final


def test_a_duplicate_of_a_failed_record_is_uploaded_and_the_failed_one_merges_later(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    def first_fails(number: int) -> httpx.Response | None:
        if number == 1:
            return httpx.Response(422, json={"code": "invalid_caption", "detail": "refused"})
        return None

    gateway.before_post = first_fails
    copy = Path(folder[0].source).with_name("twin.png")
    copy.write_bytes(Path(folder[0].source).read_bytes())
    records = [folder[0], IngestRecord(str(copy), ("the twin",))]
    journal = tmp_path / "j.jsonl"
    report = ingest(gateway, records, journal)
    # The first failed: its twin is uploaded in its own right instead of waiting for it.
    assert (report.indexed, report.merged, len(report.failures)) == (1, 0, 1)
    (item,) = items_in(metadata)
    assert captions_of(metadata, item["id"]) == ["the twin"]

    report = ingest(gateway, records, journal)  # the failure is retried, as a duplicate
    assert (report.resumed, report.merged, report.failures) == (1, 1, [])
    assert captions_of(metadata, item["id"]) == ["the twin", "caption 0"]


def test_passing_failures_are_retried_and_refusals_are_not(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    def flaky(number: int) -> httpx.Response | None:
        if number in (1, 2):
            return httpx.Response(503, json={"code": "feature_unavailable", "detail": "busy"})
        return None

    gateway.before_post = flaky
    report = ingest(gateway, folder[:1], tmp_path / "a.jsonl", concurrency=1, retries=3)
    assert (report.indexed, report.failures) == (1, [])
    assert gateway.posts == 3

    def always_503(_number: int) -> httpx.Response:
        return httpx.Response(503, json={"code": "feature_unavailable", "detail": "busy"})

    gateway.before_post = always_503
    report = ingest(gateway, folder[1:2], tmp_path / "b.jsonl", concurrency=1, retries=2)
    (failure,) = report.failures
    assert "feature_unavailable" in (failure.error or "")
    assert gateway.posts == 3 + 3

    gateway.before_post = None
    bad = IngestRecord(str(Path(folder[2].source)), ("x" * 5000,))  # a caption over the limit
    report = ingest(gateway, [bad], tmp_path / "c.jsonl", retries=3)
    (failure,) = report.failures
    assert "invalid_caption" in (failure.error or "")
    assert gateway.posts == 6 + 1  # a 422 is final


def test_failures_are_summarised_and_retried_on_the_next_run(
    gateway: FakeGateway, metadata: TestClient, folder: list[IngestRecord], tmp_path: Path
) -> None:
    missing = IngestRecord(str(tmp_path / "nowhere.png"), ("lost",))
    broken = Path(folder[0].source).with_name("broken.png")
    broken.write_bytes(b"not an image at all")
    records = [*folder[:2], missing, IngestRecord(str(broken))]
    journal = tmp_path / "j.jsonl"
    report = ingest(gateway, records, journal)
    assert report.indexed == 2
    reasons = {Path(f.key).name: f.error or "" for f in report.failures}
    assert set(reasons) == {"nowhere.png", "broken.png"}
    assert "No such file" in reasons["nowhere.png"]
    assert "invalid_image" in reasons["broken.png"]

    # Fixed in the meantime: the next run retries the failures only.
    Path(missing.source).write_bytes(png(500))
    broken.write_bytes(png(501))
    report = ingest(gateway, records, journal)
    assert (report.resumed, report.indexed, report.failures) == (2, 2, [])


def test_journal_of_another_collection_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    with Journal(path, "one") as journal:
        journal.record(Entry("a", "indexed", "f" * 64, 1))
    with Journal(path, "one") as journal:
        assert journal.is_done("a") and journal.done_hashes() == {"f" * 64: "a"}
    with pytest.raises(JournalError, match="'one'"):
        Journal(path, "two")
