"""Incremental detokenization and stop strings: the streamed pieces add up
to the final text, cut characters wait for their last byte, and text that
may begin a stop string is held back."""
import pytest

from jaxkit.data.tokenizer import ByteTokenizer, train_bpe
from jaxkit.generate.text import TextStream

BYTES = ByteTokenizer()


def stream(tokenizer, ids, stop=()):
    s = TextStream(tokenizer, stop)
    pieces = []
    for i in ids:
        if s.stopped:
            break
        pieces.append(s.push(i))
    pieces.append(s.finish())
    return s, pieces


def test_pieces_add_up_and_cut_characters_wait():
    text = "naïve → ok"
    s, pieces = stream(BYTES, list(text.encode()) + [BYTES.eos_id])
    assert "".join(pieces) == s.text == text
    assert "\ufffd" not in "".join(pieces)
    # "ï" is two bytes: after the first, nothing new is released
    assert pieces[2:4] == ["", "ï"]


def test_stop_string_cuts_the_text_and_holds_back_its_start():
    ids = list("say END now ENDING".encode())
    s, pieces = stream(BYTES, ids, stop=("ENDING", "xyz"))
    assert s.stopped and s.text == "say END now "
    assert "".join(pieces) == s.text
    # "E", "EN", "END", "END " could begin ENDING: released only once it cannot
    assert pieces[4:8] == ["", "", "", "END "]


def test_stop_string_with_a_bpe(tmp_path):
    corpus = ["def main():\n    return 1\n\n"] * 50
    bpe = train_bpe(corpus, 270, tmp_path / "tokenizer.json", progress=False)
    ids = bpe.encode("def main():\n    return 1\n\ndef other")
    s, pieces = stream(bpe, ids, stop=("\n\n",))
    assert s.text == "def main():\n    return 1" and "".join(pieces) == s.text
    s, pieces = stream(bpe, ids)
    assert s.text == "def main():\n    return 1\n\ndef other" and "".join(pieces) == s.text


class PieceTokenizer:
    """Token i is the bytes PIECES[i] (as a byte-level BPE's merges are)."""
    PIECES = [b"ab\xc3", b"\xa9c", b"\x80", b"d"]

    def decode(self, ids):
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def test_text_before_a_cut_character_is_shown_at_once():
    s, pieces = stream(PieceTokenizer(), [0, 1, 2, 2, 3])
    # "ab" and the first byte of "é"; "é" completed and "c"; two bytes that are no
    # character wait for what follows them
    assert pieces == ["ab", "éc", "", "", "\ufffd\ufffdd", ""]
    assert s.text == "abéc\ufffd\ufffdd"
