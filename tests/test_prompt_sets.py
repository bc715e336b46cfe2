"""Published evaluation and attack prompt sets, named level sets, and the prompts evaluate.py reads."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from psalign.io import InputError
from psalign.levels import PUBLISHED_LEVEL_USERS, level_users, reference_user
from psalign.metrics.prompts import read_prompts
from psalign.prompt_sets import I2P_COLUMNS, LAYOUT_COLUMNS, infer_lines, read_prompt_set

EVAL_SAMPLES = {  # sample file -> layout
    "CoProv2_test_head20.csv": "captions",
    "coco_10k_head20.csv": "captions",
    "i2p_4073_head20.csv": "i2p",
    "sage_seen_head20.csv": "sage",
    "sage_unseen_head20.csv": "sage",
    "ud_1434_head20.csv": "captions",
}
ATTACK_SAMPLES = {
    "ringabell_violence_K77_head20.csv": "ringabell",
    "p4d_nudity_esd_head20.csv": "i2p_attack",
    "unlearndiff_nudity_head20.csv": "i2p_attack",
    "unlearndiff_violence_head20.csv": "i2p_attack",
}
I2P_CELLS = ["0", "30.0", "0.0", "30.0", "10.0", "0.1", "https://example.org/x"]  # I2P_COLUMNS after categories


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------ the published sample files

@pytest.mark.parametrize("name", sorted(EVAL_SAMPLES))
def test_each_published_evaluation_set_sample_reads(shared_data, name):
    path = shared_data / "psalign" / "eval_data" / name
    prompt_set = read_prompt_set(path)
    raw = csv_rows(path)
    assert prompt_set.layout == EVAL_SAMPLES[name]
    assert [row.file_name for row in prompt_set.rows] == [r["file_name"] for r in raw]
    assert [row.caption for row in prompt_set.rows] == [r["caption"] for r in raw]
    if prompt_set.layout == "sage":
        assert [row.user_id for row in prompt_set.rows] == [f"{int(r['user_id']):07d}" for r in raw]
    if "category" in raw[0] or "categories" in raw[0]:
        assert all(row.categories for row in prompt_set.rows)
    assert all(row.seed is None and row.attack is None for row in prompt_set.rows)
    evaluated = read_prompts(path)  # evaluate.py takes the published file as it is
    assert set(evaluated.records) == {r["file_name"] for r in raw}
    assert all(not record.profile for record in evaluated.records.values())  # I2P columns are not profile fields


@pytest.mark.parametrize("name", sorted(ATTACK_SAMPLES))
def test_each_attack_set_sample_reads_with_its_evaluation_seed(shared_data, name):
    path = shared_data / "attacks" / name
    prompt_set = read_prompt_set(path, attack="the_attack")
    raw = csv_rows(path)
    assert prompt_set.layout == ATTACK_SAMPLES[name] and prompt_set.is_attack
    assert [row.seed for row in prompt_set.rows] == [int(r["evaluation_seed"]) for r in raw]
    assert [row.file_name for row in prompt_set.rows] == [f"{int(r['case_number']):05d}.png" for r in raw]
    assert [row.caption for row in prompt_set.rows] == [r["prompt"] for r in raw]
    assert {row.attack for row in prompt_set.rows} == {"the_attack"}
    lines = infer_lines(prompt_set, {"safety_level": "level_5"}, "level_5")
    assert [line["seed"] for line in lines] == [int(r["evaluation_seed"]) for r in raw]


# ------------------------------------------------------------------ constructed files

def test_every_layout_on_constructed_files(tmp_path):
    write_csv(tmp_path / "copro.csv", ["caption", "file_name", "category"],
              [["a cat", "0_0.jpg", "Harrasment"], ["a dog", "1_0.jpg", "Illegal Activity"]])
    write_csv(tmp_path / "i2p.csv", ["file_name", "caption", *I2P_COLUMNS, "sd_seed"],
              [["0.jpg", "a storm", "violence, self-harm", *I2P_CELLS, "12"]])
    write_csv(tmp_path / "sage.csv", ["file_name", "caption", "user_id"], [["u.jpg", "a rally", "33"]])
    write_csv(tmp_path / "rab.csv", ["prompt", "case_number", "evaluation_seed"], [["x y", "7", "41"]])
    write_csv(tmp_path / "p4d.csv", ["", "prompt", *I2P_COLUMNS, "evaluation_seed", "case_number"],
              [["0", "a nude", "sexual", *I2P_CELLS, "99", "3"]])
    write_csv(tmp_path / "mma.csv", list(LAYOUT_COLUMNS["mma"]), [["t", "adv words", "sanitized words", "clean"]] * 2)
    copro = read_prompt_set(tmp_path / "copro.csv")
    assert [r.categories for r in copro.rows] == [("Harassment",), ("Illegal Activity",)]
    i2p = read_prompt_set(tmp_path / "i2p.csv")
    assert i2p.layout == "i2p" and i2p.rows[0].categories == ("Violence", "Self-Harm") and i2p.rows[0].seed is None
    sage = read_prompt_set(tmp_path / "sage.csv")
    assert sage.has_users and sage.rows[0].user_id == "0000033"
    rab = read_prompt_set(tmp_path / "rab.csv")
    assert (rab.rows[0].file_name, rab.rows[0].seed, rab.rows[0].attack) == ("00007.png", 41, "ringabell")
    p4d = read_prompt_set(tmp_path / "p4d.csv", attack="p4d")
    assert (p4d.layout, p4d.rows[0].file_name, p4d.rows[0].seed, p4d.rows[0].categories) == \
        ("i2p_attack", "00003.png", 99, ("Sexuality",))
    mma = read_prompt_set(tmp_path / "mma.csv")
    assert [(r.file_name, r.caption) for r in mma.rows] == [("00000.png", "adv words"), ("00001.png", "adv words")]
    sanitized = read_prompt_set(tmp_path / "mma.csv", mma_prompt="sanitized_adv_prompt")
    assert sanitized.rows[0].caption == "sanitized words" and sanitized.rows[0].attack == "mma"



def test_bad_rows_are_named_by_file_line_and_column(tmp_path):
    path = write_csv(tmp_path / "rab.csv", ["prompt", "case_number", "evaluation_seed"], [
        ["fine", "0", "1"],
        ["", "1", "2"],
        ["seed", "2", "-5"],
        ["case", "x", "3"],
        ["again", "0", "4"],
        ["short", "5"],
    ])
    with pytest.raises(InputError) as raised:
        read_prompt_set(path)
    text = str(raised.value)
    assert f"{path}:3: prompt: missing or empty" in text
    assert f"{path}:4: evaluation_seed: must be between 0 and 2**63 - 1" in text
    assert f"{path}:5: case_number: must be a whole number" in text
    assert f"{path}:6: case_number: 00000.png is also line 2's image" in text
    assert f"{path}:7: expected 3 cells, got 2" in text
    sage = write_csv(tmp_path / "sage.csv", ["file_name", "caption", "user_id"],
                     [["../up.jpg", "x", "1"], ["a.jpg", "x", "one"], ["b.txt", "x", "2"]])
    text = str(pytest.raises(InputError, read_prompt_set, sage).value)
    assert f"{sage}:2: file_name: '../up.jpg' contains '..'" in text
    assert f"{sage}:3: user_id: must be a whole number" in text
    assert f"{sage}:4: file_name: 'b.txt' must end in one of" in text
    copro = write_csv(tmp_path / "copro.csv", ["caption", "file_name", "category"], [["x", "a.jpg", "Weather"]])
    text = str(pytest.raises(InputError, read_prompt_set, copro).value)
    assert f"{copro}:2: category: unknown safety category 'Weather'" in text


def test_headers_are_checked(tmp_path):
    unknown = write_csv(tmp_path / "u.csv", ["text", "name"], [["a", "b"]])
    assert "matches no prompt set layout" in str(pytest.raises(InputError, read_prompt_set, unknown).value)
    short = write_csv(tmp_path / "s.csv", ["file_name", "caption"], [["a.jpg", "b"]])
    text = str(pytest.raises(InputError, read_prompt_set, short, "sage").value)
    assert f"{short}:1: header: the sage layout needs column(s) ['user_id']" in text
    (tmp_path / "e.csv").write_text("")
    assert "the file is empty" in str(pytest.raises(InputError, read_prompt_set, tmp_path / "e.csv").value)
    only = write_csv(tmp_path / "o.csv", ["file_name", "caption"], [])
    assert "no rows" in str(pytest.raises(InputError, read_prompt_set, only).value)


def test_infer_lines_are_valid_infer_prompts(tmp_path):
    from psalign.inference.records import read_prompt_records
    from psalign.toy import bundled_paths

    sage = read_prompt_set(write_csv(tmp_path / "sage.csv", ["file_name", "caption", "user_id"],
                                     [["u1.png", "a red circle", "1001"], ["u2.png", "a blue square", "1002"]]))
    copro = read_prompt_set(write_csv(tmp_path / "copro.csv", ["caption", "file_name", "category"],
                                      [["a red circle with a fierce clash", "c.png", "Violence"]]))
    sets = {"own_users": infer_lines(sage), "level": infer_lines(copro, {"safety_level": "level_3"}, "level_3"),
            "no_user": infer_lines(copro)}
    for name, lines in sets.items():
        prompts = tmp_path / f"{name}.jsonl"
        prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
        records, problems = read_prompt_records(prompts, bundled_paths().embeds, need_users=name != "no_user")
        assert problems == [] and len(records) == len(lines), name
    assert [r.user.user_id for r in read_prompt_records(tmp_path / "own_users.jsonl", bundled_paths().embeds)[0]] == \
        ["0001001", "0001002"]
    level_line = infer_lines(copro, {"safety_level": "level_3"}, "level_3")[0]
    assert level_line == {"file_name": "c.png", "caption": "a red circle with a fierce clash", "category": "Violence",
                          "user_data": {"safety_level": "level_3"}, "level": "level_3"}
    assert len(infer_lines(sage, limit=1)) == 1


def test_evaluate_reads_the_prompts_file_infer_read(tmp_path):
    lines = [
        {"file_name": "a.png", "caption": "x", "user_data": {"safety_level": "level_3"}, "level": "level_3",
         "category": "Violence"},
        {"file_name": "b.png", "caption": "y", "user_data": {"User_ID": "0000002"}, "seed": 5, "attack": "p4d"},
        {"file_name": "c.png", "caption": "z",
         "user_data": {"Age": 12, "Gender": "male", "Banned_Categories": ["Hate"]}},
        {"file_name": "d.png", "caption": "w"},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_prompts(path).records
    level = reference_user("level_3")
    assert (records["a.png"].banned, records["a.png"].allowed) == (level.banned_categories, level.allowed_categories)
    assert records["a.png"].user_id == level.user_id and records["a.png"].categories == ("Violence",)
    assert (records["b.png"].user_id, records["b.png"].banned, records["b.png"].attack) == ("0000002", None, "p4d")
    assert records["c.png"].banned == ("Hate",) and records["c.png"].profile == {"Age": 12, "Gender": "male"}
    assert records["d.png"].user_id is None and records["d.png"].profile == {}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"file_name": "a.png", "caption": "x", "user_data": {"safety_level": "level_9"}}) + "\n")
    assert f"{bad}:1: safety_level: unknown safety level" in str(pytest.raises(InputError, read_prompts, bad).value)


def test_evaluate_reads_an_infer_line_as_infer_does(tmp_path):
    from psalign.inference.records import read_prompt_records

    line = {"file_name": "a.png", "caption": "x", "user_data": {"safety_level": "level_3"}, "seed": 1,
            "notes": {"by": "hand"}, "weight": 2}
    path = tmp_path / "prompts.csv"  # infer.py reads any file as JSON lines, whatever its name
    path.write_text(json.dumps(line) + "\n")
    warnings = []
    records, problems = read_prompt_records(path, need_users=False, warn=warnings.append)
    assert len(records) == 1 and not problems and len(warnings) == 2  # infer ignores the two unknown keys
    record = read_prompts(path).records["a.png"]
    assert record.profile == {} and record.banned == reference_user("level_3").banned_categories
    plain = tmp_path / "plain.jsonl"  # no infer key: an evaluation record, its extra keys are profile fields
    plain.write_text(json.dumps({"file_name": "a.png", "Age": 30}) + "\n")
    assert read_prompts(plain).records["a.png"].profile == {"Age": 30}


def test_infer_refuses_a_bad_label(tmp_path):
    from psalign.inference.records import read_prompt_records

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"file_name": "a.png", "caption": "x", "level": 3, "attack": "a\nb"}) + "\n")
    _, problems = read_prompt_records(path, need_users=False)
    assert [f"{p.field}: {p.reason}"[:29] for p in problems] == ["level: must be non-empty text",
                                                                  "attack: must be one line of a"]


# ------------------------------------------------------------------ level sets

def published_users_csv(path: Path, count: int = 1001) -> Path:
    """A users.csv in the published layout (no id column: row k is user k), every user banning
    the categories named by its row number's parity."""
    rows = []
    for index in range(count):
        banned = ["Hate"] if index % 2 else []
        allowed = [c for c in ("Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda")
                   if c not in banned]
        rows.append([30, "young adults", "female", "None", "healthy", "healthy", repr(banned), repr(allowed)])
    return write_csv(path, ["Age", "Age_Group", "Gender", "Religion", "Physical_Condition", "Mental_Condition",
                            "Banned_Categories", "Allowed_Categories"], rows)


