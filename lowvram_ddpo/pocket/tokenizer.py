"""A CLIP tokenizer whose vocabulary is CLIP's byte alphabet plus one token per word of
the pocket world, built here (no download). Words outside the world still tokenize,
letter by letter."""

from __future__ import annotations

from transformers import CLIPTokenizer

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
