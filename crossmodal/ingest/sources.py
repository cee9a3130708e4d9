"""What ``crossmodal index`` reads: a folder of images, a COCO captions file, or a JSONL/CSV
manifest, each turned into the same ``IngestRecord`` list.

- Folder: every image below it (recursively, hidden files and folders skipped, in path order).
  A sidecar beside an image gives its captions: ``photo.txt`` / ``photo.jpg.txt`` (one caption per
  non-blank line) or ``photo.json`` / ``photo.jpg.json``
  (``{"captions": [...], "attributes": {...}, "tags": [...]}``).
- COCO: the official ``annotations/captions_*.json`` (``images`` + ``annotations``), or the
  simpler list ``[{"image_id": ..., "captions": [...]}]``; image files are looked up under
  ``images_root`` (for ``annotations/captions_val2017.json``, ``val2017/`` beside ``annotations/``
  when it exists).
- JSONL: one object per line with ``image`` (or ``path``/``file``/``url``/``uri``), ``captions``
  (or ``caption``), ``attributes``, ``tags``. Relative paths are relative to the manifest.
- CSV: a header row with an image column (same names), ``captions`` and ``tags`` separated by
  ``|``; every other non-empty column is an attribute (integers and decimals become numbers).

The same image may come more than once: the same file listed twice, or byte-identical files. Every
record is kept; the pipeline merges what a duplicate brings into the item (``mark_repeats`` gives
a repeated source a key of its own for the journal).

A manifest is untrusted input, and the indexing machine uploads whatever file it names: every
local path must stay inside the folder it is read against (the manifest's folder, the COCO images
root, or the folder indexed), after ``..`` and symbolic links are resolved, unless
``allow_outside`` is set (``crossmodal index --allow-outside``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif"}
)
IMAGE_KEYS = ("image", "path", "file", "file_name", "url", "uri")
Format = Literal["auto", "folder", "coco", "jsonl", "csv"]
_INTEGER = re.compile(r"^-?(0|[1-9]\d{0,17})$")
_DECIMAL = re.compile(r"^-?(0|[1-9]\d*)\.\d+$")


class SourceError(ValueError):
    """The input cannot be read as the format it claims; says where."""


@dataclass(frozen=True)
class IngestRecord:
    """One image to index: a local path or an http(s) URL, with what to store beside it."""

    source: str
    captions: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    # For a source listed again: a digest of what this record brings (``mark_repeats``).
    repeat: str = ""

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    @property
    def brings(self) -> bool:
        """Whether the record has anything to store beside its image."""
        return bool(self.captions or self.tags or self.attributes)

    @property
    def key(self) -> str:
        """What the journal remembers the record by: the source, and for a source listed
        again, what that record brings."""
        return f"{self.source}#repeat-{self.repeat}" if self.repeat else self.source

    @property
    def source_uri(self) -> str | None:
        """What the item records as its origin: the URL; none for a local file (the server
        keeps only links a reader may follow, never ``file:`` paths of the indexing machine)."""
        return self.source if self.is_url else None


def _is_url(text: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text))


@dataclass(frozen=True)
class SourceFolder:
    """The folder a source's local paths are read against, and whether they may leave it."""

    root: Path
    allow_outside: bool = False

    @classmethod
    def of(cls, folder: Path, allow_outside: bool = False) -> SourceFolder:
        return cls(folder.resolve(), allow_outside)

    def resolve(self, location: str, where: str) -> str:
        """A URL as is; a path made absolute against the folder, refused if it leaves it."""
        if _is_url(location):
            return location
        path = Path(location).expanduser()
        return str(self.check(path if path.is_absolute() else self.root / path, where))

    def check(self, path: Path, where: str) -> Path:
        """``path`` with ``..`` and symbolic links resolved, if that is inside the folder."""
        resolved = path.resolve()
        if not self.allow_outside and not resolved.is_relative_to(self.root):
            raise SourceError(
                f"{where}: {path} is outside {self.root} (resolved: {resolved}); refused, since "
                "a manifest could name any readable file (pass --allow-outside to index it)"
            )
        return resolved


def _text_list(value: Any, where: str, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v.strip())
    raise SourceError(f"{where}: {what} must be a string or a list of strings")


