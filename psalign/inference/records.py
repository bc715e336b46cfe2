"""Prompt files for generation: one JSON object per line, validated before any model is loaded.

Each line: ``{"file_name": "img_0001.png", "caption": "...", "user_data": {...}}``, and optionally
``"seed"``: an integer that replaces the seed derived from the run seed and the file name (give
one prompt's lines for several users the same seed to compare the users on the same noise).
``"level"`` (the name of the safety level the line's user stands for, e.g. ``level_3``),
``"category"`` (the prompt's safety categories) and ``"attack"`` (the adversarial prompt set it
comes from) are short labels carried into the generation log and read by ``evaluate.py``.
Other top-level keys are ignored with a warning. ``user_data`` names the user in one of three ways:

1. ``safety_level`` (``level_0`` ... ``level_5``, ``permissive``/``moderate``/``strict``): the
   reference user of that level (:mod:`psalign.levels`); any ``user_id`` is only logged, and
   profile fields beside it are an error (the level fixes the profile);
2. profile fields (``Age``, ``Age_Group``, ``Gender``, ``Religion``, ``Physical_Condition``,
   ``Mental_Condition``, ``Banned_Categories``, ``Allowed_Categories``; any case): a profile user
   whose embedding is computed from the profile (attributes not given are those of the reference
   adult; banned categories not given come from the rule engine);
3. ``User_ID`` / ``user_id`` alone: the embedding is read from the embeddings folder.

A ``User_ID`` names one user (:data:`USER_RULE`): profile fields beside it are that user's profile,
so every line of the id must give the same profile or none (a line with the id alone then means
that profile), and a stored ``<User_ID>.npy`` is used only when the embeddings folder records that
it was made from the same profile text (``embedding_profiles.jsonl``); otherwise the line is refused.
``Cluster_ID`` is accepted and ignored; any other key in ``user_data`` is an error.

Every line is bounded (:data:`MAX_CAPTION_CHARS`, :data:`MAX_FILE_NAME_BYTES`, and the line, nesting
and integer bounds of :func:`psalign.io.parse_json_line`), so no line can make a model run out of memory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Callable

from psalign.categories import sort_categories
from psalign.embeddings import (
    DEFAULT_PROFILE_TEMPLATE,
    EMBEDDING_PROFILES_FILE,
    find_user_embedding,
    profile_record,
    profile_text,
    profile_text_sha256,
    read_embedding_info,
    read_embedding_profiles,
)
from psalign.io import InputError, InputProblem, parse_json_line, path_component_problem, read_text_lines
from psalign.levels import canonical_level, reference_user
from psalign.users import UserProfile, complement_categories, format_user_id, rule_banned_categories

#: How a User_ID and a profile on prompts lines combine (``infer.py --help`` shows it).
USER_RULE = (
    "A User_ID names one user. Profile fields given with it are that user's profile: every line with that "
    "User_ID must give the same profile or none (a line with the id alone then means that profile), and a "
    "stored <User_ID>.npy is used only when the embeddings folder records that it was made from that same "
    f"profile ({EMBEDDING_PROFILES_FILE}); any contradiction is refused as file:line."
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: Folder of ``--grid`` contact sheets inside the output folder; no record may write there.
GRIDS_FOLDER = "grids"
#: Longest caption, in characters (Stable Diffusion reads 77 tokens; long prompts are a few hundred characters).
MAX_CAPTION_CHARS = 4096
#: Longest ``file_name``, in bytes (each of its folders and its name also fits the file system).
MAX_FILE_NAME_BYTES = 1024
#: Longest text value of a profile field (``Gender``, ``Religion``, ...), in characters.
MAX_PROFILE_TEXT_CHARS = 200
#: Oldest age a profile may give.
MAX_AGE = 150
#: Top-level keys of a prompts line.
LINE_KEYS = ("file_name", "caption", "user_data", "seed", "level", "category", "attack")
#: Top-level keys that label a line (logged with its image, read by ``evaluate.py``).
LABEL_KEYS = ("level", "category", "attack")
#: Longest label value, in characters.
MAX_LABEL_CHARS = 200

_PROFILE_KEYS = {
    "age": "age",
    "age_group": "age_group",
    "gender": "gender",
    "religion": "religion",
    "physical_condition": "physical_condition",
    "mental_condition": "mental_condition",
}
_CATEGORY_KEYS = {"banned_categories": "banned_categories", "allowed_categories": "allowed_categories"}
#: ``user_data`` keys besides the profile fields (lower case; keys are matched in any case).
_ID_KEY, _LEVEL_KEY, _CLUSTER_KEY = "user_id", "safety_level", "cluster_id"
_USER_DATA_KEYS = {
    _ID_KEY: "User_ID",
    _LEVEL_KEY: "safety_level",
    _CLUSTER_KEY: "Cluster_ID",
    **{key: key.title() for key in (*_PROFILE_KEYS, *_CATEGORY_KEYS)},
}


@dataclass(frozen=True)
class RecordUser:
    """Who a record is generated for. ``key`` identifies the embedding (one per distinct user)."""

    key: str
    label: str  # what the generation log and grids call this user
    user_id: str | None  # where its embedding is stored (``<embeds_folder>/<user_id>.npy``), if anywhere
    profile: UserProfile | None  # what to encode when no stored embedding exists
    #: Whether ``profile`` came from profile fields (not from a safety level or another line of the id).
    profile_given: bool = False


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


def _not_unicode(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (JSON allows ``"\\ud800"``; no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def caption_problem(caption: object) -> str | None:
    """Why ``caption`` cannot be a line's prompt (None if it can)."""
    if not isinstance(caption, str) or not caption.strip():
        return "missing or empty"
    if len(caption) > MAX_CAPTION_CHARS:
        return f"is {len(caption)} characters long; at most {MAX_CAPTION_CHARS} are allowed"
    if _not_unicode(caption):
        return "is not valid Unicode text (it holds a lone surrogate such as \\ud800)"
    return None


