"""The single-process baseline of ``benchmarks/e2e.py``: the tutorial's shape of a search API.

One process, one FastAPI app: per request, the tokenizer (or the image processor) and the model's
forward pass (no batching), a Faiss search, and the item lookup in SQLite, served by
``async def`` routes as the tutorial writes them (so one request is computed at a time). It
reads what the benchmark built for the five services: the model folder, the newest snapshot of
the retrieval collection (the same Faiss index file and stored rows) and the metadata database.

The tutorial's code is taken as a feature list, not copied: no token check, no cache, no rate
limit, no filters (the services' figures are measured with the cache missing, and with their rate
limits set out of reach). The search does what the retrieval service does for an unfiltered
query, so both do the same arithmetic: fetch ``top_k * 4`` candidates (HNSW at depth
max(128, fetch)) and re-score them exactly against the stored rows.

    python -m benchmarks.baseline_app --model DIR --data-dir DIR --collection NAME --port N
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

# At module level: FastAPI resolves the routes' (postponed) annotations in this module's globals.
from fastapi import FastAPI, File, Form, UploadFile
from pydantic import BaseModel

RESCORE_FACTOR = 4
EF_SEARCH = 128


class Engine:
    """Model, index and item lookup; everything a request needs, loaded once."""

    def __init__(self, model: Path, data_dir: Path, collection: str, threads: int) -> None:
        import faiss
        import numpy as np
        import torch
        from transformers import AutoModel, AutoProcessor

        from services.retrieval import snapshots

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(1)  # the retrieval service's default (RETRIEVAL_FAISS_THREADS)
        self.model = AutoModel.from_pretrained(str(model)).eval()
        self.processor = AutoProcessor.from_pretrained(str(model))
        folder = data_dir / "retrieval" / collection
        snapshot = snapshots.snapshot_dir(folder, max(snapshots.generations(folder)))
        manifest = json.loads((snapshot / snapshots.MANIFEST).read_text())
        info = manifest["sets"]["image"]
        self.dim = int(manifest["dim"])
        self.index = faiss.read_index(str(snapshot / "image.index"))
        self.ids = np.load(snapshot / "image.ids.npy")
        # The stored rows in memory, as the retrieval service holds them.
        self.rows = np.fromfile(snapshot / "image.vectors", dtype=info["dtype"]).reshape(
            -1, self.dim
        )
        self.row_of = {int(i): r for r, i in enumerate(self.ids.tolist())}
        self.hnsw = "HNSW" in (info.get("factory") or "")
        # One connection per process; check_same_thread=False since uvicorn may hand requests
        # to another thread than the one that loaded it.
        db = data_dir / "metadata" / "metadata.db"
        self.db = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
        self.collection = collection

    def _normalised(self, features: Any) -> Any:
        from services.feature.model import pooled

        features = pooled(features)
        return (features / features.norm(dim=-1, keepdim=True)).numpy().astype("float32")

    def embed_text(self, text: str) -> Any:
        import torch

        inputs = self.processor(text=[text], return_tensors="pt", padding=True, truncation=True)
        with torch.no_grad():
            return self._normalised(self.model.get_text_features(**inputs))

    def embed_image(self, blob: bytes) -> Any:
        import torch
        from PIL import Image

        image = Image.open(io.BytesIO(blob)).convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt")
        with torch.no_grad():
            return self._normalised(self.model.get_image_features(**inputs))

    def search(self, query: Any, top_k: int) -> list[tuple[int, float]]:
        import faiss
        import numpy as np

        fetch = min(top_k * RESCORE_FACTOR, len(self.ids))
        if self.hnsw:
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(EF_SEARCH, fetch)
            _, labels = self.index.search(query, fetch, params=params)
        else:
            _, labels = self.index.search(query, fetch)
        candidates = np.array([i for i in labels[0].tolist() if i >= 0], dtype=np.int64)
        rows = np.array([self.row_of[int(i)] for i in candidates], dtype=np.int64)
        scores = self.rows[rows].astype(np.float32) @ query[0]
        order = np.argsort(-scores)[:top_k]
        return [(int(candidates[o]), float(scores[o])) for o in order]

    def items(self, ids: list[int]) -> dict[int, dict[str, Any]]:
        marks = ",".join("?" * len(ids))
        found: dict[int, dict[str, Any]] = {}
        for row in self.db.execute(
            "SELECT id, collection, status, attributes, image_sha256, content_type, created_at, "
            f"updated_at, model_id FROM items WHERE id IN ({marks}) AND status = 'indexed'",
            ids,
        ):
            found[row[0]] = {
                "id": row[0],
                "collection": row[1],
                "captions": [],
                "attributes": json.loads(row[3]),
                "status": row[2],
                "image_sha256": row[4],
                "content_type": row[5],
                "created_at": row[6],
                "updated_at": row[7],
                "model_id": row[8],
                "image_url": f"/items/{row[0]}/image",
            }
        for item_id, caption_id, text in self.db.execute(
            f"SELECT item_id, id, text FROM captions WHERE item_id IN ({marks}) "
            "ORDER BY item_id, position",
            ids,
        ):
            found[item_id]["captions"].append({"id": caption_id, "text": text})
        return found

    def answer(self, query: Any, top_k: int) -> dict[str, Any]:
        hits = self.search(query, top_k)
        items = self.items([i for i, _ in hits])
        results = [
            {"rank": n + 1, "score": score, "item_id": i, "caption": None, "item": items[i]}
            for n, (i, score) in enumerate(h for h in hits if h[0] in items)
        ]
        return {
            "collection": self.collection,
            "target": "image",
            "top_k": top_k,
            "results": results,
        }


class TextQuery(BaseModel):
    query: str
    top_k: int = 10
    target: str = "image"
    collection: str = "demo"


def create_app(engine: Engine) -> FastAPI:
    app = FastAPI(title="tutorial-shaped search (benchmark baseline)")

    # async def with blocking work inside, as in the tutorial: requests are served one at a time.
    @app.post("/search/text")
    async def search_text(body: TextQuery) -> dict[str, Any]:
        return engine.answer(engine.embed_text(body.query), body.top_k)

    @app.post("/search/image")
    async def search_image(
        image: UploadFile = File(...),
        top_k: int = Form(10),
        target: str = Form("image"),
        collection: str = Form("demo"),
    ) -> dict[str, Any]:
        return engine.answer(engine.embed_image(await image.read()), top_k)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baseline_app")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--collection", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (feature: 2)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as services/feature/__main__ does
    import uvicorn

    engine = Engine(args.model, args.data_dir, args.collection, args.threads)
    # Warm-up before answering /healthz: the first forward pass allocates.
    engine.embed_text("warm-up")
    uvicorn.run(
        create_app(engine), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
