"""The retrieval service: per-collection image and text vectors with a Faiss index, made
durable by a write-ahead log and snapshots."""
