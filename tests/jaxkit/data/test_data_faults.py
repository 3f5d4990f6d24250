"""Damaged token files: corrupt, truncated, deleted or described wrongly by their
header. Each is refused on opening with a one-line error naming the file (the
command line prints it as is: tests/jaxkit/run/test_cli.py)."""
import json

import numpy as np
import pytest

from jaxkit.data import DataError, TokenFile, load_tokenizer, prepare, write_token_file

VOCAB = 259  # the byte tokenizer's


@pytest.fixture
def stem(tmp_path):
    """A sound 1000-token file of byte-tokenizer ids, every id up to the largest."""
    tokens = np.arange(1000) % VOCAB
    write_token_file(tmp_path / "train", tokens, VOCAB)
    return tmp_path / "train"


def header_of(stem) -> dict:
    return json.loads(stem.with_suffix(".json").read_text())


def rewrite_header(stem, **changes) -> None:
    stem.with_suffix(".json").write_text(json.dumps(header_of(stem) | changes))


def refused(stem, error=DataError) -> str:
    with pytest.raises(error) as info:
        TokenFile(stem)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_sound_file_opens(stem):
    assert TokenFile(stem).num_tokens == 1000


def test_random_bytes_are_refused(stem):
    """Random bytes decode to uint16 ids far beyond a 259-id vocabulary."""
    data = stem.with_suffix(".bin")
    data.write_bytes(np.random.default_rng(0).bytes(data.stat().st_size))
    message = refused(stem)
    assert str(data) in message and "outside the vocabulary [0, 259)" in message


def test_one_corrupt_id_at_the_end_is_found(stem):
    """The whole file is read, not a sample: a single bad id in the last
    position is enough."""
    data = stem.with_suffix(".bin")
    tokens = np.fromfile(data, "<u2")
    tokens[-1] = VOCAB
    tokens.tofile(data)
    assert f"holds token id {VOCAB}," in refused(stem)


def test_a_header_that_understates_the_vocabulary(stem):
    rewrite_header(stem, vocab_size=200)
    message = refused(stem)
    assert "holds token id 258" in message and "[0, 200)" in message
    assert str(stem.with_suffix(".json")) in message


@pytest.mark.parametrize("change, expected", [
    (lambda b: b[:-2], "1998 bytes but its header promises 1000 uint16 tokens (2000 bytes)"),
    (lambda b: b[:-1], "1999 bytes"),
    (lambda b: b"", "0 bytes"),
    (lambda b: b + b"\0\0", "2002 bytes"),
], ids=["truncated", "odd size", "emptied", "grown"])
def test_a_size_that_disagrees_with_the_header(stem, change, expected):
    data = stem.with_suffix(".bin")
    data.write_bytes(change(data.read_bytes()))
    message = refused(stem)
    assert str(data) in message and expected in message


@pytest.mark.parametrize("changes, expected", [
    ({"num_tokens": 999}, "promises 999 uint16 tokens"),
    ({"dtype": "uint32"}, "promises 1000 uint32 tokens (4000 bytes)"),
    ({"num_tokens": True}, "num_tokens=True"),
    ({"vocab_size": -1}, "vocab_size=-1"),
    ({"dtype": "int8"}, "'int8'"),
], ids=["num_tokens", "dtype", "bool count", "negative vocab", "unknown dtype"])
def test_a_header_that_misdescribes_the_data(stem, changes, expected):
    rewrite_header(stem, **changes)
    message = refused(stem)
    assert str(stem.with_suffix(".json")) in message or str(stem.with_suffix(".bin")) in message
    assert expected in message


def test_a_damaged_header(stem):
    header = stem.with_suffix(".json")
    sound = header.read_text()
    header.write_text(sound[:len(sound) // 2])
    assert f"token file header {header} is not valid JSON" in refused(stem)
    header.write_bytes(b"\xff\xfe")
    assert "is not valid JSON" in refused(stem)
    header.write_text(json.dumps({k: v for k, v in json.loads(sound).items() if k != "num_tokens"}))
    assert f"token file header {header} must be an object with keys" in refused(stem)


def test_deleted_files(stem):
    stem.with_suffix(".bin").unlink()
    message = refused(stem, FileNotFoundError)
    assert f"token data {stem.with_suffix('.bin')} not found" in message
    stem.with_suffix(".json").unlink()
    message = refused(stem, FileNotFoundError)
    assert f"token file header {stem.with_suffix('.json')} not found" in message
    assert "jaxkit data prepare" in message


def test_damaged_packed_rows(tmp_path):
    """Rows of 10 tokens with their segment ids: the segment file must be
    there, one id per token, and row_len must divide the tokens."""
    stem = tmp_path / "packed"
    tokens = np.arange(40).reshape(4, 10)
    write_token_file(stem, tokens, VOCAB, segment_ids=np.ones((4, 10), np.int32))
    assert TokenFile(stem).row_len == 10
    segments = stem.with_name("packed.segments.bin")
    sound = segments.read_bytes()
    segments.write_bytes(sound[:-2])
    assert f"segment ids {segments} hold 78 bytes, not one uint16 per token" in refused(stem)
    segments.unlink()
    assert f"segment ids {segments} not found" in refused(stem, FileNotFoundError)
    segments.write_bytes(sound)
    rewrite_header(stem, row_len=12)
    assert "row_len=12; expected an integer >= 2 dividing num_tokens=40" in refused(stem)
    for bad, expected in [(dict(segment_ids=np.ones((4, 9))), "must both be [rows, row_len >= 2]"),
                          (dict(segment_ids=np.full((4, 10), 11)), "outside [0, row_len=10]")]:
        with pytest.raises(DataError, match=expected.replace("[", r"\[")):
            write_token_file(stem, tokens, VOCAB, **bad)


def test_splits_that_disagree_on_their_tokenizer(stem):
    write_token_file(stem.with_name("val"), np.arange(10), 300)
    with pytest.raises(DataError, match="disagree on their tokenizer"):
        load_tokenizer(stem.parent)


def test_prepare_refuses_bad_inputs_with_data_errors(tmp_path):
    (tmp_path / "one.txt").write_text("a single document")
    for kwargs, expected in [({"val_fraction": 1.5}, "val_fraction"),
                             ({"max_bytes": 0}, "max_bytes"),
                             ({"tokenizer": "bpe"}, "needs a vocabulary size"),
                             ({"vocab_size": 300}, "applies only to tokenizer 'bpe'"),
                             ({}, "need at least 2 text documents")]:
        with pytest.raises(DataError, match=expected) as info:
            prepare([tmp_path / "one.txt"], tmp_path / "out", progress=False, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="nothing"):
        prepare([tmp_path / "nothing"], tmp_path / "out", progress=False)
