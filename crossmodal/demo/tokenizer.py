"""A real CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships.

The vocabulary is assembled exactly as OpenAI's ``SimpleTokenizer`` does it, so token ids match
``openai/clip-vit-base-patch32`` (``"a red circle"`` → ``[49406, 320, 736, 7117, 49407]``).
``open_clip`` is installed without its dependencies and cannot be imported: its data file is
located through the import machinery instead.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerBase

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# OpenAI CLIP keeps the first 49152 - 256 - 2 merges of the file (after its header line).
_N_MERGES = 49152 - 256 - 2


def bpe_vocab_path() -> Path:
    """Where open_clip's BPE file lies, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: its BPE vocabulary is needed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BPE_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{BPE_FILE} not found in the open_clip package")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character map (no whitespace or control chars)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The 49408-token CLIP vocabulary and its merges, in OpenAI's order."""
    with gzip.open(bpe_vocab_path(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError("the BPE file does not hold the expected CLIP merges")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def build_clip_tokenizer(model_max_length: int = 77) -> PreTrainedTokenizerBase:
    """An in-memory CLIP tokenizer. ``model_max_length`` must be set: without it
    ``truncation=True`` silently does nothing."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def save_clip_tokenizer(out: Path, model_max_length: int = 77) -> PreTrainedTokenizerBase:
    """Write the tokenizer to ``out`` as a real checkpoint has it (tokenizer.json and
    tokenizer_config.json, plus the classic vocab.json and merges.txt), then load it back the
    way a consumer will, through AutoTokenizer, and check it is whole."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_clip_tokenizer(model_max_length)
    tokenizer.save_pretrained(str(out))
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return load_tokenizer(out)


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerBase:
    """Load through AutoTokenizer and refuse a degenerate result: transformers 5 can silently
    build a 2-token tokenizer from a folder whose tokenizer files are missing."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if len(tokenizer) != VOCAB_SIZE:
        raise ValueError(f"tokenizer at {path} has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    return tokenizer
