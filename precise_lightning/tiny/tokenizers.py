"""Tokenizers built offline. CLIP's byte-level BPE ships inside open_clip_torch (``bpe_simple_vocab_16e6.txt.gz``);
``vocab.json`` / ``merges.txt`` in transformers' format are derived from it exactly as OpenAI's tokenizer builds its
vocabulary, so the tiny models tokenize like the real ones (same ids, 49408 entries)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408


def write_clip_bpe(directory: Path) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` of CLIP's tokenizer, in ``directory``."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]]  # after the header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def clip_tokenizer(scratch: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's tokenizer (OpenAI's pads with ``<|endoftext|>``, LAION's ViT-H-14 with ``!``), loaded from files written
    to ``scratch`` (its constructor takes in-memory tables in transformers 5, files in 4; ``from_pretrained`` reads
    the files)."""
    write_clip_bpe(scratch)
    return CLIPTokenizer.from_pretrained(str(scratch), pad_token=pad_token, model_max_length=77)
