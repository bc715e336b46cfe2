"""User profiles: CSV layouts, malformed rows, the generator and its rules, the rule engine, templates."""

import collections
import csv

import pytest

from psalign.categories import CATEGORIES
from psalign.io import InputError
from psalign.users import (
    AGE_GROUPS,
    PHYSICAL_CONDITIONS,
    AgeGroup,
    UserProfile,
    check_template,
    complement_categories,
    format_user_id,
    generate_users,
    plausibility_violations,
    read_template,
    read_users,
    rule_banned_categories,
    write_users,
)

PUBLISHED_HEADER = (
    "Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,Banned_Categories,Allowed_Categories\n"
)


def _profile(age=30, religion="None", physical="healthy", mental="healthy", **kw):
    return UserProfile(
        user_id=kw.pop("user_id", "0000001"),
        age=age,
        age_group=kw.pop("age_group", "young adults"),
        gender=kw.pop("gender", "female"),
        religion=religion,
        physical_condition=physical,
        mental_condition=mental,
        **kw,
    )


def test_published_users_csv(shared_data):
    users = read_users(shared_data / "psalign" / "users.csv")
    assert len(users) == 1001
    assert [u.user_id for u in users[:3]] == ["0000001", "0000002", "0000003"]
    assert users[-1].user_id == "0001001"
    first = users[0]  # 18,adolescents,male,Islam,healthy,healthy,"['Propaganda', 'Sexuality']",...
    assert (first.age, first.age_group, first.gender, first.religion) == (18, "adolescents", "male", "Islam")
    assert first.banned_categories == ("Sexuality", "Propaganda")  # canonical order, not the file's
    assert first.allowed_categories == ("Hate", "Harassment", "Violence", "Self-Harm", "Shocking")
    with open(shared_data / "psalign" / "users.csv", newline="") as handle:
        raw = list(csv.DictReader(handle))
    assert sum(u.religion == "None" for u in users) == sum(r["Religion"] == "None" for r in raw) > 0
    for user in users:
        assert set(user.banned_categories) | set(user.allowed_categories) == set(CATEGORIES)


