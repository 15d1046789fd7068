"""echo4o_jax.jsonl: the one rule for a JSONL line, and how its readers name a bad line."""

from __future__ import annotations

import pytest

from echo4o_jax import generate as G
from echo4o_jax.eval import common
from echo4o_jax.jsonl import jsonl_lines


def test_lines_objects_and_why_a_line_is_bad():
    lines = [b'{"a": 1}\n', b"\n", b"   \n", b"\xff\xfe\n", b"{not json\n", b"[1, 2]\n", '{"b": "\u00e9"}']
    got = list(jsonl_lines(lines))
    assert [(n, obj) for n, obj, _ in got] == [(1, {"a": 1}), (4, None), (5, None), (6, None), (7, {"b": "\u00e9"})]
    whys = [why for _, _, why in got]
    assert whys[0] is None and whys[4] is None
    assert whys[1].startswith("not UTF-8 text (")
    assert whys[2].startswith("not JSON: ")
    assert whys[3] == "expected a JSON object, got list"


def test_readers_name_file_and_line(tmp_path):
    f = tmp_path / "req.jsonl"
    f.write_bytes(b'{"prompt_ids": [1]}\n\xff\n')
    with pytest.raises(G.GenerateError, match=r"req.jsonl:2: not UTF-8 text"):
        G.read_requests(f)  # the line is named (the whole file's decode error named no line)
    with pytest.raises(common.UsageError, match=r"req.jsonl:2: not UTF-8 text"):
        common.jsonl_records(f)
    f.write_bytes(b'{"prompt_ids": [1]}\n\n"text"\n')
    with pytest.raises(G.GenerateError, match=r"req.jsonl:3: expected a JSON object, got str"):
        G.read_requests(f)


def test_journal_counts_lines_that_are_not_entries(tmp_path, caplog):
    from echo4o_jax.synth.journal import JOURNAL_NAME, Journal

    (tmp_path / JOURNAL_NAME).write_bytes(b'{"key": "k1", "v": 1}\n[1]\n{"v": 2}\n{"key": 3}\n\xff\n{"key": "k2"}\n')
    with caplog.at_level("WARNING"):
        j = Journal(tmp_path, read_only=True)
    assert len(j) == 2 and "k1" in j and "k2" in j and j.bad_lines == 4
    assert "line 2 is not a journal entry (expected a JSON object, got list)" in caplog.text
    assert "line 3 is not a journal entry (no string `key`)" in caplog.text
    assert "line 5 is not a journal entry (not UTF-8 text" in caplog.text
