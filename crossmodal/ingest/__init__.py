"""Bulk ingestion for ``crossmodal index``: sources (folders, COCO, manifests), guarded fetching,
the resumable journal and the concurrent upload pipeline."""

from crossmodal.ingest.fetch import FetchError, FetchPolicy, UrlRefused, fetch_url
from crossmodal.ingest.journal import Journal, JournalError, default_journal_path
from crossmodal.ingest.pipeline import IngestOptions, Ingestor, IngestReport, Outcome
from crossmodal.ingest.sources import IngestRecord, SourceError, load_records

__all__ = [
    "FetchError",
    "FetchPolicy",
    "IngestOptions",
    "IngestRecord",
    "IngestReport",
    "Ingestor",
    "Journal",
    "JournalError",
    "Outcome",
    "SourceError",
    "UrlRefused",
    "default_journal_path",
    "fetch_url",
    "load_records",
]
