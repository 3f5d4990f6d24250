"""Data package: tokenizer, token files, prepare, batches, MQAR."""
import argparse
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxkit.data import (ByteTokenizer, MQARTask, TokenBatcher, TokenFile, default_corpus_paths,
                         mqar_accuracy, prepare, prepare_stdlib, unigram_entropy, write_token_file)
from jaxkit.data.batches import document_segments
from jaxkit.data.prepare import add_prepare_args, run_prepare

TOK = ByteTokenizer()


# ------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("text", ["", "hello, world", "naïve café über", "日本語のテキスト",
                                  "emoji 🎉👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\x00\t\n\r control", "a" * 1000])
def test_tokenizer_round_trip(text):
    ids = TOK.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert ids.size == 0 or ids.max() < 256
    assert TOK.decode(ids) == text
    assert TOK.decode(TOK.encode(text, add_bos=True, add_eos=True)) == text


def test_tokenizer_specials():
    assert TOK.vocab_size == 259
    assert (TOK.pad_id, TOK.bos_id, TOK.eos_id) == (256, 257, 258)
    ids = TOK.encode("hi", add_bos=True, add_eos=True)
    np.testing.assert_array_equal(ids, [257, ord("h"), ord("i"), 258])
    assert TOK.decode([256, 257, ord("o"), 258, 256, ord("k")]) == "ok"
    assert TOK.decode(np.array([], np.int32)) == ""
    # A multi-byte character cut in half decodes to the replacement character.
    assert TOK.decode(TOK.encode("é")[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="259"):
        TOK.decode([104, 259])
    with pytest.raises(ValueError, match="-1"):
        TOK.decode([-1])
    with pytest.raises(TypeError, match="bytes"):
        TOK.encode(b"bytes")


# ---------------------------------------------------------------- token files
@pytest.mark.parametrize("vocab_size,dtype", [(259, "<u2"), (65536, "<u2"), (70001, "<u4")])
def test_token_file_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(vocab_size)
    tokens = rng.integers(0, vocab_size, size=1237)
    tokens[0] = vocab_size - 1
    write_token_file(tmp_path / "train", tokens, vocab_size, sources=7)
    header = json.loads((tmp_path / "train.json").read_text())
    assert header == {"dtype": "uint16" if dtype == "<u2" else "uint32", "num_tokens": 1237,
                      "vocab_size": vocab_size, "tokenizer": "byte", "sources": 7}
    # Raw little-endian on disk, whatever the host's byte order.
    np.testing.assert_array_equal(np.fromfile(tmp_path / "train.bin", dtype=dtype), tokens)
    tf = TokenFile(str(tmp_path / "train"))
    assert (tf.num_tokens, tf.vocab_size) == (1237, vocab_size)
    assert isinstance(tf.tokens, np.memmap)
    np.testing.assert_array_equal(tf.tokens, tokens)


def test_token_file_empty(tmp_path):
    write_token_file(tmp_path / "e", np.zeros(0, np.int64), 259)
    tf = TokenFile(tmp_path / "e")
    assert tf.num_tokens == 0 and tf.tokens.size == 0


def test_token_file_write_errors(tmp_path):
    """Writing refuses ids outside the vocabulary; the faults of files on disk
    are tests/jaxkit/data/test_data_faults.py."""
    with pytest.raises(FileNotFoundError, match="missing.json"):
        TokenFile(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        write_token_file(tmp_path / "x", [5, 300], 300)
    with pytest.raises(ValueError, match="1-D"):
        write_token_file(tmp_path / "x", np.zeros((2, 2), int), 300)


# ------------------------------------------------------------ unigram entropy
def test_unigram_entropy_by_hand(tmp_path):
    # p = (1/2, 1/4, 1/4): 1.5 bits.
    write_token_file(tmp_path / "u", [3, 3, 1, 7], 259)
    assert unigram_entropy(tmp_path / "u", unit="bits") == pytest.approx(1.5, rel=1e-12)
    assert unigram_entropy(TokenFile(tmp_path / "u")) == pytest.approx(1.5 * math.log(2), rel=1e-12)
    write_token_file(tmp_path / "one", [9] * 13, 259)
    assert unigram_entropy(tmp_path / "one") == 0.0
    with pytest.raises(ValueError, match="'hartleys'"):
        unigram_entropy(tmp_path / "u", unit="hartleys")
    write_token_file(tmp_path / "e", [], 259)
    with pytest.raises(ValueError, match="no tokens"):
        unigram_entropy(tmp_path / "e")


# -------------------------------------------------------------------- prepare
def _corpus(root):
    """19 text documents (some nested, some non-ASCII) and three non-text files."""
    texts = {}
    for i in range(16):
        sub = root / ("sub" if i % 3 else "") / f"doc{i:02d}.txt"
        texts[sub] = f"document {i} ünïcödé ✓\n" * (i + 1)
    for i in range(3):
        texts[root / "deep" / "er" / f"code{i}.py"] = f"def f{i}():\n    return {i}\n"
    for path, text in texts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    (root / "blob.bin").write_bytes(b"abc\x00\x01\x02")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (root / "empty.txt").write_bytes(b"")
    return texts


def _documents(stem):
    """The documents of a token file: split at EOS, decoded."""
    tokens = np.asarray(TokenFile(stem).tokens)
    assert tokens[-1] == TOK.eos_id
    cuts = np.flatnonzero(tokens == TOK.eos_id)
    return [TOK.decode(d) for d in np.split(tokens, cuts + 1)[:-1]]


def test_prepare_splits_documents(tmp_path):
    texts = _corpus(tmp_path / "corpus")
    s = prepare([tmp_path / "corpus"], tmp_path / "out", val_fraction=0.2, seed=3, progress=False)
    assert (s["files_found"], s["skipped"]) == (22, 3)
    assert (s["train_docs"], s["val_docs"]) == (15, 4)
    train, val = _documents(tmp_path / "out" / "train"), _documents(tmp_path / "out" / "val")
    assert sorted(train + val) == sorted(texts.values())
    assert sorted(val) == sorted(texts[Path(p)] for p in s["val_sources"])
    header = TokenFile(tmp_path / "out" / "train").header
    assert header["sources"] == 15 and header["tokenizer"] == "byte"
    assert header["special_ids"] == {"pad": 256, "bos": 257, "eos": 258}
    assert "tokenizer_file" not in header
    assert s["train_tokens"] + s["val_tokens"] == sum(len(t.encode()) + 1 for t in texts.values())
    assert s["bytes"] == sum(len(t.encode()) for t in texts.values())


def test_prepare_is_deterministic(tmp_path):
    _corpus(tmp_path / "corpus")
    runs = [prepare([tmp_path / "corpus"], tmp_path / f"out{i}", val_fraction=0.25, seed=seed,
                    progress=False)["val_sources"] for i, seed in enumerate([0, 0, 1, 2])]
    assert runs[0] == runs[1]
    assert (tmp_path / "out0" / "train.bin").read_bytes() == (tmp_path / "out1" / "train.bin").read_bytes()
    assert runs[0] != runs[2] or runs[0] != runs[3]


def test_prepare_pattern_exclude_and_cap(tmp_path):
    texts = _corpus(tmp_path / "corpus")
    s = prepare([tmp_path / "corpus"], tmp_path / "py", pattern="**/*.py", val_fraction=0.3,
                progress=False)
    assert (s["files_found"], s["train_docs"] + s["val_docs"]) == (3, 3)
    s = prepare([tmp_path / "corpus"], tmp_path / "ex", pattern="**/*.txt", exclude=["sub"],
                val_fraction=0.3, progress=False)
    assert s["files_found"] == 6 + 2  # top-level docs plus latin1.txt and empty.txt
    # A single file given directly is used whatever the pattern.
    s = prepare([tmp_path / "corpus" / "doc00.txt", tmp_path / "corpus" / "sub"], tmp_path / "f",
                pattern="*.txt", val_fraction=0.1, progress=False)
    assert s["files_found"] == 11
    # The cap keeps the first documents, in path order, that fit.
    ordered = [texts[p] for p in sorted(texts, key=str)]
    limit = sum(len(t.encode()) for t in ordered[:5]) + 3
    s = prepare([tmp_path / "corpus"], tmp_path / "cap", max_bytes=limit, val_fraction=0.2,
                progress=False)
    assert s["train_docs"] + s["val_docs"] == 5 and s["bytes"] <= limit
    got = _documents(tmp_path / "cap" / "train") + _documents(tmp_path / "cap" / "val")
    assert sorted(got) == sorted(ordered[:5])


def test_prepare_errors(tmp_path):
    _corpus(tmp_path / "corpus")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=f"val_fraction.*{bad}"):
            prepare([tmp_path / "corpus"], tmp_path / "o", val_fraction=bad, progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        prepare([tmp_path / "nowhere"], tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="found 1"):
        prepare([tmp_path / "corpus" / "doc00.txt"], tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="max_bytes"):
        prepare([tmp_path / "corpus"], tmp_path / "o", max_bytes=0, progress=False)
    with pytest.raises(ValueError, match="no inputs"):
        prepare([], tmp_path / "o", progress=False)


def test_prepare_cli_and_stdlib(tmp_path, capsys):
    _corpus(tmp_path / "corpus")
    parser = argparse.ArgumentParser()
    add_prepare_args(parser)
    args = parser.parse_args(["--inputs", str(tmp_path / "corpus"), "--out", str(tmp_path / "cli"),
                              "--pattern", "**/*.txt", "--val-fraction", "0.2"])
    summary = run_prepare(args)
    printed = json.loads(capsys.readouterr().out)
    assert printed["train_docs"] == summary["train_docs"] == 13
    assert printed["val_unigram_entropy_nats"] == pytest.approx(
        unigram_entropy(tmp_path / "cli" / "val"), abs=1e-4)

    corpus = default_corpus_paths()
    assert corpus.pattern == "**/*.py" and (corpus.paths[0] / "os.py").is_file()
    s = prepare_stdlib(tmp_path / "stdlib", max_bytes=400_000, progress=False)
    assert 0 < s["bytes"] <= 400_000 and s["val_docs"] >= 1
    assert TokenFile(tmp_path / "stdlib" / "train").vocab_size == 259


# -------------------------------------------------------------------- batches
@pytest.fixture
def counting_file(tmp_path):
    """Token i at position i: a window's first input names its offset."""
    write_token_file(tmp_path / "count", np.arange(3001), 70000)
    return TokenFile(tmp_path / "count")


def test_batches_are_windows(counting_file):
    b = TokenBatcher(counting_file, seq_len=37, global_batch_size=6, seed=5).batch(11)
    assert b["inputs"].shape == b["targets"].shape == (6, 37)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32
    offsets = b["inputs"][:, :1]
    np.testing.assert_array_equal(b["inputs"], offsets + np.arange(37))
    np.testing.assert_array_equal(b["targets"], b["inputs"] + 1)
    assert offsets.min() >= 0 and offsets.max() + 37 <= 3000


def test_document_segments_by_hand_and_against_a_loop():
    x = np.array([[5, 9, 2, 9, 9, 7, 1], [9, 3, 4, 5, 6, 9, 1]])
    seg, pos = document_segments(x, 9)
    np.testing.assert_array_equal(seg, [[0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 2]])
    np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 0]])
    x = np.random.default_rng(4).integers(0, 6, (5, 40))  # EOS = 0, about 1 in 6 tokens
    seg, pos = document_segments(x, 0)
    for row in range(5):
        doc, start = 0, 0
        for i in range(40):
            if i and x[row, i - 1] == 0:
                doc, start = doc + 1, i
            assert (seg[row, i], pos[row, i]) == (doc, i - start)


