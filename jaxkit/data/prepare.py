"""Text files -> train/val token files, split by whole document.

The quickstart corpus is the Python standard library's own source: present
wherever Python is, so preparing data needs no network."""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from jaxkit.data.errors import DataError
from jaxkit.data.token_file import TokenFile, unigram_entropy, write_token_file
from jaxkit.data.tokenizer import (TOKENIZER_FILE, ByteTokenizer, HFTokenizer,
                                   check_bpe_vocab_size, train_bpe)

# Caps the stdlib corpus so preparing it takes seconds and its files stay small.
STDLIB_MAX_BYTES = 24_000_000


class Corpus(NamedTuple):
    paths: tuple[Path, ...]
    pattern: str
    exclude: tuple[str, ...]  # directory names skipped below each path


def default_corpus_paths() -> Corpus:
    """The standard library's source directory and its *.py files. Installed
    third-party packages can live below it, so their directories are excluded."""
    return Corpus((Path(os.__file__).parent,), "**/*.py", ("site-packages", "dist-packages"))


def collect_files(inputs: Sequence[str | Path], pattern: str = "**/*",
                  exclude: Sequence[str] = ()) -> list[Path]:
    """Files named directly, plus files under each directory matching `pattern`
    (outside `exclude`d directory names); sorted by path, so deterministic."""
    if not inputs:
        raise DataError("no inputs given: name at least one file or directory")
    found = set()
    for item in map(Path, inputs):
        if item.is_file():
            found.add(item)
        elif item.is_dir():
            for f in item.glob(pattern):
                if f.is_file() and not set(f.relative_to(item).parts[:-1]) & set(exclude):
                    found.add(f)
        else:
            raise FileNotFoundError(f"input {str(item)!r} is neither a file nor a directory")
    return sorted(found, key=str)


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (binary files
    often decode as UTF-8 but contain NUL bytes, which text never does)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _given_tokenizer(tokenizer: str, vocab_size: int | None) -> HFTokenizer | None:
    """Checks the tokenizer arguments before any text is read; returns the
    tokenizer a tokenizer.json path names, else None."""
    if tokenizer == "bpe":
        if vocab_size is None:
            raise DataError("tokenizer 'bpe' needs a vocabulary size (--vocab-size)")
        check_bpe_vocab_size(vocab_size)
        return None
    if vocab_size is not None:
        raise DataError(f"vocab_size={vocab_size} applies only to tokenizer 'bpe'; tokenizer "
                        f"{tokenizer!r} has its own vocabulary")
    if tokenizer == "byte":
        return None
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer!r} is neither 'byte', 'bpe' nor a "
                                f"tokenizer.json file")
    return HFTokenizer.from_file(tokenizer)


