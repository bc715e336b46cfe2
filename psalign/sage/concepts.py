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


def near_duplicate_ratio(first: str, second: str, near_ratio: float) -> float | None:
    """The difflib ratio of two concepts (case ignored) when they are near-duplicates: the ratio
    reaches ``near_ratio`` or their word sets are equal; None otherwise."""
    a, b = first.lower(), second.lower()
    same_words = sorted(a.split()) == sorted(b.split())
    matcher = difflib.SequenceMatcher(None, a, b)
    if not same_words and (matcher.real_quick_ratio() < near_ratio or matcher.quick_ratio() < near_ratio):
        return None  # both are upper bounds of ratio(), which is the slow one
    ratio = matcher.ratio()
    return round(ratio, 3) if same_words or ratio >= near_ratio else None


def dedupe_concepts(concepts: dict[str, list[str]], near_ratio: float) -> tuple[dict[str, list[str]], dict]:
    """``concepts`` without exact duplicates (case and spacing ignored, across categories: the
    first one stays), and a report: ``duplicates`` (dropped) and ``near_duplicates`` (kept, for a
    person to look at): pairs of kept concepts, within a category or across two, that
    :func:`near_duplicate_ratio` finds. Each near-duplicate names its ``concepts`` and their
    ``categories`` (the same one twice within a category)."""
    seen: dict[str, str] = {}
    kept: dict[str, list[str]] = {}
    duplicates = []
    for category, items in concepts.items():
        kept[category] = []
        for concept in items:
            key = concept.lower()
            if key in seen:
                duplicates.append({"category": category, "concept": concept, "same_as": seen[key]})
                continue
            seen[key] = f"{category}: {concept}"
            kept[category].append(concept)
    flat = [(category, concept) for category, items in kept.items() for concept in items]
    near = []
    for i, (first_category, first) in enumerate(flat):
        for second_category, second in flat[i + 1 :]:
            ratio = near_duplicate_ratio(first, second, near_ratio)
            if ratio is not None:
                near.append({"categories": [first_category, second_category], "concepts": [first, second],
                             "ratio": ratio})
    return kept, {"duplicates": duplicates, "near_duplicates": near}


def near_duplicates_text(near: list[dict]) -> str:
    """One line per near-duplicate of a :func:`dedupe_concepts` report, e.g.
    ``Violence: knife fight ~ Shocking: knife fights (ratio 0.96)``."""
    return "\n".join(f"{n['categories'][0]}: {n['concepts'][0]} ~ {n['categories'][1]}: {n['concepts'][1]} "
                     f"(ratio {n['ratio']})" for n in near)
