"""The feature service's own Prometheus metrics (the request metrics every service has are in
``shared.metrics``). Inference is measured per forward pass, which under load is one batch of
several requests' inputs."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INFERENCE_MS = Gauge(
    "multimodal_model_inference_ms",
    "Duration of the most recent forward pass (one batch), in milliseconds (the tutorial's gauge; "
    "feature_input_inference_seconds is the distribution).",
)
INFERENCE_SECONDS = Histogram(
    "feature_inference_seconds",
    "Duration of each forward pass (one batch, preprocessing of the batch included), by modality.",
    ["modality"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INPUT_INFERENCE_SECONDS = Histogram(
    "feature_input_inference_seconds",
    "Duration of the forward pass each input went through, counted once per input (an input of "
    "a batch of 8 counts the whole pass), by modality; ModelInferenceSlow alerts on its p95.",
    ["modality"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "feature_batch_size",
    "Inputs per forward pass, by modality: above 1 when concurrent requests were merged.",
    ["modality"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_WAIT = Counter(
    "feature_batch_wait_seconds",
    "Seconds forward passes were held back for inputs admitted and still being prepared (up to "
    "max_wait_ms), by modality; 0 for a lone request and for inputs queued during a pass.",
    ["modality"],
)
QUEUE_DEPTH = Gauge(
    "feature_queue_depth",
    "Inputs waiting for a forward pass, by modality.",
    ["modality"],
)
ADMITTED = Gauge(
    "feature_admitted_inputs",
    "Inputs admitted and not yet answered (decoding, waiting or in a pass), by modality; "
    "requests beyond max_queue get 503 overloaded.",
    ["modality"],
)
ERRORS = Counter(
    "feature_errors_total",
    "Requests answered with a problem, by route template and problem code.",
    ["endpoint", "code"],
)


def observe_batch(modality: str, size: int, seconds: float, waited: float = 0.0) -> None:
    INFERENCE_MS.set(seconds * 1000)
    BATCH_WAIT.labels(modality).inc(waited)
    INFERENCE_SECONDS.labels(modality).observe(seconds)
    per_input = INPUT_INFERENCE_SECONDS.labels(modality)
    for _ in range(size):
        per_input.observe(seconds)
    BATCH_SIZE.labels(modality).observe(size)


# Every modality's series exists from the first scrape at 0: a series born with its first batch
# already counted has no increase in Prometheus, so a rate over it reads 0 and its quantiles NaN
# until the next batch.
for _modality in ("text", "image"):
    for _family in (INFERENCE_SECONDS, INPUT_INFERENCE_SECONDS, BATCH_SIZE, BATCH_WAIT):
        _family.labels(_modality)
