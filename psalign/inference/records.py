"""Prompt files for generation: one JSON object per line, validated before any model is loaded.

Each line: ``{"file_name": "img_0001.png", "caption": "...", "user_data": {...}}``, and optionally
``"seed"``: an integer that replaces the seed derived from the run seed and the file name (give
one prompt's lines for several users the same seed to compare the users on the same noise).
The user is resolved from ``user_data`` in this order:

1. ``safety_level`` (``level_0`` ... ``level_5``, ``permissive``/``moderate``/``strict``): the
   reference user of that level (:mod:`psalign.levels`); any ``user_id`` is only logged;
2. profile fields (``Age``, ``Age_Group``, ``Gender``, ``Religion``, ``Physical_Condition``,
   ``Mental_Condition``, ``Banned_Categories``, ``Allowed_Categories``; any case): a profile user
   whose embedding is computed from the profile (attributes not given are those of the reference
   adult; banned categories not given come from the rule engine);
3. ``User_ID`` / ``user_id`` alone: the embedding is read from the embeddings folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from psalign.embeddings import find_user_embedding
from psalign.io import InputProblem
from psalign.levels import canonical_level, reference_user
from psalign.categories import sort_categories
from psalign.users import UserProfile, complement_categories, format_user_id, rule_banned_categories

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_PROFILE_KEYS = {
    "age": "age",
    "age_group": "age_group",
    "gender": "gender",
    "religion": "religion",
    "physical_condition": "physical_condition",
    "mental_condition": "mental_condition",
}
_CATEGORY_KEYS = {"banned_categories": "banned_categories", "allowed_categories": "allowed_categories"}


@dataclass(frozen=True)
class RecordUser:
    """Who a record is generated for. ``key`` identifies the embedding (one per distinct user)."""

    key: str
    label: str  # what the generation log and grids call this user
    user_id: str | None  # where its embedding is stored (``<embeds_folder>/<user_id>.npy``), if anywhere
    profile: UserProfile | None  # what to encode when no stored embedding exists


@dataclass(frozen=True)
class PromptRecord:
    line: int
    file_name: str
    caption: str
    user: RecordUser | None
    data: dict  # the parsed line, kept for the generation log
    seed: int | None = None  # the line's own sampling seed, if it gives one


#: A line's ``seed`` must lie in [0, MAX_SEED] (what ``torch.Generator.manual_seed`` accepts without wrapping).
MAX_SEED = 2**63 - 1


def seed_problem(seed: object) -> str | None:
    """Why ``seed`` cannot be a line's sampling seed (None if it can)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        return f"must be an integer, got {seed!r}"
    if not 0 <= seed <= MAX_SEED:
        return f"must be between 0 and 2**63 - 1, got {seed}"
    return None


def file_name_problem(file_name: object) -> str | None:
    """Why ``file_name`` cannot be an output path inside the save folder (None if it can)."""
    if not isinstance(file_name, str) or not file_name.strip():
        return "must be a non-empty string"
    if "\\" in file_name:
        return f"{file_name!r} contains a backslash; use '/' for sub-folders"
    path = PurePosixPath(file_name)
    if path.is_absolute():
        return f"{file_name!r} is absolute; it must be relative to --save_path"
    if ".." in path.parts:
        return f"{file_name!r} contains '..' and would escape --save_path"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"{file_name!r} must end in one of {', '.join(IMAGE_SUFFIXES)}"
    return None


def _profile_user(data: dict, user_id: str | None) -> RecordUser:
    """A profile user from ``user_data`` fields (raises ``ValueError`` with the field at fault)."""
    attributes, categories = {}, {}
    for key, value in data.items():
        name = key.lower()
        if name in _PROFILE_KEYS:
            attributes[_PROFILE_KEYS[name]] = value
        elif name in _CATEGORY_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key}: must be a list of category names")
            categories[_CATEGORY_KEYS[name]] = value
    if "age" in attributes and (isinstance(attributes["age"], bool) or not isinstance(attributes["age"], int)):
        raise ValueError(f"Age: must be an integer, got {attributes['age']!r}")
    profile = reference_user("level_0", **attributes, **({"user_id": user_id} if user_id else {}))
    lists = {}
    for name, value in categories.items():
        try:
            lists[name] = sort_categories(value)
        except ValueError as error:
            raise ValueError(f"{name.title()}: {error}") from None
    if "banned_categories" in lists:
        profile = profile.with_banned(lists["banned_categories"])
    elif "allowed_categories" in lists:
        profile = profile.with_banned(complement_categories(lists["allowed_categories"]))
    else:
        profile = profile.with_banned(rule_banned_categories(profile))
    if "allowed_categories" in lists and lists["allowed_categories"] != list(profile.allowed_categories):
        raise ValueError("Allowed_Categories: must list exactly the categories that are not banned")
    digest = hashlib.sha256(json.dumps(profile.__dict__, sort_keys=True, default=list).encode()).hexdigest()[:12]
    key = f"user:{user_id}" if user_id else f"profile:{digest}"
    return RecordUser(key=key, label=user_id or f"profile-{digest}", user_id=user_id, profile=profile)


