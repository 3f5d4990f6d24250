"""Documents from the user's files, by extension: plain text (a document per
file, or documents between separators), JSONL (a document per line, in one
field of its object) and parquet (a document per row, in one column).

Inputs are files or directories; a directory contributes the files below
it matching a glob (all, by default) in path order, and those with an
extension no reader knows are skipped. A file named directly must have a
known extension."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from jaxkit.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".tex",  # prose and markup
                 ".py", ".c", ".h", ".cc", ".cpp", ".rs", ".go", ".js", ".java")  # source code
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
KNOWN_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
# --separator's meaning when given no text: one or more blank lines
BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_PARQUET_HINT = 'pip install "jaxkit[parquet]"'


class Document(NamedTuple):
    source: str  # the file, with the line (JSONL), row (parquet) or piece (text) within it
    text: str


def collect_files(inputs: Sequence[str | Path], pattern: str = "**/*",
                  exclude: Sequence[str] = ()) -> list[Path]:
    """Files named directly (which must have a known extension), plus files
    under each directory matching `pattern` (outside `exclude`d directory
    names); sorted by path, so deterministic."""
    if not inputs:
        raise DataError("no inputs given: name at least one file or directory")
    found = set()
    for item in map(Path, inputs):
        if item.is_file():
            if item.suffix.lower() not in KNOWN_SUFFIXES:
                raise DataError(f"input {str(item)!r} has extension {item.suffix!r}, which is "
                                f"none of {list(KNOWN_SUFFIXES)}")
            found.add(item)
        elif item.is_dir():
            for f in item.glob(pattern):
                if f.is_file() and not set(f.relative_to(item).parts[:-1]) & set(exclude):
                    found.add(f)
        else:
            raise FileNotFoundError(f"input {str(item)!r} is neither a file nor a directory")
    return sorted(found, key=str)


def read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (binary files
    often decode as UTF-8 but contain NUL bytes, which text never does)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_documents(path: Path, separator: str | None) -> Iterator[Document] | None:
    text = read_text(path)
    if not text:
        return None
    if separator is None:
        return iter([Document(str(path), text)])
    pieces = BLANK_LINES.split(text) if separator == "" else text.split(separator)
    return (Document(f"{path}#{k}", piece) for k, piece in enumerate(pieces, 1) if piece.strip())


def _field(record, field: str, where: str) -> str | None:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where} has no text field {field!r} (found {keys}); name the field "
                        f"with --text-field")
    value = record[field]
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} holds {type(value).__name__}, not text")
    return value


def _jsonl_documents(path: Path, field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not a JSON object: {e}") from None
            if text := _field(record, field, where):
                yield Document(where, text)


def _parquet_module():
    try:
        import pyarrow.parquet
    except ImportError:  # a DataError: the command line reports it in one line
        raise DataError(f"reading parquet files needs the 'pyarrow' package: "
                        f"{_PARQUET_HINT}") from None
    return pyarrow.parquet


def _parquet_documents(path: Path, field: str) -> Iterator[Document]:
    pq = _parquet_module()
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types, for a file that is not parquet
        raise DataError(f"{str(path)!r} is not a parquet file: {str(e).splitlines()[0]}") from None
    names = table.schema_arrow.names
    if field not in names:
        raise DataError(f"{path} has no text column {field!r} (found {names}); name the column "
                        f"with --text-field")
    kind = table.schema_arrow.field(field).type
    if str(kind) not in ("string", "large_string"):
        raise DataError(f"{path}: column {field!r} holds {kind}, not text")
    row = 0
    for batch in table.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if text:
                yield Document(f"{path}#{row}", text)
            row += 1


def documents(path: Path, *, text_field: str = "text",
              separator: str | None = None) -> Iterator[Document] | None:
    """The non-empty documents of one file, by its extension; None for a file
    to skip (an unknown extension, or a text file that is empty or not UTF-8).
    separator (text files): None, a document per file; "", documents between
    blank lines; else the text between documents."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _text_documents(path, separator)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_documents(path, text_field)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_documents(path, text_field)
    return None