def _attributes(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SourceError(f"{where}: attributes must be an object")
    return value


def _record_from_object(entry: Any, where: str, base: SourceFolder) -> IngestRecord:
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: expected an object")
    location = next((entry[k] for k in IMAGE_KEYS if isinstance(entry.get(k), str)), None)
    if not location:
        raise SourceError(f"{where}: no image given (one of {', '.join(IMAGE_KEYS)})")
    captions = _text_list(entry.get("captions"), where, "captions") + _text_list(
        entry.get("caption"), where, "caption"
    )
    return IngestRecord(
        source=base.resolve(location, where),
        captions=captions,
        attributes=_attributes(entry.get("attributes"), where),
        tags=_text_list(entry.get("tags"), where, "tags"),
    )


# --- folder ----------------------------------------------------------------------------------


def _sidecar(image: Path) -> tuple[tuple[str, ...], dict[str, Any], tuple[str, ...]]:
    for candidate in (image.with_name(image.name + ".json"), image.with_suffix(".json")):
        if candidate.is_file():
            where = str(candidate)
            try:
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise SourceError(f"{where}: not valid JSON ({exc})") from None
            if isinstance(data, list):  # a bare list of captions
                return _text_list(data, where, "captions"), {}, ()
            if not isinstance(data, dict):
                raise SourceError(f"{where}: expected an object or a list of captions")
            captions = _text_list(data.get("captions"), where, "captions") + _text_list(
                data.get("caption"), where, "caption"
            )
            return (
                captions,
                _attributes(data.get("attributes"), where),
                _text_list(data.get("tags"), where, "tags"),
            )
    for candidate in (image.with_name(image.name + ".txt"), image.with_suffix(".txt")):
        if candidate.is_file():
            lines = candidate.read_text(encoding="utf-8", errors="replace").splitlines()
            return tuple(line.strip() for line in lines if line.strip()), {}, ()
    return (), {}, ()


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            yield path


def read_folder(root: Path, *, allow_outside: bool = False) -> list[IngestRecord]:
    folder = SourceFolder.of(root, allow_outside)
    root = folder.root
    records = []
    for image in _walk(root):
        folder.check(image, str(root))  # a symbolic link out of the folder
        captions, attributes, tags = _sidecar(image)
        records.append(IngestRecord(str(image), captions, attributes, tags))
    return records


# --- COCO ------------------------------------------------------------------------------------


def default_images_root(annotations: Path) -> Path:
    """``…/annotations/captions_val2017.json`` → ``…/val2017`` if that folder exists."""
    match = re.match(r"^captions_(.+)\.json$", annotations.name)
    if match and annotations.parent.name == "annotations":
        candidate = annotations.parent.parent / match.group(1)
        if candidate.is_dir():
            return candidate
    return annotations.parent


def _image_index(folder: SourceFolder) -> dict[str, Path]:
    """Image files under the folder by stem, and by number for zero-padded COCO names."""
    index: dict[str, Path] = {}
    if not folder.root.is_dir():
        return index
    for path in _walk(folder.root):
        folder.check(path, str(folder.root))
        index.setdefault(path.stem, path)
        if path.stem.isdigit():
            index.setdefault(str(int(path.stem)), path)
    return index


def read_coco(
    path: Path, images_root: Path | None = None, *, allow_outside: bool = False
) -> list[IngestRecord]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    root = SourceFolder.of(images_root or default_images_root(path), allow_outside)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        return _read_coco_official(data, path, root)
    if isinstance(data, list):
        return _read_coco_list(data, path, root)
    raise SourceError(
        f"{path}: neither COCO captions ({{'images', 'annotations'}}) nor a list of "
        "{'image_id', 'captions'} or manifest objects"
    )


def _read_coco_official(data: dict[str, Any], path: Path, root: SourceFolder) -> list[IngestRecord]:
    captions: dict[Any, list[str]] = {}
    for i, annotation in enumerate(data.get("annotations") or []):
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            raise SourceError(f"{path}: annotations[{i}] has no image_id")
        text = annotation.get("caption")
        if isinstance(text, str) and text.strip():
            captions.setdefault(annotation["image_id"], []).append(text.strip())
    records = []
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise SourceError(f"{path}: images[{i}] needs id and file_name")
        records.append(
            IngestRecord(
                source=root.resolve(str(image["file_name"]), f"{path}: images[{i}]"),
                captions=tuple(captions.get(image["id"], ())),
                attributes={"coco_id": image["id"]},
            )
        )
    return records


def _read_coco_list(data: list[Any], path: Path, root: SourceFolder) -> list[IngestRecord]:
    index: dict[str, Path] | None = None
    records = []
    for i, entry in enumerate(data):
        where = f"{path}[{i}]"
        if (
            isinstance(entry, dict)
            and "image_id" not in entry
            and any(k in entry for k in IMAGE_KEYS)
        ):
            # A manifest written as one JSON array (the emoji demo's manifest.json): the
            # objects of a JSONL manifest, image paths relative to the images root.
            records.append(_record_from_object(entry, where, root))
            continue
        if not isinstance(entry, dict) or "image_id" not in entry:
            raise SourceError(
                f"{where}: expected {{'image_id', 'captions'}} or a manifest object with "
                f"one of {', '.join(IMAGE_KEYS)}"
            )
        image_id = entry["image_id"]
        explicit = next((entry[k] for k in IMAGE_KEYS if isinstance(entry.get(k), str)), None)
        if explicit is None and isinstance(image_id, str) and Path(image_id).suffix:
            explicit = image_id  # the id is a file name
        if explicit is not None:
            source = root.resolve(explicit, where)
        else:
            if index is None:
                index = _image_index(root)
            found = index.get(str(image_id))
            if found is None:
                raise SourceError(
                    f"{where}: no image file for image_id {image_id!r} in {root.root}"
                )
            source = str(found)
        records.append(
            IngestRecord(
                source=source,
                captions=_text_list(entry.get("captions"), where, "captions")
                + _text_list(entry.get("caption"), where, "caption"),
                attributes={"image_id": image_id, **_attributes(entry.get("attributes"), where)},
                tags=_text_list(entry.get("tags"), where, "tags"),
            )
        )
    return records


# --- manifests ---------------------------------------------------------------------------------


def read_jsonl(path: Path, *, allow_outside: bool = False) -> list[IngestRecord]:
    base = SourceFolder.of(path.parent, allow_outside)
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise SourceError(f"{path}:{number}: not valid JSON ({exc})") from None
            records.append(_record_from_object(entry, f"{path}:{number}", base))
    return records


def _typed(value: str) -> Any:
    # Only unambiguous numbers: "02134" (a postcode) stays text, "1e3" too.
    if _INTEGER.fullmatch(value):
        return int(value)
    if _DECIMAL.fullmatch(value):
        return float(value)
    return value


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split("|") if part.strip())


