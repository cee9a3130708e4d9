"""The readers behind ``crossmodal index``: folders with sidecars, COCO files, JSONL and CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmodal.ingest.sources import (
    IngestRecord,
    SourceError,
    detect_format,
    load_records,
    mark_repeats,
    with_tags,
)


def touch(path: Path, data: bytes = b"\x89PNG fake") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_recursive_with_sidecars(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    touch(root / "b.jpg")
    (root / "b.txt").write_text("a beach\n\n  sunset over the sea  \n")
    touch(root / "sub" / "a.PNG")
    (root / "sub" / "a.PNG.json").write_text(
        json.dumps({"captions": ["a cat"], "attributes": {"year": 2020}, "tags": ["pet"]})
    )
    touch(root / "sub" / "deeper" / "c.webp")
    (root / "sub" / "deeper" / "c.json").write_text(json.dumps(["one", "two"]))
    touch(root / "notes.txt")  # not an image
    touch(root / ".hidden.jpg")
    touch(root / ".cache" / "x.jpg")

    records = load_records(root)
    assert [Path(r.source).relative_to(root.resolve()).as_posix() for r in records] == [
        "b.jpg",
        "sub/a.PNG",
        "sub/deeper/c.webp",
    ]
    b, a, c = records
    assert b.captions == ("a beach", "sunset over the sea")
    assert a.captions == ("a cat",) and a.attributes == {"year": 2020} and a.tags == ("pet",)
    assert c.captions == ("one", "two")
    assert all(Path(r.source).is_absolute() and not r.is_url for r in records)
    assert b.source_uri is None  # a local path is no origin a reader could follow


def test_bad_sidecar_names_its_file(tmp_path: Path) -> None:
    touch(tmp_path / "a.jpg")
    (tmp_path / "a.json").write_text("{nope")
    with pytest.raises(SourceError, match=r"a\.json"):
        load_records(tmp_path)


def test_coco_official_format(tmp_path: Path) -> None:
    touch(tmp_path / "val2017" / "000000000139.jpg")
    touch(tmp_path / "val2017" / "000000000285.jpg")
    annotations = tmp_path / "annotations" / "captions_val2017.json"
    annotations.parent.mkdir()
    annotations.write_text(
        json.dumps(
            {
                "info": {},
                "images": [
                    {"id": 139, "file_name": "000000000139.jpg", "width": 640, "height": 426},
                    {"id": 285, "file_name": "000000000285.jpg"},
                ],
                "annotations": [
                    {"id": 1, "image_id": 139, "caption": "A woman in a kitchen."},
                    {"id": 2, "image_id": 285, "caption": "A big brown bear."},
                    {"id": 3, "image_id": 139, "caption": " A room with chairs. "},
                ],
            }
        )
    )
    records = load_records(annotations)
    assert [Path(r.source).name for r in records] == ["000000000139.jpg", "000000000285.jpg"]
    # The images root is guessed: val2017/ beside annotations/.
    assert Path(records[0].source).parent == (tmp_path / "val2017").resolve()
    assert records[0].captions == ("A woman in a kitchen.", "A room with chairs.")
    assert records[0].attributes == {"coco_id": 139}
    assert records[1].captions == ("A big brown bear.",)


def test_coco_simple_list(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    touch(images / "000000000139.jpg")
    touch(images / "cat.png")
    listing = tmp_path / "captions.json"
    listing.write_text(
        json.dumps(
            [
                {"image_id": 139, "captions": ["a kitchen", "a woman cooking"]},
                {"image_id": "cat", "captions": ["a cat"], "tags": ["pet"]},
                {"image_id": "dog.jpg", "caption": "a dog"},
            ]
        )
    )
    records = load_records(listing, images_root=images)
    assert [Path(r.source).name for r in records] == ["000000000139.jpg", "cat.png", "dog.jpg"]
    assert records[0].captions == ("a kitchen", "a woman cooking")
    assert records[0].attributes == {"image_id": 139}
    assert records[1].tags == ("pet",)
    assert records[2].captions == ("a dog",)

    listing.write_text(json.dumps([{"image_id": 999, "captions": ["?"]}]))
    with pytest.raises(SourceError, match="999"):
        load_records(listing, images_root=images)
    listing.write_text(json.dumps({"something": "else"}))
    with pytest.raises(SourceError, match="neither COCO"):
        load_records(listing)
    listing.write_text(json.dumps([{"captions": ["no image"]}]))
    with pytest.raises(SourceError, match="manifest object"):
        load_records(listing)


def test_json_array_manifest_reads_like_jsonl(tmp_path: Path) -> None:
    """The emoji demo's manifest.json: JSONL's objects as one array, paths under the file's
    folder (or --images-root)."""
    listing = tmp_path / "manifest.json"
    listing.write_text(
        json.dumps(
            [
                {"file": "1f355.png", "captions": ["pizza"], "attributes": {"emoji": "🍕"}},
                {"image": "sub/b.jpg", "caption": "b", "tags": ["t"]},
            ]
        )
    )
    records = load_records(listing)
    assert [r.source for r in records] == [
        str(tmp_path.resolve() / "1f355.png"),
        str(tmp_path.resolve() / "sub" / "b.jpg"),
    ]
    assert records[0].captions == ("pizza",)
    assert records[0].attributes == {"emoji": "🍕"}
    assert records[1].tags == ("t",)
    assert load_records(listing, images_root=tmp_path / "x")[0].source == str(
        (tmp_path / "x").resolve() / "1f355.png"
    )


def test_jsonl_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "m" / "items.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(
        "\n".join(
            [
                json.dumps({"image": "pics/a.jpg", "captions": ["a"], "attributes": {"sku": 1}}),
                "",
                json.dumps({"url": "https://example.com/b.png", "caption": "b", "tags": ["x"]}),
                json.dumps({"path": str(tmp_path / "m" / "abs.png")}),
            ]
        )
    )
    records = load_records(manifest)
    assert records[0].source == str((tmp_path / "m" / "pics" / "a.jpg").resolve())
    assert records[0].attributes == {"sku": 1}
    assert records[1] == IngestRecord("https://example.com/b.png", ("b",), {}, ("x",))
    assert records[1].is_url and records[1].source_uri == "https://example.com/b.png"
    assert records[2].source == str((tmp_path / "m" / "abs.png").resolve())

    manifest.write_text(json.dumps({"image": "a.jpg"}) + "\n{broken\n")
    with pytest.raises(SourceError, match=r"items.jsonl:2"):
        load_records(manifest)
    manifest.write_text(json.dumps({"captions": ["no image"]}) + "\n")
    with pytest.raises(SourceError, match=r"items.jsonl:1: no image"):
        load_records(manifest)
    manifest.write_text(json.dumps({"image": "a.jpg", "captions": [1, 2]}) + "\n")
    with pytest.raises(SourceError, match="captions must be"):
        load_records(manifest)


def test_csv_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "catalogue.csv"
    manifest.write_text(
        "image,captions,tags,sku,price,zip,colour\n"
        "a.jpg,a red shirt|cotton shirt,sale|summer,1001,19.90,02134,red\n"
        "https://example.com/b.jpg,,,1002,,,\n"
    )
    first, second = load_records(manifest)
    assert first.source == str((tmp_path / "a.jpg").resolve())
    assert first.captions == ("a red shirt", "cotton shirt")
    assert first.tags == ("sale", "summer")
    # Unambiguous numbers become numbers; a leading zero keeps a postcode text.
    assert first.attributes == {"sku": 1001, "price": 19.9, "zip": "02134", "colour": "red"}
    assert second.source == "https://example.com/b.jpg"
    assert second.captions == () and second.attributes == {"sku": 1002}

    manifest.write_text("name,caption\nx,y\n")
    with pytest.raises(SourceError, match="image column"):
        load_records(manifest)
    manifest.write_text("image,caption\n,y\n")
    with pytest.raises(SourceError, match=r"catalogue.csv:2"):
        load_records(manifest)


def escapes(tmp_path: Path, folder: Path) -> dict[str, str]:
    """Ways a manifest in ``folder`` can name a file outside it."""
    secret = touch(tmp_path / "outside" / "secret.png")
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "link.png").symlink_to(secret)
    (folder / "linked-dir").symlink_to(secret.parent, target_is_directory=True)
    return {
        "parent": "../outside/secret.png",
        "deep parent": "sub/../../../" + "../" * 10 + str(secret).lstrip("/"),
        "absolute": str(secret),
        "home": "~/secret.png",
        "symlink": "link.png",
        "symlinked folder": "linked-dir/secret.png",
    }


def test_manifest_paths_must_stay_in_the_manifest_folder(tmp_path: Path) -> None:
    folder = tmp_path / "upload"
    inside = touch(folder / "ok.png")
    for name, location in escapes(tmp_path, folder).items():
        for manifest, text in (
            (folder / "m.jsonl", json.dumps({"image": location}) + "\n"),
            (folder / "m.csv", f"image\n{location}\n"),
            (folder / "manifest.json", json.dumps([{"file": location}])),
            (folder / "coco.json", json.dumps({"images": [{"id": 1, "file_name": location}]})),
        ):
            manifest.write_text(text)
            with pytest.raises(SourceError, match=r"outside .*--allow-outside") as refused:
                load_records(manifest)
            assert manifest.name in str(refused.value), name
            (record,) = load_records(manifest, allow_outside=True)
            if name != "home":
                assert record.source == str((tmp_path / "outside/secret.png").resolve()), name
        # A path inside the folder, even written absolute or through "..", is fine.
        for location in (str(inside), "sub/../ok.png"):
            (folder / "m.jsonl").write_text(json.dumps({"image": location}) + "\n")
            assert [r.source for r in load_records(folder / "m.jsonl")] == [str(inside.resolve())]


def test_images_root_and_folders_keep_their_files_inside(tmp_path: Path) -> None:
    images = tmp_path / "images"
    escapes(tmp_path, images)
    listing = tmp_path / "captions.json"
    listing.write_text(json.dumps([{"image_id": "x.png", "caption": "x"}]))
    touch(images / "x.png")
    assert load_records(listing, images_root=images)[0].source == str((images / "x.png").resolve())
    listing.write_text(json.dumps([{"image_id": "../outside/secret.png", "caption": "x"}]))
    with pytest.raises(SourceError, match="outside"):
        load_records(listing, images_root=images)
    # Matched by stem in a walk of the images root: the symbolic link is found and refused.
    listing.write_text(json.dumps([{"image_id": "link", "caption": "x"}]))
    with pytest.raises(SourceError, match="outside"):
        load_records(listing, images_root=images)

    # A folder indexed: a symbolic link out of it is refused too, unless allowed.
    with pytest.raises(SourceError, match=r"link\.png is outside"):
        load_records(images)
    allowed = load_records(images, allow_outside=True)
    assert sorted(Path(r.source).relative_to(images).as_posix() for r in allowed) == [
        "link.png",
        "linked-dir/secret.png",
        "x.png",
    ]


def test_format_detection(tmp_path: Path) -> None:
    assert detect_format(tmp_path) == "folder"
    assert detect_format(tmp_path / "x.jsonl") == "jsonl"
    assert detect_format(tmp_path / "x.ndjson") == "jsonl"
    assert detect_format(tmp_path / "x.CSV") == "csv"
    assert detect_format(tmp_path / "captions_train2017.json") == "coco"
    with pytest.raises(SourceError, match="--format"):
        detect_format(tmp_path / "x.parquet")
    with pytest.raises(SourceError, match="does not exist"):
        load_records(tmp_path / "missing")


def test_with_tags_adds_once() -> None:
    records = [IngestRecord("a", tags=("x",)), IngestRecord("b")]
    assert [r.tags for r in with_tags(records, ["x", "y"])] == [("x", "y"), ("x", "y")]
    assert with_tags(records, []) == records


def test_a_repeated_source_gets_a_key_of_its_own_per_content() -> None:
    records = [
        IngestRecord("a.png", ("flag: France",), {"emoji": "FR"}),
        IngestRecord("b.png", ("other",)),
        IngestRecord("a.png", ("flag: St. Martin",)),
        IngestRecord("a.png", ("flag: St. Martin",)),
        IngestRecord("a.png", ("flag: St. Martin",), {"emoji": "MF"}),
    ]
    marked = mark_repeats(records)
    keys = [r.key for r in marked]
    # The first of a source keeps its plain key (journals of earlier runs still match it).
    assert keys[:2] == ["a.png", "b.png"]
    assert all(k.startswith("a.png#repeat-") for k in keys[2:])
    # Repeats that bring the same are one record; another content is another key.
    assert keys[2] == keys[3] != keys[4]
    assert [r.captions for r in marked] == [r.captions for r in records]
    assert mark_repeats(marked) == marked
    assert with_tags(marked, ["x"])[2].key == keys[2]  # tags added later keep the key
