"""Tokenizers: byte-level BPE training (HF `tokenizers`), tokenizer.json files,
the tokenizer a token-file directory names, and the data a run builds from BPE
token files."""
import argparse
import builtins
import json
import sys

import numpy as np
import pytest

from jaxkit.config import ConfigError, load_config
from jaxkit.data import (ByteTokenizer, HFTokenizer, TokenFile, load_tokenizer, prepare,
                         train_bpe, write_token_file)
from jaxkit.data.batches import document_segments
from jaxkit.data.prepare import add_prepare_args, run_prepare
from jaxkit.run.build import build_data

VOCAB = 400
ROUND_TRIP = ["", "hello, world", "naïve café über", "日本語のテキスト",
              "emoji 🎉👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\x00\t\n\r control  \r\n", "a" * 1000,
              "specials as text: <|eos|> <|bos|> <|pad|>", "def f(x):\n    return x  # ok\n"]


def _words(doc: int, count: int) -> list[str]:
    """Ten-letter words no other document of the corpus uses."""
    rng = np.random.default_rng(doc)
    return ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 10)) for _ in range(count)]


def _corpus(root, num_docs: int = 20) -> dict:
    """Python-like text files, each built from words of its own."""
    texts = {}
    for i in range(num_docs):
        words = _words(i, 6)
        lines = [f"def {w}(x):\n    return x + {k}  # {words[(k + 1) % 6]} ✓\n"
                 for k, w in enumerate(words)]
        texts[root / f"doc{i:02d}.py"] = "".join(lines) * 4
    root.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        path.write_text(text, encoding="utf-8")
    return texts


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """BPE token files of a small corpus: (directory, {path: text}, summary)."""
    root = tmp_path_factory.mktemp("bpe")
    texts = _corpus(root / "corpus")
    summary = prepare([root / "corpus"], root / "out", val_fraction=0.2, seed=1, tokenizer="bpe",
                      vocab_size=VOCAB, progress=False)
    return root / "out", texts, summary


def _split_documents(tokens: np.ndarray, eos_id: int) -> list[np.ndarray]:
    assert tokens[-1] == eos_id
    cuts = np.flatnonzero(tokens == eos_id)
    return [d[:-1] for d in np.split(tokens, cuts + 1)[:-1]]


def _block_tokenizers(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", fake_import)


# ------------------------------------------------------------ BPE tokenizer
def test_bpe_round_trip_and_specials(tmp_path):
    texts = list(_corpus(tmp_path / "corpus").values())
    tok = train_bpe(texts, VOCAB, tmp_path / "tokenizer.json", progress=False)
    assert (tok.name, tok.vocab_size) == ("bpe", VOCAB)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in ROUND_TRIP + texts:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ids.size == 0 or (ids.min() >= 3 and ids.max() < VOCAB)
        assert tok.decode(ids) == text
        full = tok.encode(text, add_bos=True, add_eos=True)
        assert (full[0], full[-1]) == (1, 2) and tok.decode(full) == text
    # Merges are used: the corpus takes well under a token a byte.
    assert sum(tok.encode(t).size for t in texts) < 0.6 * sum(len(t.encode()) for t in texts)
    # The saved file describes the same tokenizer.
    again = HFTokenizer.from_file(tmp_path / "tokenizer.json")
    assert (again.name, again.vocab_size, again.special_ids) == ("bpe", VOCAB, tok.special_ids)
    np.testing.assert_array_equal(again.encode(texts[0]), tok.encode(texts[0]))
    with pytest.raises(ValueError, match=rf"token id {VOCAB} .*\[0, {VOCAB}\)"):
        tok.decode([5, VOCAB])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="integer >= 259.*258"):
        train_bpe(texts, 258, tmp_path / "small.json", progress=False)
    with pytest.raises(ValueError, match="yields only .* fewer than vocab_size=100000"):
        train_bpe(texts, 100_000, tmp_path / "big.json", progress=False)


def test_bpe_prepare_header_and_documents(bpe_dir):
    out, texts, summary = bpe_dir
    assert (summary["tokenizer"], summary["vocab_size"]) == ("bpe", VOCAB)
    assert summary["special_ids"] == {"pad": 0, "bos": 1, "eos": 2}
    tok = load_tokenizer(out)
    assert isinstance(tok, HFTokenizer) and tok.path == out / "tokenizer.json"
    decoded = []
    for split in ("train", "val"):
        header = json.loads((out / f"{split}.json").read_text())
        assert {k: header[k] for k in ("dtype", "vocab_size", "tokenizer", "special_ids",
                                       "tokenizer_file")} == {
            "dtype": "uint16", "vocab_size": VOCAB, "tokenizer": "bpe",
            "special_ids": {"pad": 0, "bos": 1, "eos": 2}, "tokenizer_file": "tokenizer.json"}
        tokens = np.asarray(TokenFile(out / split).tokens)
        docs = _split_documents(tokens, header["special_ids"]["eos"])
        assert len(docs) == header["sources"] == summary[f"{split}_docs"]
        assert not np.isin(tokens, [0, 1]).any()  # only EOS separates documents
        decoded += [tok.decode(d) for d in docs]
    assert sorted(decoded) == sorted(texts.values())


