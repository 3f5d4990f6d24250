"""Text, JSONL and parquet files -> train/val token files, split by whole
document, as a stream of documents or packed into rows (--seq-len).

The quickstart corpus is the Python standard library's own source: present
wherever Python is, so preparing data needs no network. Output is written
to a new directory beside the output and moved into place only when
complete, so a failed preparation leaves the output as it was."""
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
from jaxkit.data.packing import pack
from jaxkit.data.sources import Document, collect_files, documents
from jaxkit.data.token_file import (TokenFile, dtype_for_vocab, read_header, segments_path,
                                    unigram_entropy, write_token_file)
from jaxkit.data.tokenizer import (TOKENIZER_FILE, ByteTokenizer, HFTokenizer,
                                   check_bpe_vocab_size, train_bpe)

# Caps the stdlib corpus so preparing it takes seconds and its files stay small.
STDLIB_MAX_BYTES = 24_000_000
SPLITS = ("train", "val")


class Corpus(NamedTuple):
    paths: tuple[Path, ...]
    pattern: str
    exclude: tuple[str, ...]  # directory names skipped below each path


def default_corpus_paths() -> Corpus:
    """The standard library's source directory and its *.py files. Installed
    third-party packages can live below it, so their directories are excluded."""
    return Corpus((Path(os.__file__).parent,), "**/*.py", ("site-packages", "dist-packages"))


def _given_tokenizer(tokenizer: str, vocab_size: int | None) -> HFTokenizer | None:
    """Checks the tokenizer arguments before any text is read (the vocabulary
    must fit token ids of the token files); returns the tokenizer a
    tokenizer.json path names, else None."""
    if tokenizer == "bpe":
        if vocab_size is None:
            raise DataError("tokenizer 'bpe' needs a vocabulary size (--vocab-size)")
        check_bpe_vocab_size(vocab_size)
        dtype_for_vocab(vocab_size)
        return None
    if vocab_size is not None:
        raise DataError(f"vocab_size={vocab_size} applies only to tokenizer 'bpe'; tokenizer "
                        f"{tokenizer!r} has its own vocabulary")
    if tokenizer == "byte":
        return None
    if not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer {tokenizer!r} is neither 'byte', 'bpe' nor a "
                                f"tokenizer.json file")
    given = HFTokenizer.from_file(tokenizer)
    try:
        dtype_for_vocab(given.vocab_size)
    except DataError as e:
        raise DataError(f"tokenizer {tokenizer!r}: {e}") from None
    return given