def label_problem(label: object) -> str | None:
    """Why ``label`` cannot be a line's ``level`` / ``category`` / ``attack`` (None if it can)."""
    if not isinstance(label, str) or not label.strip():
        return "must be non-empty text"
    if len(label) > MAX_LABEL_CHARS or _not_unicode(label) or any(ord(ch) < 32 for ch in label):
        return f"must be one line of at most {MAX_LABEL_CHARS} characters of valid Unicode text"
    return None


def file_name_problem(file_name: object) -> str | None:
    """Why ``file_name`` cannot be an output path inside the save folder (None if it can).

    Besides escaping the folder or lacking an image suffix, refused are: names the file system
    cannot hold (a NUL or other control character, a folder or name too long once the atomic
    write's temporary name is counted), hidden names (temporary files are hidden), and the
    ``grids/`` folder, where ``--grid`` writes its contact sheets.
    """
    if not isinstance(file_name, str) or not file_name.strip():
        return "must be a non-empty string"
    if "\\" in file_name:
        return f"{file_name!r} contains a backslash; use '/' for sub-folders"
    path = PurePosixPath(file_name)
    if path.is_absolute():
        return f"{file_name!r} is absolute; it must be relative to --save_path"
    if ".." in path.parts:
        return f"{file_name!r} contains '..' and would escape the output folder"
    for part in path.parts:
        if reason := path_component_problem(part):
            return reason
    if len(file_name.encode("utf-8")) > MAX_FILE_NAME_BYTES:
        return f"is {len(file_name.encode('utf-8'))} bytes long; at most {MAX_FILE_NAME_BYTES} are allowed"
    if any(part.startswith(".") for part in path.parts):
        return f"{file_name!r} is hidden (a part starts with '.'); hidden names are kept for temporary files"
    if path.parts[0].casefold() == GRIDS_FOLDER:
        return f"{file_name!r} is inside {GRIDS_FOLDER}/, where --grid writes its contact sheets"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"{file_name!r} must end in one of {', '.join(IMAGE_SUFFIXES)}"
    return None


