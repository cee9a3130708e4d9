"""Image–caption records from the annotation formats the project reads.

Three formats, told apart by their content, so one ``--data`` option takes any of them:

- COCO captions (``captions_val2017.json``): ``{"images": [{"id", "file_name"}],
  "annotations": [{"image_id", "caption"}]}``; several captions per image.
- A JSON list, as in the tutorial this project grew from: ``[{"image_id", "captions"}]``
  (file ``<image_id>.jpg``), or with ``"file"``/``"image"`` naming the file, as the demo
  collections' ``manifest.json`` does (``[{"file", "captions", "attributes"}]``).
- JSONL manifests: one such object per line; ``"caption"`` (one string) is accepted too.

Relative file names resolve against ``images_dir`` (default: the annotation file's folder).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class AnnotationError(ValueError):
    """The annotation file is not in any of the supported formats."""


@dataclass(frozen=True)
class ImageRecord:
    """One image and every caption that describes it."""

    key: str
    path: Path
    captions: tuple[str, ...]
    attributes: Mapping[str, Any] = field(default_factory=dict)


def load_records(
    annotations: str | Path, images_dir: str | Path | None = None
) -> list[ImageRecord]:
    """Read ``annotations`` (COCO captions JSON, a JSON list or JSONL) into records, in file
    order. Records without a caption are dropped: they can be neither query nor answer."""
    annotations = Path(annotations)
    base = Path(images_dir) if images_dir is not None else annotations.parent
    text = annotations.read_text(encoding="utf-8")
    if annotations.suffix == ".jsonl":
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        records = _from_entries(entries, base)
    else:
        data = json.loads(text)
        if isinstance(data, dict) and "annotations" in data and "images" in data:
            records = _from_coco(data, base)
        elif isinstance(data, list):
            records = _from_entries(data, base)
        else:
            raise AnnotationError(
                f"{annotations}: expected COCO captions ({{images, annotations}}), "
                "a JSON list of {image_id|file, captions} or a .jsonl manifest"
            )
    return [r for r in records if r.captions]


def _from_coco(data: Mapping[str, Any], base: Path) -> list[ImageRecord]:
    captions: dict[Any, list[str]] = {}
    for annotation in data["annotations"]:
        text = str(annotation.get("caption", "")).strip()
        if text:
            captions.setdefault(annotation["image_id"], []).append(text)
    return [
        ImageRecord(
            key=str(image["id"]),
            path=base / image["file_name"],
            captions=tuple(captions.get(image["id"], ())),
        )
        for image in data["images"]
    ]


def _from_entries(entries: Iterable[Any], base: Path) -> list[ImageRecord]:
    records = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise AnnotationError(f"entry {index} is not an object")
        file = entry.get("file") or entry.get("image") or entry.get("file_name")
        image_id = entry.get("image_id")
        if file is None and image_id is None:
            raise AnnotationError(f"entry {index} names no image (file, image or image_id)")
        if file is None:
            # The tutorial's layout: <images>/<image_id>.jpg
            file = f"{image_id}.jpg"
        raw = entry.get("captions", entry.get("caption", []))
        texts = [raw] if isinstance(raw, str) else list(raw)
        records.append(
            ImageRecord(
                key=str(image_id if image_id is not None else file),
                path=base / str(file),
                captions=tuple(t.strip() for t in texts if isinstance(t, str) and t.strip()),
                attributes=dict(entry.get("attributes") or {}),
            )
        )
    return records


def write_jsonl(records: Iterable[ImageRecord], out: str | Path, images_dir: Path) -> Path:
    """Write ``records`` as a JSONL manifest with file names relative to ``images_dir``."""
    out = Path(out)
    with out.open("w", encoding="utf-8") as handle:
        for record in records:
            entry = {
                "file": str(record.path.relative_to(images_dir)),
                "captions": list(record.captions),
                "attributes": dict(record.attributes),
            }
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return out