def _make_tokenizer(tokenizer: str, given: HFTokenizer | None, vocab_size: int | None,
                    train_texts: list[str], out_dir: Path,
                    progress: bool) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of the token files in out_dir, saved there as
    tokenizer.json unless it is the byte tokenizer."""
    saved = out_dir / TOKENIZER_FILE
    if tokenizer == "byte":
        return ByteTokenizer()
    if tokenizer == "bpe":
        return train_bpe(train_texts, vocab_size, saved, progress=progress)
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


def _read_documents(files: list[Path], max_bytes: int | None, text_field: str,
                    separator: str | None, progress: bool) -> tuple[list[Document], int, int]:
    """(the documents of the files in order, up to max_bytes of text in all;
    their bytes; the number of files skipped as unknown, empty or not text)."""
    found, skipped, total = [], 0, 0
    for path in tqdm(files, desc="read", unit="file", disable=not progress):
        docs = documents(path, text_field=text_field, separator=separator)
        if docs is None:
            skipped += 1
            continue
        for doc in docs:
            size = len(doc.text.encode("utf-8"))
            if max_bytes is not None and total + size > max_bytes:
                return found, total, skipped
            found.append(doc)
            total += size
    return found, total, skipped


def _check_arguments(val_fraction, max_bytes, seed, seq_len, text_field, out_dir: Path) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"max_bytes must be positive, got {max_bytes}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if seq_len is not None and (not isinstance(seq_len, (int, np.integer))
                                or isinstance(seq_len, bool) or seq_len < 1):
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"text_field must name a field, got {text_field!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {str(out_dir)!r} exists and is not a directory")


def _publish(staging: Path, out_dir: Path) -> None:
    """Moves the files prepared in `staging` to out_dir. Into an existing
    directory, headers go first and come last (a header's presence means its
    data is complete), and files of an earlier preparation that this one
    does not write (a tokenizer.json, segment ids) are removed."""
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    written = {p.name for p in staging.iterdir()}
    headers = [f"{split}.json" for split in SPLITS]
    owned = [TOKENIZER_FILE, *headers] + [name for split in SPLITS for name in
                                          (f"{split}.bin", segments_path(split).name)]
    for name in headers + [n for n in owned if n not in written]:
        (out_dir / name).unlink(missing_ok=True)
    for name in sorted(written, key=lambda n: n in headers):
        os.replace(staging / name, out_dir / name)
    staging.rmdir()


def _write_split(stem: Path, docs: list[np.ndarray], tok, seq_len: int | None,
                 tokenizer_file: str | None) -> dict:
    """Writes one split's token files: packed rows of seq_len + 1 tokens, or
    the documents one after another; returns its counts."""
    described = dict(tokenizer=tok.name, special_ids=tok.special_ids,
                     tokenizer_file=tokenizer_file, sources=len(docs))
    if seq_len is None:
        write_token_file(stem, np.concatenate(docs), tok.vocab_size, **described)
        return {"pad_fraction": 0.0}
    pad_id = tok.eos_id if tok.pad_id is None else tok.pad_id  # padding is never a target
    tokens, segments = pack(docs, seq_len + 1, pad_id)
    write_token_file(stem, tokens, tok.vocab_size, segment_ids=segments, **described)
    return {"rows": len(tokens), "pad_fraction": read_header(stem)["pad_fraction"]}


def prepare(inputs: Sequence[str | Path], out_dir: str | Path, *, pattern: str = "**/*",
            val_fraction: float = 0.05, seed: int = 0, max_bytes: int | None = None,
            exclude: Sequence[str] = (), tokenizer: str = "byte", vocab_size: int | None = None,
            seq_len: int | None = None, text_field: str = "text", separator: str | None = None,
            progress: bool = True) -> dict:
    """Tokenizes each document of the inputs (jaxkit.data.sources: text,
    JSONL and parquet files, by extension; `text_field` names the JSONL field
    or parquet column, `separator` splits text files) with EOS after each,
    and writes `out_dir/train.{bin,json}` and `out_dir/val.{bin,json}`.

    Whole documents go to one split, chosen by a shuffle keyed by `seed`.
    `max_bytes` keeps the first documents in path order whose text totals at
    most that many bytes. Empty files and files that are not UTF-8 text are
    skipped. With seq_len, each split's documents are packed into rows of
    seq_len + 1 tokens (jaxkit.data.packing) with their segment ids.

    `tokenizer` is 'byte', 'bpe' (a byte-level BPE of `vocab_size` ids learned
    from the train split only) or the path of a tokenizer.json; all but 'byte'
    are saved as `out_dir/tokenizer.json`, which the headers name.
    """
    out = Path(out_dir).resolve()
    _check_arguments(val_fraction, max_bytes, seed, seq_len, text_field, out)
    given = _given_tokenizer(tokenizer, vocab_size)
    files = collect_files(inputs, pattern, exclude)
    docs, total_bytes, skipped = _read_documents(files, max_bytes, text_field, separator,
                                                 progress)
    if len(docs) < 2:
        raise DataError(f"need at least 2 text documents for a train/val split, found {len(docs)} "
                        f"among {len(files)} files matching {pattern!r} in {list(map(str, inputs))}"
                        + (f" within max_bytes={max_bytes}" if max_bytes is not None else ""))
    texts = [d.text for d in docs]
    num_val = min(len(texts) - 1, max(1, round(val_fraction * len(texts))))
    is_val = np.zeros(len(texts), bool)
    is_val[np.random.default_rng(seed).permutation(len(texts))[:num_val]] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.preparing-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed preparation
    staging.mkdir()
    try:
        tok = _make_tokenizer(tokenizer, given, vocab_size,
                              [t for t, v in zip(texts, is_val) if not v], staging, progress)
        encoded = _encode_documents(tok, texts, progress)
        tokenizer_file = None if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE
        summary = {"out_dir": str(out_dir), "files_found": len(files), "skipped": skipped,
                   "bytes": total_bytes, "vocab_size": tok.vocab_size, "tokenizer": tok.name,
                   "special_ids": tok.special_ids, "seq_len": seq_len}
        for split, members in zip(SPLITS, (~is_val, is_val)):
            chosen = [d for d, m in zip(encoded, members) if m]
            counts = _write_split(staging / split, chosen, tok, seq_len, tokenizer_file)
            summary[f"{split}_docs"] = len(chosen)
            summary[f"{split}_tokens"] = int(sum(d.size for d in chosen))
            summary |= {f"{split}_{k}": v for k, v in counts.items()}
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["val_sources"] = [d.source for d, v in zip(docs, is_val) if v]
    return summary


def prepare_stdlib(out_dir: str | Path, *, max_bytes: int = STDLIB_MAX_BYTES,
                   val_fraction: float = 0.05, seed: int = 0, tokenizer: str = "byte",
                   vocab_size: int | None = None, progress: bool = True) -> dict:
    corpus = default_corpus_paths()
    return prepare(corpus.paths, out_dir, pattern=corpus.pattern, exclude=corpus.exclude,
                   val_fraction=val_fraction, seed=seed, max_bytes=max_bytes, tokenizer=tokenizer,
                   vocab_size=vocab_size, progress=progress)


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "--inputs", dest="inputs", nargs="+", metavar="PATH",
                   help="text (.txt, .md, .py, ...), JSONL (.jsonl) or parquet (.parquet) files, "
                        "or directories searched for them (default: the Python standard "
                        f"library's source, capped at {STDLIB_MAX_BYTES} bytes)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--pattern", help="glob for files under input directories "
                                     "(default: **/* for --input, **/*.py for the stdlib)")
    p.add_argument("--exclude", nargs="+", metavar="NAME",
                   help="directory names to skip below the inputs")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="the JSONL field or parquet column holding each document (default text)")
    p.add_argument("--separator", nargs="?", const="", metavar="TEXT",
                   help="text files hold several documents, between blank lines (no TEXT) or "
                        "between occurrences of TEXT (default: a document per file)")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help="pack the documents into rows of N + 1 tokens by best-fit decreasing, "
                        "for data.seq_len=N (default: one stream of documents)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of documents held out for validation (default 0.05)")
    p.add_argument("--max-bytes", type=int,
                   help="keep the first documents, in path order, totalling at most this many "
                        "bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val document split")
    tokenizer = p.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", default="byte", metavar="byte|bpe|FILE",
                           help="byte (default, 259 ids), bpe (train a byte-level BPE of "
                                "--vocab-size ids on the train split; needs jaxkit[tokenizers]) "
                                "or a tokenizer.json to use; saved as DIR/tokenizer.json")
    tokenizer.add_argument("--tokenizer-file", dest="tokenizer", metavar="FILE",
                           help="a Hugging Face tokenizer.json to use (as --tokenizer FILE)")
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
                      vocab_size=args.vocab_size, seq_len=args.seq_len,
                      text_field=args.text_field, separator=args.separator)
    entropy = unigram_entropy(TokenFile(Path(args.out) / "val"))
    report = {k: v for k, v in summary.items() if k != "val_sources"}
    report["val_unigram_entropy_nats"] = round(entropy, 4)
    report["val_unigram_entropy_bits"] = round(entropy / np.log(2.0), 4)
    print(json.dumps(report, indent=1))
    return summary
