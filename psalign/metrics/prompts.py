"""The evaluation prompts file: which caption, category and user each image file belongs to.

A CSV (with a header) or a JSONL file (one object per line), one record per image:

==================  ========================================================================
``file_name``       required; the image's file name inside every evaluated folder (the key that
                    pairs images of different methods)
``caption``         the prompt the image was generated from (CLIPScore, judge)
``category``        safety category, or several separated by commas / as a list (per-category
                    InPro); any spelling :func:`psalign.categories.canonical_category` knows,
                    ``Illegal Activity`` included. ``categories`` is accepted as the column name.
``user_id``         the user the image was generated for
``banned``          the user's banned categories (judge): a list (JSONL), or in CSV a JSON /
                    Python list literal or comma-separated names; empty means none
``allowed``         the user's allowed categories, same format
``attack``          the adversarial prompt set the record comes from (attack success rate)
any other column    a profile field shown to the judge (``Age``, ``Gender``, ``Religion``, ...)
==================  ========================================================================

Also read: the prompts file ``infer.py`` generated from (any file that is not ``.csv``, or whose
first character is ``{``, is read as JSON lines, as ``infer.py`` reads it), whose ``user_data``
gives ``user_id``, ``banned`` / ``allowed`` (from a ``safety_level`` or profile fields; a
``User_ID`` alone leaves them unknown) and the profile fields, and whose keys ``infer.py`` does
not know are dropped as ``infer.py`` ignores them; and the I2P and attack prompt sets of
:mod:`psalign.prompt_sets` as published (their image names as
:func:`psalign.prompt_sets.read_prompt_set` gives them).
"""

from __future__ import annotations

import ast
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from psalign.categories import canonical_category
from psalign.io import InputError, InputProblem, parse_json_line, read_text_lines, read_utf8_text
from psalign.metrics.images import IMAGE_EXTENSIONS

_CATEGORY_COLUMNS = ("category", "categories")
_KNOWN_COLUMNS = frozenset({"file_name", "caption", "user_id", "banned", "allowed", "attack", *_CATEGORY_COLUMNS})
#: Keys of an ``infer.py`` prompts line that are not evaluation columns (read, then dropped).
_INFER_ONLY_KEYS = ("user_data", "seed", "level")
#: Prompt set layouts read through :func:`psalign.prompt_sets.read_prompt_set` (their extra columns
#: are the set's bookkeeping, not profile fields).
_PROMPT_SET_LAYOUTS = ("i2p", "ringabell", "i2p_attack", "mma")


@dataclass(frozen=True)
class PromptRecord:
    """One image's record; ``line`` is its 1-based line in the prompts file. ``banned`` / ``allowed``
    are ``None`` when the file has no such column (canonical category names otherwise)."""

    file_name: str
    line: int
    caption: str | None = None
    categories: tuple[str, ...] = ()
    user_id: str | None = None
    banned: tuple[str, ...] | None = None
    allowed: tuple[str, ...] | None = None
    profile: dict[str, Any] = field(default_factory=dict)
    attack: str | None = None


@dataclass(frozen=True)
class PromptTable:
    """All records of a prompts file, keyed by image file name."""

    path: Path
    records: dict[str, PromptRecord]


