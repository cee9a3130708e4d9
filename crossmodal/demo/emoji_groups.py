"""Unicode's emoji groups and subgroups ("Food & Drink" / "food-prepared"), for the emoji demo
collection's attributes.

Neither the ``emoji`` package nor OpenMoji's font carries them, so ``emoji_groups.json`` beside
this file holds them, derived from Unicode's ``emoji-test.txt`` (Emoji 17.0; © Unicode, Inc.,
Unicode License v3, https://www.unicode.org/license.txt). Only base emoji are listed: a skin-tone
variant has its base's group. Regenerate with
``python -m crossmodal.demo.emoji_groups path/to/emoji-test.txt``.
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path

TABLE = Path(__file__).with_name("emoji_groups.json")
SKIN_TONES = "".join(chr(c) for c in range(0x1F3FB, 0x1F400))
_STRIP = str.maketrans("", "", SKIN_TONES + "\ufe0f")


def concept_key(sequence: str) -> str:
    """The emoji with skin tones and presentation selectors removed: every skin-tone variant
    of an emoji has the same key (👋🏽 and 👋 → 👋; 🕵🏾‍♀️ and 🕵️‍♀️ → 🕵‍♀)."""
    return sequence.translate(_STRIP)


def parse_emoji_test(path: Path) -> dict[str, dict[str, list[str]]]:
    """``{group: {subgroup: [concept keys in Unicode's order]}}`` from ``emoji-test.txt``."""
    groups: dict[str, dict[str, list[str]]] = {}
    group = subgroup = ""
    seen: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (match := re.match(r"^([0-9A-F ]+);\s*fully-qualified\s", line)) and group:
            key = concept_key("".join(chr(int(c, 16)) for c in match.group(1).split()))
            if key not in seen:
                seen.add(key)
                groups.setdefault(group, {}).setdefault(subgroup, []).append(key)
    return groups


@cache
def group_table() -> dict[str, tuple[str, str]]:
    """concept key → (group, subgroup)."""
    data = json.loads(TABLE.read_text(encoding="utf-8"))
    return {
        key: (group, subgroup)
        for group, subgroups in data["groups"].items()
        for subgroup, keys in subgroups.items()
        for key in keys
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    source = Path(argv[0])
    header = source.read_text(encoding="utf-8").splitlines()[:8]
    version = next((h.split(":", 1)[1].strip() for h in header if h.startswith("# Version")), "")
    table = {
        "source": f"Unicode emoji-test.txt, Emoji {version}",
        "notice": "© Unicode, Inc. Unicode License v3: https://www.unicode.org/license.txt",
        "groups": parse_emoji_test(source),
    }
    TABLE.write_text(json.dumps(table, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{TABLE}: {sum(len(k) for s in table['groups'].values() for k in s.values())} keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
