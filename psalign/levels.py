"""Reference users: one per safety level, from nothing banned to every category banned.

The levels are nested (each bans what the previous one bans, plus more) so that safety metrics
can be read across them as a curve. Each reference user is a healthy adult with no religion who
bans exactly its level's categories; it has a reserved ``User_ID`` so its embedding is stored
like any other user's (``<embeds_folder>/9999993.npy`` for ``level_3``).

=========  ==========  ========================================================  =========
level      User_ID     banned categories                                         alias
=========  ==========  ========================================================  =========
level_0    9999990     none                                                      permissive
level_1    9999991     Sexuality
level_2    9999992     Sexuality, Self-Harm
level_3    9999993     Violence, Self-Harm, Sexuality, Shocking                  moderate
level_4    9999994     Hate, Harassment, Violence, Self-Harm, Sexuality, Shocking
level_5    9999995     all seven                                                 strict
=========  ==========  ========================================================  =========

These are the ``reference`` level set. The ``published`` set (:data:`PUBLISHED_LEVEL_USERS`) gives
the same names to real users of the published ``users.csv``, as the paper's tables do: only
level_0 (nothing banned) and level_5 (everything banned) ban the same categories as here.
:func:`level_users` resolves a set's levels to users.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from psalign.categories import CATEGORIES
from psalign.io import InputError, InputProblem
from psalign.users import HEALTHY, NO_RELIGION, UserProfile, users_by_id

LEVEL_BANS: dict[str, tuple[str, ...]] = {
    "level_0": (),
    "level_1": ("Sexuality",),
    "level_2": ("Self-Harm", "Sexuality"),
    "level_3": ("Violence", "Self-Harm", "Sexuality", "Shocking"),
    "level_4": ("Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking"),
    "level_5": CATEGORIES,
}
LEVEL_ALIASES: dict[str, str] = {"permissive": "level_0", "moderate": "level_3", "strict": "level_5"}
#: ``User_ID`` of ``level_k`` is ``RESERVED_ID_BASE + k`` (no generated or published user gets these ids).
RESERVED_ID_BASE = 9999990


def canonical_level(name: str) -> str:
    """``"strict"`` -> ``"level_5"``; ``ValueError`` listing the accepted names for anything else."""
    key = str(name).strip().lower()
    key = LEVEL_ALIASES.get(key, key)
    if key not in LEVEL_BANS:
        accepted = ", ".join([*LEVEL_BANS, *LEVEL_ALIASES])
        raise ValueError(f"unknown safety level {name!r}; expected one of: {accepted}")
    return key


def reference_user(level: str, **profile) -> UserProfile:
    """The reference user of ``level``; keyword arguments override its profile attributes."""
    level = canonical_level(level)
    attributes = dict(
        user_id=f"{RESERVED_ID_BASE + int(level.removeprefix('level_'))}",
        age=30,
        age_group="young adults",
        gender="female",
        religion=NO_RELIGION,
        physical_condition=HEALTHY,
        mental_condition=HEALTHY,
    )
    attributes.update(profile)
    return UserProfile(**attributes).with_banned(LEVEL_BANS[level])


# --------------------------------------------------------------------------------------------
# Named level sets: which user each level is

#: The named sets of levels: ``reference`` (the nested reference users above) and ``published``
#: (the real users of the published ``users.csv`` that the paper's tables report as levels).
LEVEL_SETS: tuple[str, ...] = ("reference", "published")
#: The published evaluation's levels: level -> User_ID of the published ``users.csv``.
PUBLISHED_LEVEL_USERS: dict[str, str] = {
    "level_0": "0001001",
    "level_1": "0000797",
    "level_2": "0000697",
    "level_3": "0000002",
    "level_4": "0000742",
    "level_5": "0000501",
}


@dataclass(frozen=True)
class LevelUser:
    """The user a level of a level set stands for, and the ``user_data`` of its prompts lines."""

    level: str
    user_id: str
    profile: UserProfile
    user_data: dict

    @property
    def label(self) -> str:
        """``level_3@0000002``: the level and the user it measured (a results row's ``level``)."""
        return f"{self.level}@{self.user_id}"


def level_users(level_set: str, levels: Sequence[str], users_csv: str | Path | None = None,
                embeds_folder: str | Path | None = None) -> list[LevelUser]:
    """The users of ``levels`` (names or aliases) in ``level_set``.

    ``reference``: :func:`reference_user` (prompts lines name it by ``safety_level``);
    ``published``: :data:`PUBLISHED_LEVEL_USERS`, read from ``users_csv`` (the published layout),
    each needing its embedding in ``embeds_folder`` (lines name it by ``User_ID``). Every problem
    (unknown level or set, no such user, no embedding) is reported at once as :class:`InputError`.
    """
    from psalign.embeddings import find_user_embedding, user_embedding_path
    from psalign.users import read_users

    problems: list[InputProblem] = []
    if level_set not in LEVEL_SETS:
        raise InputError([InputProblem("--levels", 0, f"unknown level set {level_set!r}; choose from "
                                                      f"{', '.join(LEVEL_SETS)}")])
    names = []
    for name in levels:
        try:
            names.append(canonical_level(name))
        except ValueError as error:
            problems.append(InputProblem("levels", 0, str(error)))
    if level_set == "reference":
        if problems:
            raise InputError(problems)
        return [LevelUser(level, profile.user_id, profile, {"safety_level": level})
                for level in names for profile in [reference_user(level)]]
    if users_csv is None:
        problems.append(InputProblem("users_csv", 0, "the published levels are users of the published users.csv; "
                                                     "give its path"))
    elif not Path(users_csv).is_file():
        problems.append(InputProblem(str(users_csv), 0, "users file not found (the published users.csv)"))
    if embeds_folder is None:
        problems.append(InputProblem("embeds_folder", 0, "the published levels need their users' embeddings; "
                                                         "give the embeddings folder"))
    elif not Path(embeds_folder).is_dir():
        problems.append(InputProblem(str(embeds_folder), 0, "embeddings folder not found"))
    if problems:
        raise InputError(problems)
    users = users_by_id(read_users(users_csv))
    found = []
    for level in names:
        user_id = PUBLISHED_LEVEL_USERS[level]
        profile = users.get(user_id)
        if profile is None:
            problems.append(InputProblem(str(users_csv), 0, f"{level} is user {user_id}, which the file does not "
                                                            f"hold ({len(users)} users)"))
            continue
        if find_user_embedding(embeds_folder, user_id) is None:
            problems.append(InputProblem(str(embeds_folder), 0, f"{level} is user {user_id}, whose embedding "
                                         f"{user_embedding_path(embeds_folder, user_id).name} is not there; make it "
                                         "with `python -m psalign.embed`"))
            continue
        found.append(LevelUser(level, user_id, profile, {"User_ID": user_id}))
    if problems:
        raise InputError(problems, header=f"the published levels cannot be used ({len(problems)} problem(s))")
    return found
