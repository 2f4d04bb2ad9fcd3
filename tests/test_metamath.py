"""The MetaMathQA adapter (meta-math/MetaMathQA schema) on a small local file."""

from __future__ import annotations

import json
import logging

import pytest

from kava.data import DataError, load_examples

ROWS = [
    {
        "query": "Tom has 3 apples and buys 4 more. How many apples does he have?",
        "response": "Tom starts with 3 apples.\nHe buys 4 more, so he has 3 + 4 = 7 apples. "
        "The answer is: 7",
        "type": "GSM_AnsAug",
        "original_question": "...",
    },
    {
        "query": "What is $\\frac{1}{2} + \\frac{1}{4}$?",
        "response": "Adding gives $\\frac{3}{4}$. The answer is: \\frac{3}{4}",
        "type": "MATH_AnsAug",
        "original_question": "...",
    },
    {
        "query": "If x + 2 = 5, what is x?",
        "response": "We subtract 2 from both sides. So x = 3. The answer is: 3",
        "type": "GSM_SV",
        "original_question": "...",
    },
]


def write(tmp_path, rows, name="metamath.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_metamathqa_rows_become_examples(tmp_path, caplog):
    path = write(tmp_path, ROWS)
    with caplog.at_level(logging.WARNING, logger="kava.data"):
        exs = load_examples(str(path))
    assert [e.answer for e in exs] == ["7", "3"]
    assert exs[0].question == ROWS[0]["query"]
    assert exs[0].steps == (
        "Tom starts with 3 apples.",
        "He buys 4 more, so he has 3 + 4 = 7 apples.",
    )
    assert exs[1].steps == ("We subtract 2 from both sides.", "So x = 3.")
    # the MATH row is left out, counted and reported
    assert "skipped 1 records" in caplog.text and "MATH_AnsAug" in caplog.text
    # every type kept: the LaTeX answer is then an error naming the record and field
    with pytest.raises(DataError, match=r"record 2: field 'response': .*is not a number"):
        load_examples(str(path), metamath_types=[])


def test_metamathqa_errors_name_row_and_field(tmp_path):
    bad = [dict(ROWS[0], response="No marker here, 7.")]
    with pytest.raises(DataError, match=r"record 1: field 'response': no 'The answer is:'"):
        load_examples(str(write(tmp_path, bad)))
    empty = [dict(ROWS[0], query="  ")]
    with pytest.raises(DataError, match=r"record 1: field 'query': empty"):
        load_examples(str(write(tmp_path, empty, "e.json")))
    lines = tmp_path / "m.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in [ROWS[0], dict(ROWS[2], response=5)]))
    with pytest.raises(DataError, match=r"m.jsonl:2: field 'response': expected a string"):
        load_examples(str(lines))
    only_math = write(tmp_path, [ROWS[1]], "math.json")
    with pytest.raises(DataError, match="no examples"):
        load_examples(str(only_math))
