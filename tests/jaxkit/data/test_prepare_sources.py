"""jaxkit data prepare over the user's files: text (a document per file or
between separators), JSONL and parquet by extension, directories of them,
any tokenizer.json, documents packed into rows with their segment ids, and
one-line errors that leave the output as it was."""
import builtins
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxkit.cli import main
from jaxkit.config import Config, DataConfig
from jaxkit.data import DataError, HFTokenizer, TokenBatcher, TokenFile, prepare
from jaxkit.data.sources import collect_files, documents
from jaxkit.interop.hf_tokenizer import byte_tokenizer_json
from jaxkit.run.build import build_data

EOS = 258  # the byte-level tokenizer's


def _texts(count: int, seed: int = 0) -> list[str]:
    """Documents of 1 to 60 words, some non-ASCII."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta✓", "theta"]
    return [" ".join(rng.choice(words, rng.integers(1, 60))) + "." for _ in range(count)]


def _jsonl(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({field: t, "id": i}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line is skipped


def _parquet(path, texts, field="text"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({field: texts, "n": list(range(len(texts)))}), path)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(byte_tokenizer_json())
    return path


def _read_all(path, **kwargs):
    return [(d.source, d.text) for d in documents(path, **kwargs)]


def test_text_documents_per_file_between_blank_lines_or_a_separator(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\ntwo\n\n\n  \nthree\n\nfour\n---\nfive")
    assert _read_all(path) == [(str(path), path.read_text())]
    assert _read_all(path, separator="") == [
        (f"{path}#1", "one\ntwo"), (f"{path}#2", "three"), (f"{path}#3", "four\n---\nfive")]
    assert [t for _, t in _read_all(path, separator="\n---\n")] == [
        "one\ntwo\n\n\n  \nthree\n\nfour", "five"]
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01")
    assert documents(tmp_path / "blob.txt") is None  # not text: skipped


def test_jsonl_and_parquet_documents(tmp_path):
    _jsonl(tmp_path / "d.jsonl", ["first", "", "third"], field="body")
    assert _read_all(tmp_path / "d.jsonl", text_field="body") == [
        (f"{tmp_path / 'd.jsonl'}:1", "first"), (f"{tmp_path / 'd.jsonl'}:4", "third")]
    _parquet(tmp_path / "d.parquet", ["x", None, "z"], field="content")
    assert _read_all(tmp_path / "d.parquet", text_field="content") == [
        (f"{tmp_path / 'd.parquet'}#0", "x"), (f"{tmp_path / 'd.parquet'}#2", "z")]


def test_a_directory_is_read_recursively_in_path_order_by_extension(tmp_path, tokenizer_file):
    texts = _texts(9)
    root = tmp_path / "in"
    _jsonl(root / "b" / "part1.jsonl", texts[:3])
    _parquet(root / "a.parquet", texts[3:6])
    for i, t in enumerate(texts[6:]):
        (root / "c" / "deep").mkdir(parents=True, exist_ok=True)
        (root / "c" / "deep" / f"doc{i}.md").write_text(t)
    (root / "notes.csv").write_text("x,y\n")
    (root / "README").write_text("no extension")
    files = collect_files([root])
    assert [f.relative_to(root).as_posix() for f in files] == [
        "README", "a.parquet", "b/part1.jsonl", "c/deep/doc0.md", "c/deep/doc1.md",
        "c/deep/doc2.md", "notes.csv"]
    s = prepare([root], tmp_path / "out", tokenizer=str(tokenizer_file), val_fraction=0.3,
                progress=False)
    assert (s["files_found"], s["skipped"], s["train_docs"] + s["val_docs"]) == (7, 2, 9)
    tok = HFTokenizer.from_file(tmp_path / "out" / "tokenizer.json")
    decoded = []
    for split in ("train", "val"):
        tokens = np.asarray(TokenFile(tmp_path / "out" / split).tokens)
        decoded += [tok.decode(d) for d in np.split(tokens, np.flatnonzero(tokens == EOS) + 1)[:-1]]
    assert sorted(decoded) == sorted(texts)
    assert s["train_tokens"] + s["val_tokens"] == sum(len(t.encode()) + 1 for t in texts)


def test_packed_rows_carry_segment_ids_and_document_masks(tmp_path, tokenizer_file):
    texts = _texts(40, seed=1) + ["a long document " * 20]  # longer than a row
    _jsonl(tmp_path / "docs.jsonl", texts)
    s = prepare([tmp_path / "docs.jsonl"], tmp_path / "out", tokenizer=str(tokenizer_file),
                seq_len=63, val_fraction=0.25, seed=2, progress=False)
    encoded = {d: t.encode() + b"\x00" for d, t in enumerate(texts)}  # \x00 stands for EOS
    pieces = []
    for split in ("train", "val"):
        tf = TokenFile(tmp_path / "out" / split)
        assert (tf.row_len, tf.header["sources"]) == (64, s[f"{split}_docs"])
        rows = np.asarray(tf.tokens).reshape(-1, 64)
        segments = np.asarray(tf.segment_ids).reshape(-1, 64)
        assert len(rows) == s[f"{split}_rows"]
        assert tf.header["pad_fraction"] == s[f"{split}_pad_fraction"]
        assert tf.header["document_tokens"] == s[f"{split}_tokens"]
        assert s[f"{split}_pad_fraction"] == pytest.approx(1 - s[f"{split}_tokens"] / rows.size,
                                                           abs=1e-6)
        for row, seg in zip(rows, segments):
            for k in range(1, seg.max() + 1):
                piece = row[seg == k]
                pieces.append(bytes(np.where(piece == EOS, 0, piece).astype(np.uint8)))
    # each piece is a run of one document; together they hold every byte once
    assert all(any(p in doc for doc in encoded.values()) for p in pieces)
    assert sorted(b"".join(pieces)) == sorted(b"".join(encoded.values()))

    plain = TokenBatcher(tmp_path / "out" / "train", 63, 8, seed=0).batch(3)
    masked = TokenBatcher(tmp_path / "out" / "train", 63, 8, seed=0, eos_id=EOS).batch(3)
    assert set(plain) == {"inputs", "targets", "loss_mask"}
    assert set(masked) == set(plain) | {"segment_ids", "positions"}
    seg, pos, mask = masked["segment_ids"], masked["positions"], masked["loss_mask"]
    for r in range(8):
        for i in range(63):
            same = i > 0 and seg[r, i] == seg[r, i - 1]
            assert pos[r, i] == (pos[r, i - 1] + 1 if same else 0)
            # a target counts inside its input's document, never on padding
            target_seg = seg[r, i + 1] if i + 1 < 63 else None
            if target_seg is not None:
                assert mask[r, i] == (seg[r, i] != 0 and target_seg == seg[r, i])
    np.testing.assert_array_equal(masked["inputs"], plain["inputs"])
    np.testing.assert_array_equal(masked["loss_mask"], plain["loss_mask"])

    # data.document_mask reaches the batches through the config
    cfg = Config(data=DataConfig(path=str(tmp_path / "out"), seq_len=63, batch_size=8,
                                 document_mask=True))
    train, _ = build_data(cfg)
    np.testing.assert_array_equal(train.batch(3)["segment_ids"], seg)
    with pytest.raises(DataError, match="rows packed for seq_len 63, not 64: set data.seq_len=63"):
        TokenBatcher(tmp_path / "out" / "train", 64, 8, seed=0)


@pytest.mark.parametrize("setup,expected", [
    (lambda d: None, "input '{d}/missing.jsonl' is neither a file nor a directory"),
    (lambda d: (d / "x.csv").write_text("a,b"), "input '{d}/x.csv' has extension '.csv'"),
    (lambda d: (d / "x.jsonl").write_text(""), "need at least 2 text documents .*found 0"),
    (lambda d: _jsonl(d / "x.jsonl", ["a", "b"], field="body"),
     r"{d}/x.jsonl:1 has no text field 'text' \(found \['body', 'id'\]\)"),
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n{"text": \n'),
     "{d}/x.jsonl:2 is not a JSON object"),
    (lambda d: (d / "x.jsonl").write_text('{"text": 3}\n'), "field 'text' holds int, not text"),
    (lambda d: _parquet(d / "x.parquet", ["a", "b"], field="body"),
     r"{d}/x.parquet has no text column 'text' \(found \['body', 'n'\]\)"),
    (lambda d: pq.write_table(pa.table({"text": [1, 2]}), d / "x.parquet"),
     "column 'text' holds int64, not text"),
])
def test_bad_inputs_are_one_line_errors_before_anything_is_written(tmp_path, setup, expected):
    (tmp_path / "in").mkdir()
    setup(tmp_path / "in")
    inputs = sorted((tmp_path / "in").iterdir()) or [tmp_path / "in" / "missing.jsonl"]
    with pytest.raises((DataError, FileNotFoundError),
                       match=expected.format(d=tmp_path / "in")) as info:
        prepare(inputs, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no output, no staging directory


def test_a_tokenizer_with_ids_beyond_its_vocabulary_is_refused(tmp_path):
    import tokenizers
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 70000, "[UNK]": 1},
                                                          unk_token="[UNK]"))
    hf.add_special_tokens(["</s>"])
    hf.save(str(tmp_path / "sparse.json"))
    _jsonl(tmp_path / "in.jsonl", ["a a", "a"])
    with pytest.raises(DataError, match="sparse.json' has token id 70000, beyond its vocabulary "
                                        "of 3 ids"):
        prepare([tmp_path / "in.jsonl"], tmp_path / "out", tokenizer=str(tmp_path / "sparse.json"),
                progress=False)
    assert not (tmp_path / "out").exists()


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    _parquet(tmp_path / "x.parquet", ["a", "b"])
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.split(".")[0] == "pyarrow":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(DataError, match=r"needs the 'pyarrow' package: pip install "
                                        r"\"jaxkit\[parquet\]\""):
        prepare([tmp_path / "x.parquet"], tmp_path / "out", progress=False)


def test_a_failed_prepare_leaves_the_output_as_it_was(tmp_path, tokenizer_file):
    _jsonl(tmp_path / "good.jsonl", _texts(6))
    prepare([tmp_path / "good.jsonl"], tmp_path / "out", seq_len=31, tokenizer=str(tokenizer_file),
            progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert "train.segments.bin" in before and "tokenizer.json" in before
    # fails while writing: a BPE of more ids than the text yields
    with pytest.raises(DataError, match="yields only"):
        prepare([tmp_path / "good.jsonl"], tmp_path / "out", tokenizer="bpe", vocab_size=5000,
                progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["good.jsonl", "out"]
    # a stream of byte-level documents replaces packed rows and their tokenizer
    prepare([tmp_path / "good.jsonl"], tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["train.bin", "train.json", "val.bin",
                                                    "val.json"]
    assert TokenFile(tmp_path / "out" / "train").row_len is None


def test_command_line(tmp_path, tokenizer_file, capsys):
    _jsonl(tmp_path / "d.jsonl", _texts(30, seed=3), field="body")
    main(["data", "prepare", "--input", str(tmp_path / "d.jsonl"), "--text-field", "body",
          "--tokenizer-file", str(tokenizer_file), "--seq-len", "40", "--out",
          str(tmp_path / "out"), "--val-fraction", "0.2"])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["seq_len"], printed["train_docs"], printed["val_docs"]) == (40, 24, 6)
    assert 0 < printed["train_pad_fraction"] < 0.5 and printed["tokenizer"] == "bpe"
    assert TokenFile(tmp_path / "out" / "val").header["pad_fraction"] == printed["val_pad_fraction"]
    (tmp_path / "d.jsonl").rename(tmp_path / "d.json")
    with pytest.raises(SystemExit, match=r"^data error: input '.*d.json' has extension '.json', "
                                         r"which is none of \[.*\]$"):
        main(["data", "prepare", "--input", str(tmp_path / "d.json"), "--out",
              str(tmp_path / "again")])
    assert not (tmp_path / "again").exists()
