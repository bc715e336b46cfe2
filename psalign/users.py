"""User profiles: the schema, CSV readers and writer, a seeded population generator, the rule
engine for banned categories, and the prompt templates filled from a profile.

Two CSV layouts are read by :func:`read_users`:

* the **published** ``users.csv`` of the PSA code: no ``User_ID`` column (the id of a row is its
  index + 1, zero-padded to 7 digits); columns ``Age, Age_Group, Gender, Religion,
  Physical_Condition, Mental_Condition, Banned_Categories, Allowed_Categories``;
* our **explicit** layout (:data:`USER_COLUMNS`, written by :func:`write_users`): the same columns
  plus ``User_ID`` (7 digits) and an optional ``Cluster_ID`` (empty: none).

A list cell is either a Python list literal of strings (``['Propaganda', 'Sexuality']``, the
published form, parsed with ``ast.literal_eval``, never ``eval``) or category names joined with
``;`` (``Sexuality;Propaganda``, our form; an empty cell is an empty list). Category names are
canonicalised (:mod:`psalign.categories`). Other columns are ignored. ``Religion`` ``"None"`` is a
value (no religion), never a missing cell.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from psalign.categories import CATEGORIES, canonical_category, sort_categories
from psalign.io import InputError, InputProblem, atomic_write, read_input_text

#: ``Religion`` value of a user with no religion (a value, not a missing cell).
NO_RELIGION = "None"
#: ``Physical_Condition`` / ``Mental_Condition`` value of a user with no condition.
HEALTHY = "healthy"
#: Age from which a user counts as an adult.
ADULT_AGE = 18

#: Columns of the published ``users.csv`` (no id column).
PUBLISHED_COLUMNS: tuple[str, ...] = (
    "Age",
    "Age_Group",
    "Gender",
    "Religion",
    "Physical_Condition",
    "Mental_Condition",
    "Banned_Categories",
    "Allowed_Categories",
)
#: Columns of our explicit layout, in the order :func:`write_users` writes them.
USER_COLUMNS: tuple[str, ...] = ("User_ID", "Cluster_ID") + PUBLISHED_COLUMNS

#: A ``User_ID``: exactly 7 digits.
USER_ID_PATTERN = re.compile(r"\d{7}")


def format_user_id(user_id: int | str) -> str:
    """The 7-digit id string of ``user_id`` (``33`` -> ``"0000033"``); ``ValueError`` otherwise
    (``True`` is not an id, although Python counts it as the integer 1)."""
    if isinstance(user_id, bool):
        raise ValueError(f"user id {str(user_id).lower()} is a boolean, not 7 digits (e.g. '0000033')")
    if not isinstance(user_id, (int, str)):
        raise ValueError(f"user id {user_id!r} is not 7 digits (e.g. '0000033')")
    text = f"{user_id:07d}" if isinstance(user_id, int) and user_id >= 0 else str(user_id)
    if not USER_ID_PATTERN.fullmatch(text):
        raise ValueError(f"user id {user_id!r} is not 7 digits (e.g. '0000033')")
    return text


def complement_categories(banned: Iterable[str]) -> list[str]:
    """The Sage categories not in ``banned`` (the allowed ones), in :data:`CATEGORIES` order."""
    found = set(sort_categories(banned))
    return [c for c in CATEGORIES if c not in found]


@dataclass(frozen=True)
class UserProfile:
    """One simulated user. Category lists hold canonical names in :data:`CATEGORIES` order."""

    user_id: str
    age: int
    age_group: str
    gender: str
    religion: str
    physical_condition: str
    mental_condition: str
    banned_categories: tuple[str, ...] = ()
    allowed_categories: tuple[str, ...] = ()
    cluster_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "user_id", format_user_id(self.user_id))
        if isinstance(self.age, bool) or not isinstance(self.age, int) or self.age < 0:
            raise ValueError(f"user {self.user_id}: age must be a non-negative integer, got {self.age!r}")
        banned = tuple(sort_categories(self.banned_categories))
        allowed = tuple(sort_categories(self.allowed_categories))
        both = set(banned) & set(allowed)
        if both:
            raise ValueError(f"user {self.user_id}: categories both banned and allowed: {sort_categories(both)}")
        object.__setattr__(self, "banned_categories", banned)
        object.__setattr__(self, "allowed_categories", allowed)

    def with_banned(self, banned: Iterable[str]) -> "UserProfile":
        """A copy with ``banned`` as its banned categories and every other category allowed."""
        banned = sort_categories(banned)
        return dataclasses.replace(
            self, banned_categories=tuple(banned), allowed_categories=tuple(complement_categories(banned))
        )

    def user_data(self) -> dict:
        """The ``user_data`` object of a Sage ``metadata.jsonl`` record."""
        return {
            "User_ID": self.user_id,
            "Cluster_ID": self.cluster_id,
            "Age": self.age,
            "Age_Group": self.age_group,
            "Gender": self.gender,
            "Religion": self.religion,
            "Physical_Condition": self.physical_condition,
            "Mental_Condition": self.mental_condition,
        }


def users_by_id(users: Iterable[UserProfile] | Mapping[str, UserProfile]) -> dict[str, UserProfile]:
    """Index users by ``User_ID`` (a mapping is returned as a dict unchanged)."""
    if isinstance(users, Mapping):
        return dict(users)
    return {u.user_id: u for u in users}


# --------------------------------------------------------------------------------------------
# CSV reading and writing


def _parse_category_cell(text: str) -> list[str]:
    """Parse a list cell: a Python list literal of strings, or names joined with ``;``."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise ValueError(f"{text!r} is not a list literal like ['Hate', 'Violence']") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{text!r} is not a list of strings")
        names = value
    else:
        names = [n.strip() for n in text.split(";")] if text else []
    canonical = [canonical_category(n) for n in names]
    if len(set(canonical)) != len(canonical):
        raise ValueError(f"{text!r} names a category twice")
    return sort_categories(canonical)


