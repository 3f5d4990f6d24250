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


def tokenizer_config(tokenizer_json: str, special_ids: dict, add_bos: bool = False) -> dict:
    """tokenizer_config.json of a tokenizer.json's text whose special tokens
    have special_ids (role -> id or None): a fast tokenizer that adds BOS
    when jaxkit's generation does (add_bos) and no other special."""
    text = {t["id"]: t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
            "add_eos_token": False} | {f"{role}_token": text[i] for role, i in special_ids.items()
                                       if i in text}


def _template_starts_with_special(processor: dict | None) -> bool:
    if not processor:
        return False
    if processor.get("type") == "Sequence":
        return any(_template_starts_with_special(p) for p in processor.get("processors", []))
    single = processor.get("single") or [{}]
    return processor.get("type") == "TemplateProcessing" and "SpecialToken" in single[0]


def adds_bos(tokenizer_json: str, tokenizer_config_json: str | None) -> bool:
    """Whether transformers' tokenizer of an HF model directory starts every
    text with BOS: tokenizer_config.json's add_bos_token where it says so
    (Llama 2, Mistral, Mixtral), else a post-processor template that begins
    with a special token (Llama 3)."""
    if tokenizer_config_json is not None:
        flag = json.loads(tokenizer_config_json).get("add_bos_token")
        if flag is not None:
            return bool(flag)
    return _template_starts_with_special(json.loads(tokenizer_json).get("post_processor"))


def with_bos_template(tokenizer_json: str, bos_id: int) -> str:
    """tokenizer_json whose encodings start with the token bos_id (a
    post-processor template after any it has), for transformers' tokenizers
    to add BOS as jaxkit's generation does; unchanged where it already
    starts with a special token. Needs `tokenizers`."""
    import tokenizers as tk  # optional: ImportError where it is not installed
    if _template_starts_with_special(json.loads(tokenizer_json).get("post_processor")):
        return tokenizer_json
    hf = tk.Tokenizer.from_str(tokenizer_json)
    bos = hf.id_to_token(bos_id)
    template = tk.processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                special_tokens=[(bos, bos_id)])
    hf.post_processor = template if hf.post_processor is None \
        else tk.processors.Sequence([hf.post_processor, template])
    return hf.to_str()
