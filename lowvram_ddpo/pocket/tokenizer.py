"""Tokenizers built here (no download): a CLIP tokenizer whose vocabulary is CLIP's byte
alphabet plus one token per word of the pocket world (words outside the world still
tokenize, letter by letter), and a Qwen3-shaped chat tokenizer for FLUX.2-klein models
with random weights."""

from __future__ import annotations

from transformers import CLIPTokenizer, Qwen2TokenizerFast

MAX_LENGTH = 16


def byte_alphabet() -> list[str]:
    """CLIP's byte-to-unicode table: 256 printable stand-ins for the 256 byte values."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def build_tokenizer(words: list[str], max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        piece = symbols[0]
        for symbol in symbols[1:]:
            merge = (piece, symbol)
            piece += symbol
            if merge not in merges:
                merges.append(merge)
                tokens.append(piece)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def build_chat_tokenizer() -> Qwen2TokenizerFast:
    """A tokenizer shaped like FLUX.2-klein's (Qwen3's), built offline: Qwen's byte-level
    BPE with the 256 byte symbols only (no merges: any text tokenizes, byte by byte),
    Qwen3's special tokens and a Qwen3-style chat template (the thinking block is closed
    when ``enable_thinking=False``); pads with <|endoftext|> on the right. For models
    with random weights (tests, the memory benchmark)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab = {token: i for i, token in enumerate(byte_alphabet() + specials)}
    return Qwen2TokenizerFast(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=specials[1:],
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=1024,
    )