def test_batches_carry_document_segments(tmp_path):
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 258, 4001)
    tokens[rng.choice(4001, 150, replace=False)] = 258  # EOS id of the byte tokenizer
    write_token_file(tmp_path / "docs", tokens, 259)
    plain = TokenBatcher(tmp_path / "docs", seq_len=64, global_batch_size=4, seed=2).batch(7)
    assert set(plain) == {"inputs", "targets"}
    b = TokenBatcher(tmp_path / "docs", seq_len=64, global_batch_size=4, seed=2,
                     eos_id=258).batch(7)
    np.testing.assert_array_equal(b["inputs"], plain["inputs"])
    seg, pos = document_segments(b["inputs"], 258)
    np.testing.assert_array_equal(b["segment_ids"], seg)
    np.testing.assert_array_equal(b["positions"], pos)
    assert b["segment_ids"].max() > 0  # the windows do hold several documents


def test_batches_are_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    write_token_file(tmp_path / "r", rng.integers(0, 259, 5003), 259)
    make = lambda seed: TokenBatcher(tmp_path / "r", seq_len=29, global_batch_size=12, seed=seed)
    a, b = make(7), make(7)
    for step in (0, 1, 1000):
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
    assert not np.array_equal(a.batch(3)["inputs"], a.batch(4)["inputs"])
    assert not np.array_equal(a.batch(3)["inputs"], make(8).batch(3)["inputs"])
    x = a.batch(2)
    np.testing.assert_array_equal(x["targets"][:, :-1], x["inputs"][:, 1:])
    # Resuming at step 5 gives the stream a run from step 0 saw from step 5 on.
    fresh = [a.batch(s)["inputs"] for s in range(10)]
    resumed = [make(7).batch(s)["inputs"] for s in range(5, 10)]
    for f, r in zip(fresh[5:], resumed):
        np.testing.assert_array_equal(f, r)
    # Process slices tile the global batch, in order.
    whole = a.batch(9)
    for count in (2, 3, 4):
        parts = [a.batch(9, process_index=i, process_count=count) for i in range(count)]
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_eval_batches(counting_file):
    a = TokenBatcher(counting_file, seq_len=50, global_batch_size=4, seed=0)
    evals = list(a.eval_batches(3))
    again = list(TokenBatcher(counting_file, seq_len=50, global_batch_size=4, seed=9).eval_batches(3))
    assert len(evals) == 3
    offsets = np.concatenate([e["inputs"][:, 0] for e in evals])
    np.testing.assert_array_equal(offsets, np.concatenate([e["inputs"][:, 0] for e in again]))
    # Spread over the whole file: first window at 0, last ends at the last token.
    assert offsets[0] == 0 and evals[-1]["targets"][-1, -1] == 3000
    assert np.all(np.diff(offsets) > 0)
    halves = [list(a.eval_batches(3, process_index=i, process_count=2)) for i in range(2)]
    for k in range(3):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][k]["inputs"], halves[1][k]["inputs"]]), evals[k]["inputs"])


