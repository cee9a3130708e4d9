"""The soak's 2-minute version (`make soak` runs 30): the whole stack under the mixed workload at
30 % of the capacity it measures, through ``benchmarks.soak.main``.

Its verdict must not depend on the processor or the machine's speed, so it holds the stack to
what any machine must give: no 5xx, no transport error, every kind answered successfully, the
ingest window keeping the collection's size, memory measured. The soak's own goals (p99 drift,
memory growth) are benchmark figures for a 30-minute run, reported, not asserted here."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.loadgen import MIX_KINDS
from benchmarks.soak import SERVICES, main

MINUTES = 2
WINDOW = 20  # small: even a slow machine ingests past it in two minutes, so deletes happen
AT_LEAST = 20  # successful answers of each kind (a slow machine sends a few hundred slots)


def test_two_minutes_of_mixed_load_answer_without_errors(
    random_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "soak.json"
    argv = [
        "--minutes", str(MINUTES), "--load", "0.3", "--capacity-seconds", "6",
        "--prime-seconds", "2", "--window", str(WINDOW), "--model", str(random_model_dir),
        # float32 on every processor, one torch thread: as the other end-to-end tests.
        "--feature-runtime", "torch", "--env", "FEATURE_TORCH_THREADS=1",
        "--data-dir", str(tmp_path / "data"), "--out", str(out), "--keep-collection",
    ]  # fmt: skip
    code = main(argv)
    result = json.loads(out.read_text())
    assert code == (0 if result["goals_met"] else 1)
    assert "## Soak" in out.with_suffix(".md").read_text()

    assert result["server_errors"] == 0, result["kinds"]
    assert result["transport_errors"] == 0, result["kinds"]
    assert result["capacity"]["slots_per_s"] > 0
    assert result["target_rate"] == result["capacity"]["slots_per_s"] * 0.3
    kinds = {k["kind"]: k for k in result["kinds"]}
    for kind in (*MIX_KINDS, "delete"):
        assert kinds[kind]["ok"] >= AT_LEAST, kinds[kind]
        assert kinds[kind]["ok"] == kinds[kind]["requests"], kinds[kind]
    for kind in ("text-hit", "image-hit"):
        assert kinds[kind]["x_cache"].get("hit", 0) >= AT_LEAST, kinds[kind]
    # The window kept the collection at its size: every ingest past it deleted the oldest item.
    collection = result["ingest_collection"]
    assert collection["items"] == WINDOW, collection
    assert sum(collection["counts"].values()) == WINDOW, collection
    # Memory was measured for every service after the warm-up and at the end (not judged here).
    for name in SERVICES:
        memory = result["memory"][name]
        assert memory["after_warmup_kib"] > 0 and memory["end_kib"] > 0
        assert memory["end_s"] > memory["at_s"] >= result["warmup_s"]
    assert len(result["p99_windows_s"]) == 2
