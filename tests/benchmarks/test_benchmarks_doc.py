"""BENCHMARKS.md is rendered from benchmarks/results/*.json: the two must agree,
and a results file that breaks the schema is refused with the bad field named."""
import copy
import json

import pytest

from benchmarks import render


def test_benchmarks_md_is_the_rendered_results():
    assert render.OUTPUT.read_text() == render.render(), (
        "BENCHMARKS.md differs from benchmarks/results/*.json: run python -m benchmarks.render")


def test_every_table_names_its_device_date_command_and_peers():
    for op in render.load():
        for table in op["tables"]:
            text = "\n".join(render.render_table(table))
            for field in ("device", "jax_version", "date", "command"):
                assert table[field] in text
            assert table["peers"] and all(p in text for p in table["peers"])


def _table():
    return {"title": "t", "device": "GPU", "jax_version": "0.11.2", "date": "2026-01-02",
            "command": "python -m x", "peers": ["a"], "setup": [], "notes": [],
            "columns": [{"key": "implementation", "label": "impl"},
                        {"key": "ms", "label": "ms", "format": ".3f"}],
            "rows": [{"implementation": "a", "ms": 1.5}]}


def _write(tmp_path, table):
    for op in render.ORDER:
        data = {"op": op, "title": op, "about": [], "tables": [table]}
        (tmp_path / f"{op}.json").write_text(json.dumps(data))


def test_valid_results_render_their_rows(tmp_path):
    _write(tmp_path, _table())
    text = render.render(render.load(tmp_path))
    assert "| a | 1.500 |" in text and "Measured in the same run: a." in text


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(date="23 Nov"), "date '23 Nov'"),
    (lambda t: t.pop("command"), "'command'"),
    (lambda t: t.update(peers=["a", "b"]), "peers ['b'] have no row"),
    (lambda t: t["rows"][0].update(gbps=3), "keys ['gbps']"),
    (lambda t: t["columns"].pop(0), "no column keyed 'implementation'"),
    (lambda t: t["columns"][1].pop("format"), "float 1.5 in a column without a format"),
])
def test_bad_results_are_refused(tmp_path, change, message):
    table = copy.deepcopy(_table())
    change(table)
    _write(tmp_path, table)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render.load(tmp_path)


def test_unknown_results_file_is_refused(tmp_path):
    _write(tmp_path, _table())
    (tmp_path / "convolution.json").write_text("{}")
    with pytest.raises(ValueError, match="convolution"):
        render.load(tmp_path)