def _profile_user(fields: dict[str, object], user_id: str | None) -> RecordUser:
    """A profile user from ``user_data`` profile fields, keyed by lower-case name (raises
    ``ValueError`` with the field at fault)."""
    attributes, lists = {}, {}
    for name, value in fields.items():
        label = _USER_DATA_KEYS[name]
        if name in _CATEGORY_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{label}: must be a list of category names")
            try:
                lists[_CATEGORY_KEYS[name]] = sort_categories(value)
            except ValueError as error:
                raise ValueError(f"{label}: {error}") from None
        elif name == "age":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AGE:
                raise ValueError(f"{label}: must be an integer from 0 to {MAX_AGE}, got {value!r}")
            attributes["age"] = value
        else:
            if not isinstance(value, str) or not value.strip() or len(value) > MAX_PROFILE_TEXT_CHARS \
                    or _not_unicode(value):
                raise ValueError(f"{label}: must be text of 1 to {MAX_PROFILE_TEXT_CHARS} characters, got {value!r}")
            attributes[_PROFILE_KEYS[name]] = value.strip()
    profile = reference_user("level_0", **attributes, **({"user_id": user_id} if user_id else {}))
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
    return RecordUser(key=key, label=user_id or f"profile-{digest}", user_id=user_id, profile=profile,
                      profile_given=True)


def _user_data_fields(user_data: dict) -> dict[str, object]:
    """``user_data`` keyed by lower-case name; ``ValueError`` for an unknown key or one given twice."""
    fields: dict[str, object] = {}
    spelled: dict[str, str] = {}
    for key, value in user_data.items():
        name = key.lower()
        if name not in _USER_DATA_KEYS:
            close = difflib.get_close_matches(name, list(_USER_DATA_KEYS), n=1)
            hint = f" (did you mean {_USER_DATA_KEYS[close[0]]}?)" if close else ""
            raise ValueError(f"user_data: unknown key {key!r}{hint}; known keys: {', '.join(_USER_DATA_KEYS.values())}")
        if name in fields:
            raise ValueError(f"user_data: {_USER_DATA_KEYS[name]} is given twice (as {spelled[name]!r} and {key!r})")
        fields[name], spelled[name] = value, key
    return fields


def resolve_user(user_data: object) -> RecordUser:
    """The :class:`RecordUser` of a ``user_data`` object; ``ValueError`` naming the field at fault."""
    if not isinstance(user_data, dict):
        raise ValueError("user_data: must be an object")
    fields = _user_data_fields(user_data)
    profile_fields = {k: v for k, v in fields.items() if k in _PROFILE_KEYS or k in _CATEGORY_KEYS}
    if _LEVEL_KEY in fields:
        if profile_fields:
            given = ", ".join(_USER_DATA_KEYS[k] for k in profile_fields)
            raise ValueError(f"safety_level: names a reference user with a fixed profile; {given} cannot be "
                             "given with it (remove safety_level, or the profile fields)")
        try:
            level = canonical_level(fields[_LEVEL_KEY])
        except ValueError as error:
            raise ValueError(f"safety_level: {error}") from None
        profile = reference_user(level)
        return RecordUser(key=f"level:{level}", label=level, user_id=profile.user_id, profile=profile)
    user_id = None
    if fields.get(_ID_KEY) is not None:
        try:
            user_id = format_user_id(fields[_ID_KEY])
        except ValueError as error:
            raise ValueError(f"User_ID: {error}") from None
    if profile_fields:
        return _profile_user(profile_fields, user_id)
    if user_id is None:
        raise ValueError("user_data: needs User_ID, safety_level or profile fields")
    return RecordUser(key=f"user:{user_id}", label=user_id, user_id=user_id, profile=None)


def _print_warning(problem: InputProblem) -> None:
    print(f"warning: {problem}", file=sys.stderr)