def test_published_levels_are_the_published_users(tmp_path):
    users = published_users_csv(tmp_path / "users.csv")
    embeds = tmp_path / "embeds"
    embeds.mkdir()
    for user_id in ("0000797", "0000002"):
        np.save(embeds / f"{user_id}.npy", np.ones(4, np.float32))
    np.save(embeds / "embedding_0000742.npy", np.ones(4, np.float32))  # the published file name
    found = level_users("published", ["level_1", "level_3", "level_4"], users, embeds)
    assert [(u.level, u.user_id, u.user_data, u.label) for u in found] == [
        ("level_1", "0000797", {"User_ID": "0000797"}, "level_1@0000797"),
        ("level_3", "0000002", {"User_ID": "0000002"}, "level_3@0000002"),
        ("level_4", "0000742", {"User_ID": "0000742"}, "level_4@0000742"),
    ]
    assert found[1].profile.banned_categories == ("Hate",)  # row 2 of the file (index 1): odd, bans Hate
    with pytest.raises(InputError) as raised:
        level_users("published", ["level_0", "strict", "level_9"], users, embeds)
    text = str(raised.value)
    assert "unknown safety level 'level_9'" in text
    with pytest.raises(InputError) as raised:
        level_users("published", ["level_0", "strict"], users, embeds)
    text = str(raised.value)
    assert "level_0 is user 0001001, whose embedding 0001001.npy is not there" in text
    assert "level_5 is user 0000501" in text
    few = published_users_csv(tmp_path / "few.csv", count=10)
    assert "level_1 is user 0000797, which the file does not hold (10 users)" in \
        str(pytest.raises(InputError, level_users, "published", ["level_1"], few, embeds).value)
    assert "give its path" in str(pytest.raises(InputError, level_users, "published", ["level_1"]).value)
    assert "unknown level set" in str(pytest.raises(InputError, level_users, "paper", ["level_1"]).value)
    reference = level_users("reference", ["moderate"])
    assert [(u.level, u.user_id, u.user_data) for u in reference] == \
        [("level_3", "9999993", {"safety_level": "level_3"})]


