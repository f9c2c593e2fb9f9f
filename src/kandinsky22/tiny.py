"""Tiny random-weight checkpoints for offline smoke tests (they draw noise, not pictures).

``write_tiny_tokenizer`` writes a small CLIP BPE tokenizer (byte alphabet + a few merges) in the official layout, so
tests and ``kandinsky22 make-tiny`` never need the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

# A handful of merges so that common words become single tokens; enough for tokenization to be non-trivial.
_MERGES = [
    "h o",
    "ho r",
    "hor s",
    "hors e</w>",
    "c a",
    "ca t</w>",
    "r e",
    "re d</w>",
    "t h",
    "th e</w>",
    "a n",
    "an d</w>",
    "o n</w>",
    "i n",
    "in g</w>",
    "e r</w>",
    "p h",
    "ph o",
    "pho t",
    "phot o</w>",
]


def _bytes_to_unicode() -> dict[int, str]:
    """The byte → printable character table of byte-level BPE (GPT-2 / CLIP)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merges of the tiny tokenizer; ``<|endoftext|>`` has the highest id, as in CLIP."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    for merge in _MERGES:
        merged = merge.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, _MERGES


def write_tiny_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the config files of a CLIPTokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return folder


def tiny_vocab_size() -> int:
    return len(tiny_vocab()[0])
