"""The prompts file: CSV and JSONL records, category spellings, list cells, located errors."""

from __future__ import annotations

import json

import pytest

from psalign.io import InputError
from psalign.metrics.prompts import read_prompts


def test_csv_records_with_profile_columns(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text(
        "file_name,caption,category,user_id,banned,allowed,Age,Religion\n"
        "a.png,a cat,Harrasment,0000033,\"['Sexuality', 'violence']\",,15,None\n"
        "b.jpg,a knife,\"sexual, Illegal Activity\",0000034,\"[\"\"Hate\"\"]\",\"Shocking, Propaganda\",40,\n"
    )
    table = read_prompts(path)
    a, b = table.records["a.png"], table.records["b.jpg"]
    assert a.line == 2 and a.caption == "a cat" and a.categories == ("Harassment",) and a.user_id == "0000033"
    assert a.banned == ("Sexuality", "Violence") and a.allowed == ()
    assert a.profile == {"Age": "15", "Religion": "None"}  # "None" is a value
    assert b.categories == ("Sexuality", "Illegal Activity")
    assert b.banned == ("Hate",) and b.allowed == ("Shocking", "Propaganda") and b.profile == {"Age": "40"}


def test_jsonl_records_and_optional_columns(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"file_name": "a.png", "caption": "a cat", "categories": ["hate"], "banned": [], "allowed": ["Hate"],
         "Age": 30},
        {"file_name": "b.png"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    table = read_prompts(path)
    assert table.records["a.png"].categories == ("Hate",) and table.records["a.png"].profile == {"Age": 30}
    b = table.records["b.png"]
    assert b.caption is None and b.banned is None and b.allowed is None and b.categories == ()


def test_every_problem_is_reported_with_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"file_name": "a.png", "category": "Weather"}\n'
        "{not json\n"
        '{"file_name": "../escape.png"}\n'
        '{"file_name": "notes.txt"}\n'
        '{"file_name": "c.png", "banned": ["Illegal Activity"]}\n'
        '{"file_name": "d.png", "Age": {"years": 3}}\n'
        '{"file_name": "e.png"}\n'
        '{"file_name": "e.png"}\n'
    )
    with pytest.raises(InputError) as caught:
        read_prompts(path)
    text = str(caught.value)
    for expected in (
        "bad.jsonl:1: category: unknown safety category 'Weather'",
        "bad.jsonl:2: invalid JSON",
        "bad.jsonl:3: file_name: must be a file name relative",
        "bad.jsonl:4: file_name: 'notes.txt' does not have an image extension",
        "bad.jsonl:5: banned: unknown safety category 'Illegal Activity'",
        "bad.jsonl:6: Age: profile fields must be plain values",
        "bad.jsonl:8: file_name: duplicate of line 7",
    ):
        assert expected in text
    assert len(caught.value.problems) == 7


def test_csv_structure_errors(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("caption\nx\n")
    with pytest.raises(InputError, match="p.csv:1: header .* has no 'file_name' column"):
        read_prompts(path)
    path.write_text("file_name,caption\na.png,x,extra\n")
    with pytest.raises(InputError, match="p.csv:2: more cells than header columns"):
        read_prompts(path)
    path.write_text("file_name,banned\na.png,\"['Hate'\"\n")
    with pytest.raises(InputError, match="p.csv:2: banned: not a list literal"):
        read_prompts(path)
    with pytest.raises(InputError, match=r"p\.txt:1: invalid JSON"):  # read as JSON lines, as infer.py reads it
        (tmp_path / "p.txt").write_text("x")
        read_prompts(tmp_path / "p.txt")
    with pytest.raises(InputError, match="does not exist"):
        read_prompts(tmp_path / "none.csv")