def test_batcher_errors(counting_file):
    a = TokenBatcher(counting_file, seq_len=8, global_batch_size=6, seed=0)
    with pytest.raises(ValueError, match="6 is not divisible by process_count 4"):
        a.batch(0, process_index=0, process_count=4)
    with pytest.raises(ValueError, match=r"process_index must lie in \[0, 2\), got 2"):
        a.batch(0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="step.*-1"):
        a.batch(-1)
    with pytest.raises(ValueError, match="3001 tokens"):
        TokenBatcher(counting_file, seq_len=3001, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="seed.*-3"):
        TokenBatcher(counting_file, seq_len=8, global_batch_size=1, seed=-3)
    with pytest.raises(ValueError, match="global_batch_size.*0"):
        TokenBatcher(counting_file, seq_len=8, global_batch_size=0, seed=0)


# ----------------------------------------------------------------------- MQAR
@pytest.mark.parametrize("vocab,seq_len,pairs,queries",
                         [(37, 29, 5, 3), (256, 64, 8, None), (101, 47, 12, 12)])
def test_mqar_structure(vocab, seq_len, pairs, queries):
    task = MQARTask(vocab, seq_len, pairs, seed=4, global_batch_size=10, num_queries=queries,
                    repeat_queries=False)
    q = pairs if queries is None else queries
    b = task.batch(3)
    x, y, m = b["inputs"], b["targets"], b["loss_mask"]
    assert x.shape == y.shape == m.shape == (10, seq_len)
    assert x.dtype == y.dtype == np.int32 and m.dtype == np.float32
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    assert set(np.unique(m)) <= {0.0, 1.0}
    np.testing.assert_array_equal(m.sum(1), q)
    half = vocab // 2
    for row in range(10):
        keys, values = x[row, 0:2 * pairs:2], x[row, 1:2 * pairs:2]
        assert len(set(keys)) == pairs and keys.min() >= 1 and keys.max() < half
        assert values.min() >= half and values.max() < vocab
        table = dict(zip(keys.tolist(), values.tolist()))
        asked = np.flatnonzero(m[row])
        assert asked.min() >= 2 * pairs  # queries come after the context
        assert len(set(x[row, asked])) == q
        for p in asked:
            assert y[row, p] == table[x[row, p]]
        # Outside the context and the queries, only filler appears.
        rest = np.ones(seq_len, bool)
        rest[:2 * pairs] = False
        rest[asked] = False
        rest[np.minimum(asked + 1, seq_len - 1)] = False
        assert np.all(x[row, rest] == 0)


