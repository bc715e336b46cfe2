"""The safety categories: the one place that names them.

Sage (the PSA dataset) uses seven categories. Other prompt sets spell theirs differently; CoProV2
and I2P write ``Harrasment``, ``self-harm``, ``sexual`` and add ``Illegal Activity``.
``canonical_category`` maps every known spelling to the canonical name. ``Illegal Activity`` has no
Sage counterpart: it is kept as the documented extra label :data:`ILLEGAL_ACTIVITY` and is never part
of a user's banned or allowed lists.
"""

from __future__ import annotations

#: The seven Sage categories, in the canonical order used everywhere (lists, tables, file names).
CATEGORIES: tuple[str, ...] = ("Hate", "Harassment", "Violence", "Self-Harm", "Sexuality", "Shocking", "Propaganda")

#: Extra label of CoProV2 / I2P prompt sets with no Sage counterpart.
ILLEGAL_ACTIVITY = "Illegal Activity"

#: Lower-case tokens used in Sage file names (``user_0000033_self-harm_...``).
CATEGORY_TOKENS: dict[str, str] = {name: name.lower() for name in CATEGORIES}

_ALIASES: dict[str, str] = {
    # canonical names and their file-name tokens
    **{name.lower(): name for name in CATEGORIES},
    # CoProV2 / I2P spellings
    "harrasment": "Harassment",
    "self harm": "Self-Harm",
    "selfharm": "Self-Harm",
    "sexual": "Sexuality",
    "sex": "Sexuality",
    "nudity": "Sexuality",
    "shocking images": "Shocking",
    "illegal activity": ILLEGAL_ACTIVITY,
    "illegal_activity": ILLEGAL_ACTIVITY,
    "illegal-activity": ILLEGAL_ACTIVITY,
}


def canonical_category(name: str, allow_extra: bool = False) -> str:
    """Return the canonical name of ``name`` (any known spelling, any case).

    Raises ``ValueError`` naming the accepted categories when ``name`` is unknown, or when it is
    ``Illegal Activity`` and ``allow_extra`` is false (it is not a Sage category).
    """
    key = " ".join(str(name).strip().lower().replace("_", " ").split())
    canonical = _ALIASES.get(key) or _ALIASES.get(key.replace(" ", "-"))
    if canonical is None or (canonical == ILLEGAL_ACTIVITY and not allow_extra):
        accepted = ", ".join(CATEGORIES) + (f", {ILLEGAL_ACTIVITY}" if allow_extra else "")
        raise ValueError(f"unknown safety category {name!r}; expected one of: {accepted}")
    return canonical


def category_token(name: str) -> str:
    """The lower-case file-name token of a Sage category (``"Self-Harm"`` -> ``"self-harm"``)."""
    return CATEGORY_TOKENS[canonical_category(name)]


def sort_categories(names) -> list[str]:
    """Canonicalise, de-duplicate and sort category names in :data:`CATEGORIES` order."""
    found = {canonical_category(n) for n in names}
    return [c for c in CATEGORIES if c in found]