def resolve_user(user_data: object) -> RecordUser:
    """The :class:`RecordUser` of a ``user_data`` object; ``ValueError`` naming the field at fault."""
    if not isinstance(user_data, dict):
        raise ValueError("user_data: must be an object")
    raw_id = user_data.get("User_ID", user_data.get("user_id"))
    if "safety_level" in user_data:
        try:
            level = canonical_level(user_data["safety_level"])
        except ValueError as error:
            raise ValueError(f"safety_level: {error}") from None
        profile = reference_user(level)
        return RecordUser(key=f"level:{level}", label=level, user_id=profile.user_id, profile=profile)
    user_id = None
    if raw_id is not None:
        try:
            user_id = format_user_id(raw_id)
        except ValueError as error:
            raise ValueError(f"User_ID: {error}") from None
    if any(k.lower() in _PROFILE_KEYS or k.lower() in _CATEGORY_KEYS for k in user_data):
        return _profile_user(user_data, user_id)
    if user_id is None:
        raise ValueError("user_data: needs User_ID, safety_level or profile fields")
    return RecordUser(key=f"user:{user_id}", label=user_id, user_id=user_id, profile=None)


def read_prompt_records(
    path: str | Path,
    embeds_folder: str | Path | None = None,
    need_users: bool = True,
    can_encode: bool = False,
    need_profiles: bool = False,
) -> tuple[list[PromptRecord], list[InputProblem]]:
    """Parse and check every line of a prompts JSONL file; returns ``(valid records, problems)``.

    With ``need_users`` each record must name a user whose embedding can be had: stored in
    ``embeds_folder``, or computable from a profile when ``can_encode`` (an encoder was given).
    With ``need_profiles`` each record's user must come with banned categories (a safety level or
    profile fields).
    Nothing is loaded but the text file and file-existence checks.
    """
    path = Path(path)
    if not path.is_file():
        return [], [InputProblem(str(path), 0, "prompts file not found")]
    records: list[PromptRecord] = []
    problems: list[InputProblem] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue

            def problem(reason: str, field: str | None = None) -> None:
                problems.append(InputProblem(str(path), number, reason, field))

            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                problem(f"invalid JSON ({error.msg} at column {error.colno})")
                continue
            if not isinstance(data, dict):
                problem("each line must be a JSON object")
                continue
            before = len(problems)
            caption = data.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                problem("missing or empty", "caption")
            file_name = data.get("file_name")
            reason = "missing" if file_name is None else file_name_problem(file_name)
            if reason:
                problem(reason, "file_name")
            else:
                file_name = PurePosixPath(file_name).as_posix()
                if file_name in seen:
                    problem(f"duplicate of line {seen[file_name]}", "file_name")
                else:
                    seen[file_name] = number
            seed = data.get("seed")
            if seed is not None and (reason := seed_problem(seed)):
                problem(reason, "seed")
            user = None
            if need_users or need_profiles or "user_data" in data:
                if "user_data" not in data:
                    problem("missing (needed to choose the user)", "user_data")
                else:
                    try:
                        user = resolve_user(data["user_data"])
                    except ValueError as error:
                        problem(str(error))
            if need_users and user is not None:
                stored = embeds_folder is not None and user.user_id and find_user_embedding(embeds_folder, user.user_id)
                if not stored and user.profile is None:
                    where = f"in {embeds_folder}" if embeds_folder else "(no --embeds_folder given)"
                    problem(f"no embedding for user {user.user_id} {where}", "user_data")
                elif not stored and not can_encode:
                    problem(f"user {user.label} has no stored embedding; give --llm_model to compute it", "user_data")
            if need_profiles and user is not None and user.profile is None:
                problem(f"user {user.label} has no profile here; give safety_level or profile fields "
                        "(Banned_Categories, ...)", "user_data")
            if len(problems) == before:
                records.append(PromptRecord(number, file_name, caption, user, data, seed))
    return records, problems
