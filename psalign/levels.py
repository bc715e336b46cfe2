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
"""

from __future__ import annotations

from psalign.categories import CATEGORIES
from psalign.users import HEALTHY, NO_RELIGION, UserProfile

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