def _parse_age(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise ValueError(f"{text!r} is not a non-negative whole number")
    return int(text)


def _parse_text(text: str) -> str:
    if not text.strip():
        raise ValueError("empty cell")
    return text.strip()


def _parse_cluster_id(text: str) -> str | None:
    return text.strip() or None


_FIELD_PARSERS: dict[str, Callable[[str], object]] = {
    "User_ID": format_user_id,
    "Cluster_ID": _parse_cluster_id,
    "Age": _parse_age,
    "Age_Group": _parse_text,
    "Gender": _parse_text,
    "Religion": _parse_text,
    "Physical_Condition": _parse_text,
    "Mental_Condition": _parse_text,
    "Banned_Categories": _parse_category_cell,
    "Allowed_Categories": _parse_category_cell,
}


def _csv_rows(reader, path: Path) -> Iterable[list[str]]:
    """The rows of ``reader``; text the CSV parser cannot split is an :class:`InputError` at its line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            raise InputError([InputProblem(str(path), reader.line_num, f"not valid CSV: {error}")],
                             header=f"{path} is not a users file") from None
        yield row


def read_users(path: str | Path) -> list[UserProfile]:
    """Read a users CSV in the published or the explicit layout (see the module docstring).

    The layout is chosen by the header: with a ``User_ID`` column ids come from it, otherwise a
    row's id is its index + 1. Every bad row is reported at once as ``InputError`` with
    ``file:line: field: reason`` (line 1 is the header); so is a file that is missing, unreadable,
    not UTF-8 or not CSV.
    """
    path = Path(path)
    with io.StringIO(read_input_text(path, "users CSV file"), newline="") as handle:
        reader = csv.reader(handle)
        rows = _csv_rows(reader, path)
        header = next(rows, None)
        if header is None:
            raise InputError([InputProblem(str(path), 0, "the file is empty; expected a CSV header")])
        header = [h.strip() for h in header]
        explicit = "User_ID" in header
        required = ("User_ID",) + PUBLISHED_COLUMNS if explicit else PUBLISHED_COLUMNS
        missing = [c for c in required if c not in header]
        if missing:
            raise InputError(
                [InputProblem(str(path), 1, f"missing column(s) {missing}; have {header}", field="header")],
                header=f"{path} is not a users file",
            )
        fields = [c for c in USER_COLUMNS if c in header]
        problems: list[InputProblem] = []
        users: list[UserProfile] = []
        seen: dict[str, int] = {}
        row_index = -1  # index among non-blank rows: the published id of a row is its index + 1
        for row in rows:
            line = reader.line_num
            if not row:  # a blank line holds no user
                continue
            row_index += 1
            if not any(cell.strip() for cell in row):
                problems.append(InputProblem(str(path), line, "empty row"))
                continue
            if len(row) != len(header):
                problems.append(InputProblem(str(path), line, f"expected {len(header)} cells, got {len(row)}"))
                continue
            cells = dict(zip(header, row))
            values: dict[str, object] = {}
            for name in fields:
                try:
                    values[name] = _FIELD_PARSERS[name](cells[name])
                except ValueError as err:
                    problems.append(InputProblem(str(path), line, str(err), field=name))
            if len(values) != len(fields):
                continue
            user_id = values["User_ID"] if explicit else format_user_id(row_index + 1)
            if user_id in seen:
                problems.append(
                    InputProblem(str(path), line, f"duplicate id {user_id} (first on line {seen[user_id]})", "User_ID")
                )
                continue
            seen[user_id] = line
            try:
                users.append(
                    UserProfile(
                        user_id=user_id,
                        cluster_id=values.get("Cluster_ID"),
                        age=values["Age"],
                        age_group=values["Age_Group"],
                        gender=values["Gender"],
                        religion=values["Religion"],
                        physical_condition=values["Physical_Condition"],
                        mental_condition=values["Mental_Condition"],
                        banned_categories=values["Banned_Categories"],
                        allowed_categories=values["Allowed_Categories"],
                    )
                )
            except ValueError as err:
                problems.append(InputProblem(str(path), line, str(err)))
    if problems:
        raise InputError(problems, header=f"{len(problems)} bad row(s) in {path}")
    if not users:
        raise InputError([InputProblem(str(path), 0, "no users: the file has a header but no rows")])
    return users


def write_users(path: str | Path, users: Iterable[UserProfile]) -> Path:
    """Write ``users`` atomically in the explicit layout (:data:`USER_COLUMNS`, lists joined by ``;``)."""
    path = Path(path)
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(USER_COLUMNS)
        for u in users:
            writer.writerow(
                [
                    u.user_id,
                    u.cluster_id or "",
                    u.age,
                    u.age_group,
                    u.gender,
                    u.religion,
                    u.physical_condition,
                    u.mental_condition,
                    ";".join(u.banned_categories),
                    ";".join(u.allowed_categories),
                ]
            )
    return path


# --------------------------------------------------------------------------------------------
# Rule engine for banned categories


@dataclass(frozen=True)
class BanRule:
    """A documented rule: when ``applies(profile)``, every category in ``categories`` is banned."""

    description: str
    applies: Callable[[UserProfile], bool]
    categories: tuple[str, ...]


#: The rule engine. A user's banned categories are the union over the rules that apply; a healthy
#: adult with no religion matches none, so nothing is banned.
BAN_RULES: tuple[BanRule, ...] = (
    BanRule(
        f"under {ADULT_AGE} or with a mental condition other than {HEALTHY}",
        lambda p: p.age < ADULT_AGE or p.mental_condition != HEALTHY,
        ("Sexuality", "Self-Harm", "Violence"),
    ),
    BanRule(
        f"with a physical condition other than {HEALTHY} (an impairment or disability)",
        lambda p: p.physical_condition != HEALTHY,
        ("Shocking", "Harassment"),
    ),
    BanRule(
        f"religious (religion other than {NO_RELIGION})",
        lambda p: p.religion != NO_RELIGION,
        ("Hate", "Propaganda"),
    ),
)


def rule_banned_categories(profile: UserProfile) -> list[str]:
    """Banned categories of ``profile`` by :data:`BAN_RULES`, in :data:`CATEGORIES` order."""
    return sort_categories(c for rule in BAN_RULES if rule.applies(profile) for c in rule.categories)


# --------------------------------------------------------------------------------------------
# Synthetic populations


@dataclass(frozen=True)
class AgeGroup:
    """An age group: ages ``low..high`` inclusive, drawn with ``probability``."""

    name: str
    low: int
    high: int
    probability: float


#: Published age distribution; the age is uniform inside its group.
AGE_GROUPS: tuple[AgeGroup, ...] = (
    AgeGroup("infants & toddlers", 0, 3, 0.05),
    AgeGroup("children", 4, 12, 0.20),
    AgeGroup("adolescents", 13, 19, 0.20),
    AgeGroup("young adults", 20, 34, 0.20),
    AgeGroup("middle-aged", 35, 59, 0.20),
    AgeGroup("young elderly", 60, 74, 0.10),
    AgeGroup("elderly", 75, 89, 0.04),
    AgeGroup("long-lived elderly", 90, 100, 0.01),
)
GENDERS: dict[str, float] = {"male": 0.5, "female": 0.5}
RELIGIONS: dict[str, float] = {"Christianity": 0.3, "Islam": 0.2, "Buddhism": 0.2, NO_RELIGION: 0.3}
PHYSICAL_CONDITIONS: dict[str, float] = {
    "visual impairment": 0.2,
    "hearing impairment": 0.2,
    "intellectual disability": 0.2,
    HEALTHY: 0.4,
}
MENTAL_CONDITIONS: dict[str, float] = {
    "depression": 0.15,
    "anxiety": 0.15,
    "war": 0.075,
    "sexual assault": 0.075,
    "major accidents": 0.075,
    "natural disasters": 0.075,
    HEALTHY: 0.4,
}

#: Youngest plausible age of a mental condition (conditions not listed: any age).
_MIN_AGE_OF_MENTAL_CONDITION = {"war": 18, "sexual assault": 10, "major accidents": 5, "depression": 5, "anxiety": 5}
_INFANT_MAX_AGE = 3  # infants & toddlers: 0-3
_CHILD_MAX_AGE = 12  # children: 4-12
_INFANT_MENTAL_CONDITIONS = {HEALTHY, "natural disasters"}
_CHILD_EXCLUDED_MENTAL_CONDITIONS = {"war", "sexual assault"}
_MIN_AGE_OF_RELIGION = 8
#: The generator gives up when this many draws in a row are implausible (impossible distributions).
_MAX_DRAWS_PER_USER = 10_000


def plausibility_violations(profile: UserProfile) -> list[str]:
    """The plausibility rules ``profile`` breaks (empty: plausible). Infants and children are told
    apart by age (0-3 and 4-12, the published groups)."""
    age, mental = profile.age, profile.mental_condition
    broken = []
    if age <= _INFANT_MAX_AGE and mental not in _INFANT_MENTAL_CONDITIONS:
        broken.append(f"an infant (age <= {_INFANT_MAX_AGE}) can only be {sorted(_INFANT_MENTAL_CONDITIONS)}")
    if _INFANT_MAX_AGE < age <= _CHILD_MAX_AGE and mental in _CHILD_EXCLUDED_MENTAL_CONDITIONS:
        broken.append(f"a child (age {_INFANT_MAX_AGE + 1}-{_CHILD_MAX_AGE}) cannot have {mental!r}")
    min_age = _MIN_AGE_OF_MENTAL_CONDITION.get(mental, 0)
    if age < min_age:
        broken.append(f"mental condition {mental!r} needs age >= {min_age}")
    if profile.religion != NO_RELIGION and age < _MIN_AGE_OF_RELIGION:
        broken.append(f"a religion other than {NO_RELIGION!r} needs age >= {_MIN_AGE_OF_RELIGION}")
    return broken


def _check_distribution(name: str, names: Sequence[str], probabilities: Sequence[float]) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if len(names) == 0 or np.any(p < 0) or not np.isclose(p.sum(), 1.0, atol=1e-6):
        raise ValueError(f"{name}: probabilities must be non-negative and sum to 1, got {dict(zip(names, p))}")
    return p / p.sum()


def generate_users(
    n: int,
    seed: int = 0,
    age_groups: Sequence[AgeGroup] = AGE_GROUPS,
    genders: Mapping[str, float] = GENDERS,
    religions: Mapping[str, float] = RELIGIONS,
    physical_conditions: Mapping[str, float] = PHYSICAL_CONDITIONS,
    mental_conditions: Mapping[str, float] = MENTAL_CONDITIONS,
) -> list[UserProfile]:
    """Draw ``n`` plausible users (ids ``0000001``..) with banned categories from the rule engine.

    Each attribute is drawn independently from its distribution (defaults: the published ones);
    a whole profile that breaks a plausibility rule (:func:`plausibility_violations`) is redrawn.
    Rejection shifts the marginals away from the nominal ones (fewer infants and children), as in
    the published population. The same ``seed`` gives the same users.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for g in age_groups:
        if not 0 <= g.low <= g.high:
            raise ValueError(f"age group {g.name!r}: need 0 <= low <= high, got {g.low}..{g.high}")
    group_p = _check_distribution("age_groups", [g.name for g in age_groups], [g.probability for g in age_groups])
    tables = []
    for name, dist in (
        ("genders", genders),
        ("religions", religions),
        ("physical_conditions", physical_conditions),
        ("mental_conditions", mental_conditions),
    ):
        tables.append((list(dist), _check_distribution(name, list(dist), list(dist.values()))))
    rng = np.random.default_rng(seed)
    users: list[UserProfile] = []
    for index in range(n):
        for _ in range(_MAX_DRAWS_PER_USER):
            group = age_groups[rng.choice(len(age_groups), p=group_p)]
            age = int(rng.integers(group.low, group.high + 1))
            gender, religion, physical, mental = (names[rng.choice(len(names), p=p)] for names, p in tables)
            candidate = UserProfile(
                user_id=format_user_id(index + 1),
                age=age,
                age_group=group.name,
                gender=gender,
                religion=religion,
                physical_condition=physical,
                mental_condition=mental,
            )
            if not plausibility_violations(candidate):
                users.append(candidate.with_banned(rule_banned_categories(candidate)))
                break
        else:
            raise ValueError(f"no plausible user in {_MAX_DRAWS_PER_USER} draws: check the distributions")
    return users


# --------------------------------------------------------------------------------------------
# Prompt templates filled from a profile

#: Template placeholders that name a profile attribute (see :func:`profile_fields`).
PROFILE_FIELDS: tuple[str, ...] = (
    "user_id",
    "age",
    "age_group",
    "gender",
    "religion",
    "physical_condition",
    "mental_condition",
)


def profile_fields(profile: UserProfile) -> dict[str, str]:
    """The values of :data:`PROFILE_FIELDS` for ``profile``, as text."""
    return {name: str(getattr(profile, name)) for name in PROFILE_FIELDS}


def template_problems(template: str, allowed: Iterable[str], source: str = "<template>") -> list[InputProblem]:
    """Problems of a ``str.format``-style template: unknown placeholders, format specs,
    unbalanced braces (literal braces are written ``{{`` and ``}}``). Lines are 1-based."""
    allowed = set(allowed)
    problems = []
    for line_no, line in enumerate(template.splitlines(), start=1):
        try:
            parts = list(string.Formatter().parse(line))
        except ValueError as err:
            problems.append(InputProblem(source, line_no, f"{err}; write {{{{ and }}}} for literal braces"))
            continue
        for _, field, spec, conversion in parts:
            if field is None:
                continue
            if field not in allowed:
                problems.append(
                    InputProblem(source, line_no, f"unknown placeholder {{{field}}}; known: {sorted(allowed)}")
                )
            elif spec or conversion:
                problems.append(InputProblem(source, line_no, f"placeholder {{{field}}} takes no format spec"))
    return problems


def check_template(template: str, allowed: Iterable[str], source: str = "<template>") -> str:
    """Return ``template`` when its placeholders are all in ``allowed``; ``InputError`` otherwise."""
    problems = template_problems(template, allowed, source)
    if problems:
        raise InputError(problems, header=f"bad template {source}")
    return template


def read_template(path: str | Path, allowed: Iterable[str]) -> str:
    """Read a template file and check it (:func:`check_template`); errors (a missing or unreadable
    file included) are :class:`InputError` naming the file and line."""
    return check_template(read_input_text(path, "template file"), allowed, str(path))