def test_mqar_repeat_queries():
    """Each query picks its pair independently: more queries than pairs are
    allowed, some pairs repeat, and every target is its key's value."""
    task = MQARTask(64, 80, 4, seed=2, global_batch_size=16, num_queries=8)
    b = task.batch(0)
    x, y, m = b["inputs"], b["targets"], b["loss_mask"]
    np.testing.assert_array_equal(m.sum(1), 8)
    for row in range(16):
        table = dict(zip(x[row, 0:8:2].tolist(), x[row, 1:8:2].tolist()))
        asked = np.flatnonzero(m[row])
        assert all(y[row, p] == table[x[row, p]] for p in asked)
        assert len(set(x[row, asked])) < 8  # 8 queries of 4 pairs repeat
    once = MQARTask(64, 80, 8, seed=2, global_batch_size=16).batch(0)
    counts = [len(set(once["inputs"][r, once["loss_mask"][r] > 0])) for r in range(16)]
    assert min(counts) < 8  # as many queries as pairs, yet some pair is left out


def test_mqar_determinism_and_slices():
    make = lambda seed: MQARTask(64, 40, 6, seed=seed, global_batch_size=8)
    a = make(1).batch(5)
    for key in a:
        np.testing.assert_array_equal(a[key], make(1).batch(5)[key])
    assert not np.array_equal(a["inputs"], make(1).batch(6)["inputs"])
    assert not np.array_equal(a["inputs"], make(2).batch(5)["inputs"])
    parts = [make(1).batch(5, process_index=i, process_count=4) for i in range(4)]
    for key in a:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), a[key])