def _profile_differences(recorded: dict, profile: UserProfile, text: str) -> str:
    """What differs between a recorded profile and ``profile`` (rendered as ``text``)."""
    given = profile_record(profile, text)["profile"]
    differs = [f"{key} {recorded.get(key)!r} there, {value!r} here" for key, value in given.items()
               if recorded.get(key) != value]
    return "; ".join(differs) or "the profile text differs (another template)"


def _stored_profile_problem(user: RecordUser, embeds_folder: Path, template: str,
                            recorded: dict[str, dict]) -> str | None:
    """Why the stored embedding of a profile user with an id cannot stand for the profile given."""
    stored = find_user_embedding(embeds_folder, user.user_id)
    text = profile_text(user.profile, template)
    record = recorded.get(user.user_id)
    if record is None:
        return (f"user {user.user_id} has a stored embedding ({stored}) but {EMBEDDING_PROFILES_FILE} records no "
                "profile for it, so the profile on this line cannot be checked against it: give the User_ID alone "
                "to use the stored embedding, or the profile without a User_ID to embed it")
    if record["profile_sha256"] != profile_text_sha256(text):
        return (f"the profile on this line contradicts the one user {user.user_id}'s stored embedding ({stored}) was "
                f"made from ({_profile_differences(record['profile'], user.profile, text)}); give the User_ID alone "
                "to use the stored embedding, or another User_ID for this profile")
    return None


