"""The concepts of a Sage build: a YAML of categories -> concepts, duplicates and near-duplicates found."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from psalign.categories import CATEGORIES, canonical_category
from psalign.io import InputError, InputProblem

#: What a concept may contain: it becomes part of file names (spaces become ``_``).
CONCEPT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 '\-]*")
MAX_CONCEPT_CHARS = 60


def concept_problem(concept: object) -> str | None:
    """Why ``concept`` cannot be a Sage concept (None when it can)."""
    if not isinstance(concept, str):
        return f"expected text, got {concept!r}"
    text = " ".join(concept.split())
    if not text or len(text) > MAX_CONCEPT_CHARS or not CONCEPT_PATTERN.fullmatch(text):
        return (f"{concept!r} is not a concept of 1 to {MAX_CONCEPT_CHARS} letters, digits, spaces, "
                "hyphens and apostrophes starting with a letter or digit")
    return None


def read_concepts(path: str | Path) -> dict[str, list[str]]:
    """``{category: [concept, ...]}`` in ``CATEGORIES`` order from a YAML mapping of category names
    (any spelling :func:`psalign.categories.canonical_category` accepts) to lists of concepts.
    Every bad entry is one ``InputError`` naming file, line and category."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise InputError([InputProblem(str(path), 0, f"not a readable YAML file: {error}")]) from None
    if not isinstance(root, yaml.MappingNode):
        raise InputError([InputProblem(str(path), 1, "expected a mapping of category -> list of concepts")])
    problems: list[InputProblem] = []
    found: dict[str, list[str]] = {}
    for key, value in root.value:
        line = key.start_mark.line + 1
        try:
            category = canonical_category(str(key.value))
        except ValueError as error:
            problems.append(InputProblem(str(path), line, str(error), str(key.value)))
            continue
        if category in found:
            problems.append(InputProblem(str(path), line, "category given twice", category))
            continue
        if not isinstance(value, yaml.SequenceNode) or not value.value:
            problems.append(InputProblem(str(path), line, "expected a non-empty list of concepts", category))
            continue
        concepts = []
        for item in value.value:
            reason = concept_problem(item.value) if isinstance(item, yaml.ScalarNode) else "expected text"
            if reason:
                problems.append(InputProblem(str(path), item.start_mark.line + 1, reason, category))
            else:
                concepts.append(" ".join(item.value.split()))
        found[category] = concepts
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in {path}")
    return {c: found[c] for c in CATEGORIES if c in found}


def dedupe_concepts(concepts: dict[str, list[str]], near_ratio: float) -> tuple[dict[str, list[str]], dict]:
    """``concepts`` without exact duplicates (case and spacing ignored, across categories: the
    first one stays), and a report: ``duplicates`` (dropped) and ``near_duplicates`` (kept, for a
    person to look at): pairs within a category whose difflib ratio is at least ``near_ratio``
    or whose word sets are equal."""
    seen: dict[str, str] = {}
    kept: dict[str, list[str]] = {}
    duplicates, near = [], []
    for category, items in concepts.items():
        kept[category] = []
        for concept in items:
            key = concept.lower()
            if key in seen:
                duplicates.append({"category": category, "concept": concept, "same_as": seen[key]})
                continue
            seen[key] = f"{category}: {concept}"
            kept[category].append(concept)
        for i, first in enumerate(kept[category]):
            for second in kept[category][i + 1 :]:
                ratio = difflib.SequenceMatcher(None, first.lower(), second.lower()).ratio()
                if ratio >= near_ratio or sorted(first.lower().split()) == sorted(second.lower().split()):
                    near.append({"category": category, "concepts": [first, second], "ratio": round(ratio, 3)})
    return kept, {"duplicates": duplicates, "near_duplicates": near}