def test_published_level_mapping_matches_the_reference_data(shared_data):
    readme = (shared_data / "README.md").read_text(encoding="utf-8")
    for level, user_id in PUBLISHED_LEVEL_USERS.items():
        assert f"{level} = user {user_id}" in readme or f"{level} = {user_id}" in readme
    from psalign.users import read_users, users_by_id

    users = users_by_id(read_users(shared_data / "psalign" / "users.csv"))
    assert users[PUBLISHED_LEVEL_USERS["level_0"]].banned_categories == ()
    assert users[PUBLISHED_LEVEL_USERS["level_5"]].banned_categories == reference_user("level_5").banned_categories
    embeds = shared_data / "psalign"  # holds embedding_0000001.npy and embedding_0000002.npy only
    assert level_users("published", ["level_3"], shared_data / "psalign" / "users.csv", embeds)[0].user_id == "0000002"
    with pytest.raises(InputError, match="level_1 is user 0000797, whose embedding"):
        level_users("published", ["level_1"], shared_data / "psalign" / "users.csv", embeds)


def test_the_command_line_writes_one_prompts_file_per_level(tmp_path, capsys):
    from psalign.prompt_sets import main

    path = write_csv(tmp_path / "rab.csv", ["prompt", "case_number", "evaluation_seed"],
                     [["a", "0", "5"], ["b", "1", "6"]])
    assert main([str(path), "--output", str(tmp_path / "p.jsonl"), "--level", "level_0", "strict", "--limit", "1"]) == 0
    for level in ("level_0", "level_5"):
        lines = [json.loads(line) for line in (tmp_path / f"p_{level}.jsonl").open()]
        assert lines == [{"file_name": "00000.png", "caption": "a", "seed": 5, "attack": "ringabell",
                          "user_data": {"safety_level": level}, "level": level}]
    sage = write_csv(tmp_path / "sage.csv", ["file_name", "caption", "user_id"], [["u.png", "x", "7"]])
    assert main([str(sage), "--output", str(tmp_path / "s.jsonl"), "--no_users"]) == 0
    assert json.loads((tmp_path / "s.jsonl").read_text()) == {"file_name": "u.png", "caption": "x"}
    assert main([str(sage), "--output", str(tmp_path / "t.jsonl"), "--levels", "published", "--level", "level_1"]) == 2
    assert "give its path" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()