def test_bpe_learns_from_the_train_split_only(tmp_path, monkeypatch):
    texts = _corpus(tmp_path / "corpus")
    seen = []

    def recording_train_bpe(train_texts, *args, **kwargs):
        seen.extend(train_texts)
        return train_bpe(train_texts, *args, **kwargs)
    # jaxkit.data.prepare names the function too, so take the module itself.
    monkeypatch.setattr(sys.modules["jaxkit.data.prepare"], "train_bpe", recording_train_bpe)
    summary = prepare([tmp_path / "corpus"], tmp_path / "out", val_fraction=0.25, seed=2,
                      tokenizer="bpe", vocab_size=VOCAB, progress=False)
    val_paths = {p for p in texts if str(p) in summary["val_sources"]}
    assert len(val_paths) == 5
    assert sorted(seen) == sorted(t for p, t in texts.items() if p not in val_paths)
    # No merge spells a word that occurs only in validation documents.
    tok = load_tokenizer(tmp_path / "out")
    for path in val_paths:
        for word in _words(int(path.stem[3:]), 6):
            assert tok.encode(word).size > 2


def test_prepare_with_a_tokenizer_file(bpe_dir, tmp_path):
    out, texts, _ = bpe_dir
    summary = prepare([out.parent / "corpus"], tmp_path / "again", val_fraction=0.2, seed=1,
                      tokenizer=str(out / "tokenizer.json"), progress=False)
    assert (summary["tokenizer"], summary["vocab_size"]) == ("bpe", VOCAB)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == \
        (out / "tokenizer.json").read_text()
    for split in ("train", "val"):
        assert (tmp_path / "again" / f"{split}.bin").read_bytes() == \
            (out / f"{split}.bin").read_bytes()
    # Re-preparing in place reuses the file already there.
    prepare([out.parent / "corpus"], tmp_path / "again", val_fraction=0.2, seed=1,
            tokenizer=str(tmp_path / "again" / "tokenizer.json"), progress=False)
    # Byte data written over BPE data removes the stale tokenizer.json.
    prepare([out.parent / "corpus"], tmp_path / "again", val_fraction=0.2, progress=False)
    assert not (tmp_path / "again" / "tokenizer.json").exists()
    assert isinstance(load_tokenizer(tmp_path / "again"), ByteTokenizer)


def test_prepare_cli_bpe(tmp_path, capsys):
    _corpus(tmp_path / "corpus")
    parser = argparse.ArgumentParser()
    add_prepare_args(parser)
    run_prepare(parser.parse_args(["--inputs", str(tmp_path / "corpus"), "--out",
                                   str(tmp_path / "cli"), "--tokenizer", "bpe",
                                   "--vocab-size", str(VOCAB)]))
    printed = json.loads(capsys.readouterr().out)
    assert (printed["tokenizer"], printed["vocab_size"]) == ("bpe", VOCAB)
    assert load_tokenizer(tmp_path / "cli").vocab_size == VOCAB


def test_tokenizer_file_without_eos(tmp_path):
    import tokenizers
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1, "<s>": 2},
                                                          unk_token="[UNK]"))
    hf.add_special_tokens(["[UNK]", "<s>"])
    hf.save(str(tmp_path / "word.json"))
    _corpus(tmp_path / "corpus", num_docs=3)
    with pytest.raises(ValueError, match=r"no end-of-text special token .*\['<s>', '\[UNK\]'\]"):
        prepare([tmp_path / "corpus"], tmp_path / "o", tokenizer=str(tmp_path / "word.json"),
                progress=False)
    (tmp_path / "junk.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match="junk.json.* is not a tokenizers tokenizer.json"):
        HFTokenizer.from_file(tmp_path / "junk.json")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(tokenizer="bpe"), ValueError, "'bpe' needs a vocabulary size"),
    (dict(tokenizer="byte", vocab_size=500), ValueError, "vocab_size=500 applies only to"),
    (dict(tokenizer="bpe", vocab_size=100), ValueError, "integer >= 259 .*got 100"),
    (dict(tokenizer="wordpiece"), FileNotFoundError, "'wordpiece' is neither"),
])
def test_prepare_tokenizer_argument_errors(tmp_path, kwargs, error, message):
    _corpus(tmp_path / "corpus", num_docs=3)
    with pytest.raises(error, match=message):
        prepare([tmp_path / "corpus"], tmp_path / "o", progress=False, **kwargs)
    assert not (tmp_path / "o").exists()  # refused before anything is written


