"""Tokenizers built offline. CLIP's byte-level BPE ships inside open_clip_torch (``bpe_simple_vocab_16e6.txt.gz``);
its vocabulary is derived from it exactly as OpenAI's tokenizer builds it, so the tiny models tokenize like the real
ones (same ids, 49408 entries)."""

from __future__ import annotations

import gzip
import string

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import BertTokenizer, CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

CLIP_VOCAB_SIZE = 49408


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """CLIP's tokenizer (OpenAI's pads with ``<|endoftext|>``, LAION's ViT-H-14 with ``!``)."""
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]]  # after the header
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges, pad_token=pad_token,
                         model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A T5 tokenizer (the same Unigram class and special tokens) over a small vocabulary: characters and common
    words, so any prompt tokenizes without unknowns; the real one has 32,100 sentencepiece pieces."""
    words = "a an the of on in with and to is photo painting cat dog red blue green of by at".split()
    chars = list(string.ascii_letters + string.digits + string.punctuation)
    pieces = [("▁" + w, -5.0) for w in dict.fromkeys(words)] + [("▁", -2.0)] + [(c, -10.0) for c in chars]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


# Qwen3's chat template, reduced to what FLUX.2 Klein's prompt encoding uses (a user turn, the generation prompt
# and the empty thinking block that enable_thinking=False adds).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}{%- endif %}"
)


def _byte_level_bpe(specials: list[str], chat_template: str, model_max_length: int) -> Qwen2Tokenizer:
    """Qwen's byte-level BPE class over the 256 byte symbols and no merges (every byte is a token), then
    ``specials`` (the first, ``<|endoftext|>``, pads)."""
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + specials)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = chat_template
    return tokenizer


def qwen3_tokenizer() -> Qwen2Tokenizer:
    """Qwen3's chat special tokens on a byte-level vocabulary; the real vocabulary has 151,669 entries."""
    return _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], QWEN3_CHAT_TEMPLATE, 512)


# Qwen2-VL-Instruct's chat template (Qwen/Qwen2-VL-7B-Instruct chat_template.json), for the tiny model: the real
# one is read from the hub with the rest of the processor.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # the real ids' order


def qwen2_vl_tokenizer() -> Qwen2Tokenizer:
    """Qwen2-VL's special tokens (in the real ids' order, 151643-151656) and chat template on a byte-level
    vocabulary; the real vocabulary has 151,657 entries."""
    return _byte_level_bpe(QWEN2_VL_SPECIALS, QWEN2_VL_CHAT_TEMPLATE, 32768)


BERT_VOCAB_SIZE = 30522


def bert_tokenizer() -> BertTokenizer:
    """``bert-base-uncased``'s tokenizer class, special-token ids and vocabulary size (30,522) over placeholder
    entries, lower-case words, letters and their ``##`` continuations, so any ASCII prompt tokenizes without
    unknowns; the ids of words differ from the real vocabulary's."""
    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    words = "a an the of on in with and to is photo painting cat dog red blue green by at".split()
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    entries = [*dict.fromkeys(words + chars), *("##" + c for c in string.ascii_lowercase + string.digits)]
    vocab = [specials.get(i, f"[unused{i}]") for i in range(104)] + entries
    vocab += [f"[unused{i}]" for i in range(len(vocab), BERT_VOCAB_SIZE)]
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True, model_max_length=512)
