"""Tokenizer files of a Hugging Face model directory for jaxkit's tokenizers:
a `tokenizers` tokenizer.json that encodes and decodes exactly as the
byte-level ByteTokenizer does, and the tokenizer_config.json naming the
special tokens, so that transformers' AutoTokenizer loads either kind."""
from __future__ import annotations

import json

from jaxkit.data.tokenizer import BPE_SPECIALS, NUM_BYTES


def _byte_symbols() -> list[str]:
    """The printable character GPT-2's byte-level encoding gives each byte
    (the alphabet of `tokenizers`' ByteLevel pre-tokenizer), by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {b: chr(b) for b in printable}, 0
    for b in range(NUM_BYTES):
        if b not in symbols:
            symbols[b] = chr(NUM_BYTES + shifted)
            shifted += 1
    return [symbols[b] for b in range(NUM_BYTES)]


def byte_tokenizer_json() -> str:
    """A tokenizer.json equal to ByteTokenizer: byte b is id b (a BPE without
    merges over the byte-level alphabet), then pad, bos and eos at 256, 257,
    258 with the spellings jaxkit's BPE tokenizers use. Needs `tokenizers`."""
    import tokenizers as tk  # optional: ImportError where it is not installed
    hf = tk.Tokenizer(tk.models.BPE({s: b for b, s in enumerate(_byte_symbols())}, []))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = tk.decoders.ByteLevel()
    # ids follow the 256 bytes in the order added: ByteTokenizer's pad, bos, eos
    hf.add_special_tokens([tk.AddedToken(BPE_SPECIALS[role], special=True)
                           for role in ("pad", "bos", "eos")])
    return hf.to_str()


def tokenizer_config(tokenizer_json: str, special_ids: dict) -> dict:
    """tokenizer_config.json of a tokenizer.json's text whose special tokens
    have special_ids (role -> id or None): a fast tokenizer that adds no
    specials of its own, as jaxkit encodes text."""
    text = {t["id"]: t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
            "add_eos_token": False} | {f"{role}_token": text[i] for role, i in special_ids.items()
                                       if i in text}