def test_published_layout_small_file(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text(
        PUBLISHED_HEADER
        + "2,infants & toddlers,male,None,healthy,healthy,\"['Hate', 'Sexuality']\",[]\n"
        + "\n"  # a blank line is no row: it does not shift the ids
        + "44,middle-aged,female,None,healthy,healthy,[],\"['Harrasment', 'Hate']\"\n"
    )
    first, second = read_users(path)
    assert (first.user_id, second.user_id) == ("0000001", "0000002")
    assert first.religion == "None" and first.cluster_id is None
    assert first.banned_categories == ("Hate", "Sexuality") and first.allowed_categories == ()
    assert second.banned_categories == () and second.allowed_categories == ("Hate", "Harassment")


def test_malformed_rows_are_all_reported_with_lines(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text(
        PUBLISHED_HEADER
        + "30,young adults,male,None,healthy,healthy,[],[]\n"  # line 2: fine
        + "thirty,young adults,male,None,healthy,healthy,[],[]\n"  # line 3: bad age
        + "30,young adults,male,None,healthy,healthy,\"['Gore']\",[]\n"  # line 4: unknown category
        + "30,young adults,male,None,healthy\n"  # line 5: too few cells
        + "30,young adults,male,,healthy,healthy,[],[]\n"  # line 6: empty religion
        + "30,young adults,male,None,healthy,healthy,\"__import__('os').getcwd()\",[]\n"  # line 7: not a literal
        + "30,young adults,male,None,healthy,healthy,\"[1, 2]\",[]\n"  # line 8: not strings
        + "30,young adults,male,None,healthy,healthy,\"['Hate']\",\"['Hate']\"\n"  # line 9: banned and allowed
    )
    with pytest.raises(InputError) as info:
        read_users(path)
    message = str(info.value)
    lines = {p.line for p in info.value.problems}
    assert lines == {3, 4, 5, 6, 7, 8, 9}
    assert f"{path}:3: Age: 'thirty'" in message
    assert f"{path}:4: Banned_Categories: unknown safety category 'Gore'" in message
    assert f"{path}:5: expected 8 cells, got 5" in message
    assert f"{path}:6: Religion: empty cell" in message
    assert f"{path}:7: Banned_Categories:" in message
    assert f"{path}:8: Banned_Categories:" in message and "not a list of strings" in message
    assert f"{path}:9:" in message and "both banned and allowed" in message


def test_missing_column_is_reported_on_the_header(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text("Age,Gender\n30,male\n")
    with pytest.raises(InputError, match=r"users.csv:1: header: missing column"):
        read_users(path)


def test_explicit_layout_round_trip(tmp_path):
    users = [u for u in generate_users(5, seed=4)]
    users[1] = _profile(user_id="0000042", cluster_id="13", banned_categories=["Hate"], allowed_categories=[])
    path = write_users(tmp_path / "ours.csv", users)
    header = path.read_text().splitlines()[0]
    assert header.startswith("User_ID,Cluster_ID,Age,")
    assert read_users(path) == users
    row = next(csv.DictReader(path.open(newline="")))
    assert row["User_ID"] == "0000001" and ";" in row["Allowed_Categories"]


def test_explicit_layout_errors(tmp_path):
    path = tmp_path / "ours.csv"
    path.write_text(
        "User_ID,Cluster_ID,"
        + PUBLISHED_HEADER
        + "0000007,,30,young adults,male,None,healthy,healthy,Hate;Violence,\n"
        "33,,30,young adults,male,None,healthy,healthy,,\n"
        "0000007,,30,young adults,male,None,healthy,healthy,,\n"
    )
    with pytest.raises(InputError) as info:
        read_users(path)
    message = str(info.value)
    assert f"{path}:3: User_ID: user id '33' is not 7 digits" in message
    assert f"{path}:4: User_ID: duplicate id 0000007 (first on line 2)" in message


def test_format_user_id():
    assert format_user_id(33) == "0000033"
    assert format_user_id("0000033") == "0000033"
    with pytest.raises(ValueError):
        format_user_id("33")


def test_generator_is_deterministic():
    assert generate_users(50, seed=7) == generate_users(50, seed=7)
    assert generate_users(50, seed=7) != generate_users(50, seed=8)
    assert [u.user_id for u in generate_users(3, seed=0)] == ["0000001", "0000002", "0000003"]


def test_generated_users_follow_the_rules():
    users = generate_users(3000, seed=1)
    groups = {g.name: g for g in AGE_GROUPS}
    for user in users:
        assert plausibility_violations(user) == []
        group = groups[user.age_group]
        assert group.low <= user.age <= group.high
        assert list(user.banned_categories) == rule_banned_categories(user)
        assert list(user.allowed_categories) == complement_categories(user.banned_categories)
    # no plausibility rule involves gender or the physical condition: their marginals stay nominal
    n = len(users)
    physical = collections.Counter(u.physical_condition for u in users)
    for name, p in PHYSICAL_CONDITIONS.items():
        assert abs(physical[name] / n - p) < 0.03
    assert abs(sum(u.gender == "male" for u in users) / n - 0.5) < 0.03
    # rejection removes many infants (they need no religion and few mental conditions)
    assert sum(u.age_group == "infants & toddlers" for u in users) / n < 0.025


@pytest.mark.parametrize(
    "age, religion, mental, broken",
    [
        (2, "None", "anxiety", 2),  # infant: only healthy / natural disasters; anxiety needs >= 5
        (2, "None", "natural disasters", 0),
        (11, "None", "sexual assault", 1),  # children exclude sexual assault although age >= 10
        (9, "None", "sexual assault", 2),
        (17, "None", "war", 1),
        (18, "None", "war", 0),
        (4, "None", "depression", 1),
        (5, "None", "major accidents", 0),
        (7, "Islam", "healthy", 1),
        (8, "Islam", "healthy", 0),
    ],
)
def test_plausibility_rules(age, religion, mental, broken):
    assert len(plausibility_violations(_profile(age=age, religion=religion, mental=mental))) == broken


def test_generator_rejects_bad_distributions():
    with pytest.raises(ValueError, match="sum to 1"):
        generate_users(3, religions={"Islam": 0.5, "None": 0.4})
    infants_only = (AgeGroup("infants & toddlers", 0, 3, 1.0),)
    with pytest.raises(ValueError, match="no plausible user"):
        generate_users(1, age_groups=infants_only, religions={"Islam": 1.0})


@pytest.mark.parametrize(
    "profile, banned",
    [
        (_profile(age=30), []),  # healthy adult, no religion
        (_profile(age=17), ["Violence", "Self-Harm", "Sexuality"]),
        (_profile(age=40, mental="depression"), ["Violence", "Self-Harm", "Sexuality"]),
        (_profile(age=40, physical="visual impairment"), ["Harassment", "Shocking"]),
        (_profile(age=40, religion="Buddhism"), ["Hate", "Propaganda"]),
        (_profile(age=12, religion="Islam", physical="hearing impairment", mental="anxiety"), list(CATEGORIES)),
    ],
)
def test_rule_engine(profile, banned):
    assert rule_banned_categories(profile) == banned
    labelled = profile.with_banned(banned)
    assert list(labelled.allowed_categories) == [c for c in CATEGORIES if c not in banned]


def test_templates_reject_unknown_placeholders(tmp_path):
    fields = ("age", "gender")
    assert check_template("age {age}, {gender} {{literal}}", fields)
    path = tmp_path / "t.txt"
    path.write_text("first line {age}\nsecond {agee} and {age.__class__}\nthird {age!r}\n{")
    with pytest.raises(InputError) as info:
        read_template(path, fields)
    message = str(info.value)
    assert f"{path}:2: unknown placeholder {{agee}}" in message
    assert f"{path}:2: unknown placeholder {{age.__class__}}" in message
    assert f"{path}:3: placeholder {{age}} takes no format spec" in message
    assert f"{path}:4:" in message and "literal braces" in message