def test_mqar_errors():
    with pytest.raises(ValueError, match="num_kv_pairs=20.*vocab_size=32 offers only 15"):
        MQARTask(32, 100, 20, seed=0, global_batch_size=2)
    with pytest.raises(ValueError, match="seq_len=20.*needs seq_len >= 23"):
        MQARTask(64, 20, 6, seed=0, global_batch_size=2)
    MQARTask(64, 23, 6, seed=0, global_batch_size=2).batch(0)  # the tightest fit works
    with pytest.raises(ValueError, match="num_queries=7 exceeds num_kv_pairs=6"):
        MQARTask(64, 40, 6, seed=0, global_batch_size=2, num_queries=7, repeat_queries=False)
    with pytest.raises(ValueError, match="not divisible"):
        MQARTask(64, 40, 6, seed=0, global_batch_size=3).batch(0, process_count=2)


def test_mqar_accuracy():
    b = MQARTask(50, 33, 5, seed=0, global_batch_size=4).batch(0)
    y, m = b["targets"], b["loss_mask"]
    logits = np.asarray(jax.random.normal(jax.random.key(1), (*y.shape, 50)))
    perfect = logits + 100.0 * np.eye(50)[y]
    assert float(mqar_accuracy(perfect, y, m)) == 1.0
    # Spoil 3 of the 20 answers and every unmasked position: only answers count.
    spoiled = perfect.copy()
    spoiled[m == 0] = logits[m == 0] - 100.0 * np.eye(50)[y[m == 0]]
    rows, cols = np.nonzero(m)
    spoiled[rows[:3], cols[:3], y[rows[:3], cols[:3]]] = -1e9
    assert float(mqar_accuracy(spoiled, y, m)) == pytest.approx(17 / 20)
    assert float(jax.jit(mqar_accuracy)(spoiled, y, m)) == pytest.approx(17 / 20)
    with pytest.raises(ValueError, match="shapes disagree"):
        mqar_accuracy(perfect[:, :-1], y, m)


def test_mqar_num_queries_from_config():
    """data.mqar_num_queries sets the queries a sequence asks (null: one per
    pair), and a sequence too short for them is refused when the data is built."""
    from jaxkit.config import load_config
    from jaxkit.run.build import build_data

    base = ["data.kind=mqar", "data.seq_len=64", "data.batch_size=4", "data.mqar_vocab_size=64",
            "data.mqar_num_kv_pairs=4", "model.vocab_size=67"]
    train, _ = build_data(load_config(None, base + ["data.mqar_num_queries=20"]))
    np.testing.assert_array_equal(train.batch(0)["loss_mask"].sum(1), 20)
    train, _ = build_data(load_config(None, base))
    np.testing.assert_array_equal(train.batch(0)["loss_mask"].sum(1), 4)
    with pytest.raises(ValueError, match="num_queries=40"):
        build_data(load_config(None, base + ["data.mqar_num_queries=40"]))
