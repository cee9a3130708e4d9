"""Image–caption data for training and evaluation: annotation formats (COCO captions, the
tutorial's JSON list, JSONL manifests), image decoding that skips and counts broken files, and
meaning-preserving augmentation."""

from crossmodal.data.augment import Augment
from crossmodal.data.dataset import Batch, PairDataset
from crossmodal.data.images import SkippedImages, read_image, try_read_image
from crossmodal.data.records import AnnotationError, ImageRecord, load_records, write_jsonl

__all__ = [
    "AnnotationError",
    "Augment",
    "Batch",
    "ImageRecord",
    "PairDataset",
    "SkippedImages",
    "load_records",
    "read_image",
    "try_read_image",
    "write_jsonl",
]