def _make_tokenizer(tokenizer: str, given: HFTokenizer | None, vocab_size: int | None,
                    train_texts: list[str], out_dir: Path,
                    progress: bool) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of the token files in out_dir, saved there as
    tokenizer.json unless it is the byte tokenizer."""
    saved = out_dir / TOKENIZER_FILE
    if tokenizer == "byte":
        saved.unlink(missing_ok=True)  # a stale file beside byte data would mislead
        return ByteTokenizer()
    if tokenizer == "bpe":
        return train_bpe(train_texts, vocab_size, saved, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not saved.exists() or not saved.samefile(given.path):
        shutil.copyfile(given.path, saved)
    return HFTokenizer.from_file(saved)


def _encode_documents(tokenizer, texts: list[str], progress: bool) -> list[np.ndarray]:
    """Each text's ids followed by EOS, encoded in chunks so the library's
    per-token bookkeeping stays small."""
    chunk = 256
    docs = []
    for start in tqdm(range(0, len(texts), chunk), desc="encode", unit="chunk",
                      disable=not progress):
        docs += tokenizer.encode_batch(texts[start:start + chunk], add_eos=True)
    return docs


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, *, pattern: str = "**/*",
            val_fraction: float = 0.05, seed: int = 0, max_bytes: int | None = None,
            exclude: Sequence[str] = (), tokenizer: str = "byte", vocab_size: int | None = None,
            progress: bool = True) -> dict:
    """Tokenizes each text document (EOS after each) and writes
    `out_dir/train.{bin,json}` and `out_dir/val.{bin,json}`.

    Whole documents go to one split, chosen by a shuffle keyed by `seed`.
    `max_bytes` keeps the first files in path order whose text totals at most
    that many bytes. Empty files and files that are not UTF-8 text are skipped.

    `tokenizer` is 'byte', 'bpe' (a byte-level BPE of `vocab_size` ids learned
    from the train split only) or the path of a tokenizer.json; all but 'byte'
    are saved as `out_dir/tokenizer.json`, which the headers name.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    given = _given_tokenizer(tokenizer, vocab_size)
    files = collect_files(inputs, pattern, exclude)
    texts, names, skipped, total_bytes = [], [], 0, 0
    for path in tqdm(files, desc="read", unit="file", disable=not progress):
        text = _read_text(path)
        if not text:
            skipped += 1
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total_bytes + size > max_bytes:
            break
        texts.append(text)
        names.append(path)
        total_bytes += size
    if len(texts) < 2:
        raise DataError(f"need at least 2 text documents for a train/val split, found {len(texts)} "
                        f"among {len(files)} files matching {pattern!r} in {list(map(str, inputs))}"
                        + (f" within max_bytes={max_bytes}" if max_bytes is not None else ""))
    num_val = min(len(texts) - 1, max(1, round(val_fraction * len(texts))))
    is_val = np.zeros(len(texts), bool)
    is_val[np.random.default_rng(seed).permutation(len(texts))[:num_val]] = True
    out_dir = Path(out_dir)
    tok = _make_tokenizer(tokenizer, given, vocab_size,
                          [t for t, v in zip(texts, is_val) if not v], out_dir, progress)
    docs = _encode_documents(tok, texts, progress)
    tokenizer_file = None if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE
    summary = {"out_dir": str(out_dir), "files_found": len(files), "skipped": skipped,
               "bytes": total_bytes, "vocab_size": tok.vocab_size, "tokenizer": tok.name,
               "special_ids": tok.special_ids}
    for split, members in (("train", ~is_val), ("val", is_val)):
        chosen = [d for d, m in zip(docs, members) if m]
        write_token_file(out_dir / split, np.concatenate(chosen), tok.vocab_size,
                         tokenizer=tok.name, special_ids=tok.special_ids,
                         tokenizer_file=tokenizer_file, sources=len(chosen))
        summary[f"{split}_docs"] = len(chosen)
        summary[f"{split}_tokens"] = int(sum(d.size for d in chosen))
    summary["val_files"] = [str(n) for n, m in zip(names, is_val) if m]
    return summary


def prepare_stdlib(out_dir: str | Path, *, max_bytes: int = STDLIB_MAX_BYTES,
                   val_fraction: float = 0.05, seed: int = 0, tokenizer: str = "byte",
                   vocab_size: int | None = None, progress: bool = True) -> dict:
    corpus = default_corpus_paths()
    return prepare(corpus.paths, out_dir, pattern=corpus.pattern, exclude=corpus.exclude,
                   val_fraction=val_fraction, seed=seed, max_bytes=max_bytes, tokenizer=tokenizer,
                   vocab_size=vocab_size, progress=progress)


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", nargs="+", metavar="PATH",
                   help="text files or directories (default: the Python standard library's "
                        f"source, capped at {STDLIB_MAX_BYTES} bytes)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--pattern", help="glob for files under input directories "
                                     "(default: **/* for --inputs, **/*.py for the stdlib)")
    p.add_argument("--exclude", nargs="+", metavar="NAME",
                   help="directory names to skip below the inputs")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents held out for validation (default 0.05)")
    p.add_argument("--max-bytes", type=int,
                   help="keep the first files, in path order, totalling at most this many bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    p.add_argument("--tokenizer", default="byte", metavar="byte|bpe|FILE",
                   help="byte (default, 259 ids), bpe (train a byte-level BPE of --vocab-size "
                        "ids on the train split; needs jaxkit[tokenizers]) or a tokenizer.json "
                        "to use; saved as DIR/tokenizer.json")
    p.add_argument("--vocab-size", type=int, help="vocabulary size of --tokenizer bpe")


def run_prepare(args: argparse.Namespace) -> dict:
    if args.inputs:
        inputs, pattern, exclude, max_bytes = args.inputs, "**/*", (), args.max_bytes
    else:
        inputs, pattern, exclude = default_corpus_paths()
        max_bytes = STDLIB_MAX_BYTES if args.max_bytes is None else args.max_bytes
    summary = prepare(inputs, args.out, pattern=args.pattern or pattern,
                      exclude=args.exclude or exclude, val_fraction=args.val_fraction,
                      seed=args.seed, max_bytes=max_bytes, tokenizer=args.tokenizer,
                      vocab_size=args.vocab_size)
    entropy = unigram_entropy(TokenFile(Path(args.out) / "val"))
    report = {k: v for k, v in summary.items() if k != "val_files"}
    report["val_unigram_entropy_nats"] = round(entropy, 4)
    report["val_unigram_entropy_bits"] = round(entropy / np.log(2.0), 4)
    print(json.dumps(report, indent=1))
    return summary