# ----------------------------------------------------------- load_tokenizer
def test_load_tokenizer_checks_the_files(bpe_dir, tmp_path):
    out, texts, _ = bpe_dir
    # Headers written before special ids were recorded hold byte data.
    for split in ("train", "val"):
        write_token_file(tmp_path / "old" / split, [5, 258], 259)
    assert isinstance(load_tokenizer(tmp_path / "old"), ByteTokenizer)
    # Train and val must name the same tokenizer.
    for split in ("train", "val"):
        (tmp_path / "mixed" / f"{split}.bin").parent.mkdir(exist_ok=True)
        for suffix in (".bin", ".json"):
            (tmp_path / "mixed" / f"{split}{suffix}").write_bytes(
                (out / f"{split}{suffix}").read_bytes())
    write_token_file(tmp_path / "mixed" / "val", [5, 258], 259, special_ids={
        "pad": 256, "bos": 257, "eos": 258})
    with pytest.raises(ValueError, match="disagree on their tokenizer"):
        load_tokenizer(tmp_path / "mixed")
    # A tokenizer.json that is not the one the token files were made with
    # is refused when it is first used.
    write_token_file(tmp_path / "mixed" / "val", TokenFile(out / "val").tokens, VOCAB,
                     tokenizer="bpe", special_ids={"pad": 0, "bos": 1, "eos": 2},
                     tokenizer_file="tokenizer.json")
    train_bpe(list(texts.values()), VOCAB - 20, tmp_path / "mixed" / "tokenizer.json",
              progress=False)
    tok = load_tokenizer(tmp_path / "mixed")
    assert tok.vocab_size == VOCAB
    with pytest.raises(ValueError, match="the token files beside it were made with"):
        tok.decode([5])
    with pytest.raises(ValueError, match=r"special_ids .*eos=400, not null or an id in \[0, 400\)"):
        write_token_file(tmp_path / "x", [5], VOCAB, special_ids={"pad": 0, "bos": 1, "eos": 400})
    with pytest.raises(ValueError, match="needs special_ids"):
        write_token_file(tmp_path / "x", [5], VOCAB, tokenizer_file="tokenizer.json")


# ------------------------------------------------------------- build_data
def _config(path, *overrides):
    return load_config(None, [f"data.path={path}", "data.seq_len=32", "data.batch_size=4",
                              *overrides])


def test_build_data_reads_the_bpe_vocabulary_and_eos(bpe_dir, tmp_path):
    out, _, _ = bpe_dir
    with pytest.raises(ConfigError, match="prepare --tokenizer bpe --vocab-size 32000 --out"):
        build_data(_config(tmp_path / "none", "model.vocab_size=32000"))
    with pytest.raises(ConfigError, match="create them with: jaxkit data prepare --out"):
        build_data(_config(tmp_path / "none", "model.vocab_size=259"))
    with pytest.raises(ConfigError, match=rf"model.vocab_size \(259\) .* bpe tokenizer "
                                          rf"vocabulary \({VOCAB}\)"):
        build_data(_config(out, "model.vocab_size=259"))
    train, _ = build_data(_config(out, f"model.vocab_size={VOCAB}", "data.document_mask=true"))
    assert train.eos_id == 2
    batch = train.batch(3)
    seg, pos = document_segments(batch["inputs"], 2)
    np.testing.assert_array_equal(batch["segment_ids"], seg)
    np.testing.assert_array_equal(batch["positions"], pos)
    ends = batch["inputs"] == 2
    assert ends.any()
    np.testing.assert_array_equal(batch["segment_ids"][:, 1:] - batch["segment_ids"][:, :-1],
                                  ends[:, :-1])


# ----------------------------------------------------------- optional package
def test_missing_tokenizers_package(bpe_dir, tmp_path, monkeypatch):
    out, texts, _ = bpe_dir
    _block_tokenizers(monkeypatch)
    hint = r'need the .tokenizers. package: pip install "jaxkit\[tokenizers\]"'
    with pytest.raises(ImportError, match=hint):
        prepare([out.parent / "corpus"], tmp_path / "o", tokenizer="bpe", vocab_size=VOCAB,
                progress=False)
    with pytest.raises(ImportError, match=hint):
        HFTokenizer.from_file(out / "tokenizer.json")
    tok = load_tokenizer(out)
    with pytest.raises(ImportError, match=hint):
        tok.encode("x")
    # Training on prepared files needs only their headers.
    assert tok.eos_id == 2
    train, _ = build_data(_config(out, f"model.vocab_size={VOCAB}", "data.document_mask=true"))
    assert train.eos_id == 2