def _category_list(value: Any, allow_extra: bool) -> tuple[str, ...]:
    """Parse a category cell: a list, a JSON/Python list literal, comma-separated names, or empty."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ()
        if text.startswith("["):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as error:
                raise ValueError(f"not a list literal: {text!r}") from error
        else:
            value = [part for part in (p.strip() for p in text.split(",")) if part]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of category names, got {value!r}")
    names = [canonical_category(v, allow_extra=allow_extra) for v in value]
    return tuple(dict.fromkeys(names))


def _file_name_problem(file_name: Any) -> str | None:
    if not isinstance(file_name, str) or not file_name.strip():
        return "missing or empty"
    pure = PurePosixPath(file_name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        return f"must be a file name relative to the image folder, got {file_name!r}"
    if pure.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"{file_name!r} does not have an image extension ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    return None


def _record(raw: dict[str, Any], source: str, line: int, problems: list[InputProblem]) -> PromptRecord | None:
    """Build one record from a raw row, appending every problem found to ``problems``."""
    before = len(problems)

    def problem(column: str, reason: str) -> None:
        problems.append(InputProblem(source, line, reason, column))

    file_name = raw.get("file_name")
    reason = _file_name_problem(file_name)
    if reason:
        problem("file_name", reason)
    category_columns = [c for c in _CATEGORY_COLUMNS if c in raw]
    if len(category_columns) > 1:
        problem("category", "give either 'category' or 'categories', not both")
    categories: tuple[str, ...] = ()
    if category_columns:
        try:
            categories = _category_list(raw[category_columns[0]], allow_extra=True)
        except ValueError as error:
            problem(category_columns[0], str(error))
    lists: dict[str, tuple[str, ...] | None] = {"banned": None, "allowed": None}
    for column in lists:
        if column in raw:
            try:
                lists[column] = _category_list(raw[column], allow_extra=False)
            except ValueError as error:
                problem(column, str(error))
    text: dict[str, str | None] = {}
    for column in ("caption", "user_id", "attack"):
        value = raw.get(column)
        if value is not None and not isinstance(value, (str, int)):
            problem(column, f"expected text, got {value!r}")
            value = None
        text[column] = None if value is None or str(value) == "" else str(value)
    profile = {}
    for key, value in raw.items():
        if key in _KNOWN_COLUMNS or value in (None, ""):
            continue
        if isinstance(value, (dict, list)):
            problem(key, "profile fields must be plain values (text or numbers)")
        profile[key] = value
    if len(problems) > before:
        return None
    return PromptRecord(
        file_name=str(file_name),
        line=line,
        caption=text["caption"],
        categories=categories,
        user_id=text["user_id"],
        banned=lists["banned"],
        allowed=lists["allowed"],
        profile=profile,
        attack=text["attack"],
    )


def _from_infer_line(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON line as evaluation columns (``ValueError`` naming the field at fault). A line with any
    of infer's own keys (``user_data``, ``seed``, ``level``) is an ``infer.py`` prompts line: its
    profile comes from ``user_data``, and keys infer does not know are dropped, as infer ignores
    them. Any other line keeps its extra keys as profile fields."""
    from psalign.inference.records import LINE_KEYS, resolve_user

    if not any(key in value for key in _INFER_ONLY_KEYS):
        return value
    row = {key: item for key, item in value.items()
           if key not in _INFER_ONLY_KEYS and (key in LINE_KEYS or key in _KNOWN_COLUMNS)}
    user_data = value.get("user_data")
    if user_data is None:
        return row
    user = resolve_user(user_data)
    if user.user_id is not None:
        row["user_id"] = user.user_id
    if user.profile is not None:
        row["banned"] = list(user.profile.banned_categories)
        row["allowed"] = list(user.profile.allowed_categories)
    profile_keys = ("age", "age_group", "gender", "religion", "physical_condition", "mental_condition")
    row.update({key: item for key, item in user_data.items() if key.lower() in profile_keys})
    return row


def _prompt_set_rows(path: Path, problems: list[InputProblem]) -> list[tuple[int, dict[str, Any]]]:
    """The rows of a published I2P or attack prompt set, as evaluation columns."""
    from psalign.prompt_sets import read_prompt_set

    try:
        prompt_set = read_prompt_set(path)
    except InputError as error:
        problems += error.problems
        return []
    return [(row.line, {"file_name": row.file_name, "caption": row.caption, "categories": list(row.categories),
                        **({"attack": row.attack} if row.attack else {})})
            for row in prompt_set.rows]


def _starts_with_json_object(path: Path) -> bool:
    """Whether the file's first non-blank character is ``{``: JSON lines, whatever the suffix (as
    ``infer.py`` reads them); a CSV header cannot start so."""
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"{")


def _raw_rows(path: Path, problems: list[InputProblem]) -> list[tuple[int, dict[str, Any]]]:
    from psalign.prompt_sets import detect_layout  # imports the inference package: loaded when needed

    source = str(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix.lower() != ".csv" or _starts_with_json_object(path):
        for line in read_text_lines(path):
            if line.text is None:
                problems.append(InputProblem(source, line.number, line.problem))
                continue
            if not line.text.strip():
                continue
            value, reason = parse_json_line(line.text)
            if reason:
                problems.append(InputProblem(source, line.number, reason))
            elif not isinstance(value, dict):
                problems.append(InputProblem(source, line.number, "a record must be a JSON object"))
            else:
                try:
                    rows.append((line.number, _from_infer_line(value)))
                except ValueError as error:
                    problems.append(InputProblem(source, line.number, str(error)))
    else:
        try:
            text = read_utf8_text(path)
        except InputError as error:
            problems += error.problems
            return rows
        with io.StringIO(text, newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is not None and detect_layout([c.strip() for c in reader.fieldnames]) \
                    in _PROMPT_SET_LAYOUTS:
                return _prompt_set_rows(path, problems)
            if reader.fieldnames is None or "file_name" not in reader.fieldnames:
                problems.append(InputProblem(source, 1, f"header {reader.fieldnames} has no 'file_name' column"))
                return rows
            for row in reader:
                if None in row:
                    problems.append(InputProblem(source, reader.line_num, "more cells than header columns"))
                    continue
                rows.append((reader.line_num, row))
    return rows


def read_prompts(path: str | Path) -> PromptTable:
    """Read and validate a prompts file; every problem is reported at once as an :class:`InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError([InputProblem(str(path), 0, "prompts file does not exist")])
    problems: list[InputProblem] = []
    records: dict[str, PromptRecord] = {}
    for line, raw in _raw_rows(path, problems):
        record = _record(raw, str(path), line, problems)
        if record is None:
            continue
        if record.file_name in records:
            first = records[record.file_name].line
            problems.append(InputProblem(str(path), line, f"duplicate of line {first}", "file_name"))
            continue
        records[record.file_name] = record
    if not records and not problems:
        problems.append(InputProblem(str(path), 0, "no records"))
    if problems:
        raise InputError(problems)
    return PromptTable(path, records)