def read_prompt_records(
    path: str | Path,
    embeds_folder: str | Path | None = None,
    need_users: bool = True,
    can_encode: bool = False,
    need_profiles: bool = False,
    warn: Callable[[InputProblem], None] = _print_warning,
) -> tuple[list[PromptRecord], list[InputProblem]]:
    """Parse and check every line of a prompts JSONL file; returns ``(valid records, problems)``.

    With ``need_users`` each record must name a user whose embedding can be had: stored in
    ``embeds_folder``, or computable from a profile when ``can_encode`` (an encoder was given).
    With ``need_profiles`` each record's user must come with banned categories (a safety level or
    profile fields). Lines sharing a User_ID follow :data:`USER_RULE`. Unknown top-level keys are
    passed to ``warn``. An empty file is a problem. Nothing is loaded but text files and
    file-existence checks; no line is held beyond the bounds of :mod:`psalign.io`.
    """
    path = Path(path)
    if not path.is_file():
        return [], [InputProblem(str(path), 0, "is a folder, not a prompts file" if path.is_dir()
                                 else "prompts file not found")]
    parsed: list[PromptRecord] = []
    problems: list[InputProblem] = []
    seen: dict[str, int] = {}
    folders: dict[str, int] = {}  # every folder a file name needs, and the first line needing it
    failed: set[int] = set()
    any_line = False
    try:
        lines = list(read_text_lines(path))
    except OSError as error:
        return [], [InputProblem(str(path), 0, f"cannot be read: {error.strerror or error}")]
    for line in lines:
        number = line.number

        def problem(reason: str, field: str | None = None) -> None:
            problems.append(InputProblem(str(path), number, reason, field))
            failed.add(number)

        if line.text is None:
            any_line = True
            problem(line.problem)
            continue
        if not line.text.strip():
            continue
        any_line = True
        data, reason = parse_json_line(line.text)
        if reason:
            problem(reason)
            continue
        if not isinstance(data, dict):
            problem("each line must be a JSON object")
            continue
        for key in data:
            if key not in LINE_KEYS:
                close = difflib.get_close_matches(key, LINE_KEYS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                warn(InputProblem(str(path), number, f"unknown key {key!r} is ignored{hint}"))
        caption = data.get("caption")
        if reason := caption_problem(caption):
            problem(reason, "caption")
        file_name = data.get("file_name")
        reason = "missing" if file_name is None else file_name_problem(file_name)
        if reason:
            problem(reason, "file_name")
        else:
            file_name = PurePosixPath(file_name).as_posix()
            parents = [p.as_posix() for p in PurePosixPath(file_name).parents if p.as_posix() != "."]
            if file_name in seen:
                problem(f"duplicate of line {seen[file_name]}", "file_name")
            elif file_name in folders:
                problem(f"is a folder of line {folders[file_name]}'s file name", "file_name")
            elif clash := next((p for p in parents if p in seen), None):
                problem(f"needs a folder {clash!r}, which is line {seen[clash]}'s image", "file_name")
            else:
                seen[file_name] = number
                for parent in parents:
                    folders.setdefault(parent, number)
        seed = data.get("seed")
        if seed is not None and (reason := seed_problem(seed)):
            problem(reason, "seed")
        for key in LABEL_KEYS:
            if key in data and (reason := label_problem(data[key])):
                problem(reason, key)
        user = None
        if need_users or need_profiles or "user_data" in data:
            if "user_data" not in data:
                problem("missing (needed to choose the user)", "user_data")
            else:
                try:
                    user = resolve_user(data["user_data"])
                except ValueError as error:
                    problem(str(error))
        if number not in failed:
            parsed.append(PromptRecord(number, file_name, caption, user, data, seed))
    if not any_line:
        problems.append(InputProblem(str(path), 0, "the prompts file is empty; it needs one JSON object per line"))
    records, user_problems = _check_users(parsed, path, embeds_folder, need_users, can_encode, need_profiles)
    problems += user_problems
    problems.sort(key=lambda p: p.line)
    return records, problems


def _check_users(
    parsed: list[PromptRecord], path: Path, embeds_folder: str | Path | None, need_users: bool, can_encode: bool,
    need_profiles: bool,
) -> tuple[list[PromptRecord], list[InputProblem]]:
    """Apply :data:`USER_RULE` across lines, then check each record's user can be embedded."""
    problems: list[InputProblem] = []
    failed: set[int] = set()

    def problem(record: PromptRecord, reason: str, field: str | None = "user_data") -> None:
        problems.append(InputProblem(str(path), record.line, reason, field))
        failed.add(record.line)

    profiles: dict[str, tuple[int, RecordUser]] = {}  # user id -> first line with a profile, its user
    for record in parsed:
        user = record.user
        if user is None or user.user_id is None or user.profile is None:
            continue
        first = profiles.setdefault(user.user_id, (record.line, user))
        if first[1].profile != user.profile:
            problem(record, f"user {user.user_id} has another profile on line {first[0]}; one User_ID is one user")
    template, recorded = DEFAULT_PROFILE_TEMPLATE, {}
    if embeds_folder is not None and Path(embeds_folder).is_dir():
        try:
            info = read_embedding_info(embeds_folder) or {}
            template = info.get("template", DEFAULT_PROFILE_TEMPLATE)
            recorded = read_embedding_profiles(embeds_folder)
        except InputError as error:
            problems += error.problems
            return [], problems
    checked: set[str] = set()
    records = []
    for record in parsed:
        user = record.user
        if user is not None and user.profile is None and user.user_id in profiles:
            user = replace(user, profile=profiles[user.user_id][1].profile)  # the id's profile from another line
            record = replace(record, user=user)
        stored = bool(embeds_folder is not None and user is not None and user.user_id
                      and find_user_embedding(embeds_folder, user.user_id))
        if stored and user.profile_given and user.user_id not in checked and record.line not in failed:
            checked.add(user.user_id)
            if reason := _stored_profile_problem(user, Path(embeds_folder), template, recorded):
                problem(record, reason)
        if need_users and user is not None:
            if not stored and user.profile is None:
                where = f"in {embeds_folder}" if embeds_folder else "(no --embeds_folder given)"
                problem(record, f"no embedding for user {user.user_id} {where}")
            elif not stored and not can_encode:
                problem(record, f"user {user.label} has no stored embedding; give --llm_model to compute it")
        if need_profiles and user is not None and user.profile is None:
            problem(record, f"user {user.label} has no profile here; give safety_level or profile fields "
                    "(Banned_Categories, ...)")
        if record.line not in failed:
            records.append(record)
    return records, problems