def read_csv(path: Path, *, allow_outside: bool = False) -> list[IngestRecord]:
    base = SourceFolder.of(path.parent, allow_outside)
    records = []
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        image_column = next((k for k in IMAGE_KEYS if k in fields), None)
        if image_column is None:
            raise SourceError(f"{path}: the header needs an image column ({', '.join(IMAGE_KEYS)})")
        reserved = {image_column, "captions", "caption", "tags"}
        for number, row in enumerate(reader, start=2):
            location = (row.get(image_column) or "").strip()
            if not location:
                raise SourceError(f"{path}:{number}: the {image_column} column is empty")
            captions = _split(row.get("captions")) + tuple(
                c for c in [(row.get("caption") or "").strip()] if c
            )
            attributes = {
                key: _typed(value.strip())
                for key, value in row.items()
                if key and key not in reserved and value is not None and value.strip()
            }
            records.append(
                IngestRecord(
                    source=base.resolve(location, f"{path}:{number}"),
                    captions=captions,
                    attributes=attributes,
                    tags=_split(row.get("tags")),
                )
            )
    return records


# --- dispatch ---------------------------------------------------------------------------------


def detect_format(path: Path) -> Format:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        return "coco"
    raise SourceError(f"{path}: cannot tell its format; pass --format folder, coco, jsonl or csv")


def load_records(
    path: Path,
    fmt: Format = "auto",
    *,
    images_root: Path | None = None,
    allow_outside: bool = False,
) -> list[IngestRecord]:
    """Every record of ``path`` read as ``fmt`` (detected from the path when ``auto``); local
    paths outside the source's folder are refused unless ``allow_outside``."""
    if not path.exists():
        raise SourceError(f"{path} does not exist")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "folder":
        if not path.is_dir():
            raise SourceError(f"{path} is not a folder")
        return read_folder(path, allow_outside=allow_outside)
    if fmt == "coco":
        return read_coco(path, images_root, allow_outside=allow_outside)
    if fmt == "jsonl":
        return read_jsonl(path, allow_outside=allow_outside)
    return read_csv(path, allow_outside=allow_outside)


def with_tags(records: Iterable[IngestRecord], tags: Iterable[str]) -> list[IngestRecord]:
    """Records with ``tags`` added to each (``crossmodal index --tag``)."""
    extra = tuple(tags)
    if not extra:
        return list(records)
    return [dataclasses.replace(r, tags=tuple(dict.fromkeys(r.tags + extra))) for r in records]


def mark_repeats(records: Iterable[IngestRecord]) -> list[IngestRecord]:
    """The records, each source's first as it is and every later one of the same source with
    a ``repeat`` digest of its captions, tags and attributes: a key of its own, so that the
    journal tells it from the first (and a repeat whose content changed is new to it). Repeats
    that bring the same share that key, and are one record."""
    seen: set[str] = set()
    marked = []
    for record in records:
        if record.source in seen:
            content = json.dumps(
                [record.captions, record.tags, record.attributes],
                ensure_ascii=False,
                sort_keys=True,
                default=str,
            )
            digest = hashlib.sha256(content.encode("utf-8", "surrogatepass")).hexdigest()[:12]
            record = dataclasses.replace(record, repeat=digest)
        else:
            seen.add(record.source)
        marked.append(record)
    return marked
