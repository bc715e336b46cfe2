"""The README stays a short overview whose links resolve; the real-model recipe gives each step its
expected time, marked where it is an estimate."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: The README's sections, in order (the rest of the detail lives in docs/).
README_SECTIONS = ("The PSA adapter", "Training objectives", "Training: `train_psa.py`",
                   "Personalized generation: `infer.py`", "Evaluation: `evaluate.py`", "The SafetyDPO baseline",
                   "Data: users, Sage pairs and user embeddings", "The toy world", "Benchmarks", "Citation")


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


def test_readme_is_a_short_overview_with_its_sections_in_order():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    headings = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert [h for h in headings if h in README_SECTIONS] == list(README_SECTIONS)
    assert "python -m psalign.demo" in text and "python -m pytest" in text  # the two commands
    assert "](docs/images/demo_contact_sheet.png)" in text and (ROOT / "docs/images/demo_contact_sheet.png").is_file()


def test_readme_links_reach_their_files_and_headings():
    for target in re.findall(r"\]\(([^)\s]+)\)", README.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://")):
            continue
        name, _, anchor = target.partition("#")
        path = ROOT / name if name else README
        assert path.exists(), target
        if anchor:
            assert anchor in anchors(path), target


def test_every_real_model_step_names_its_time_and_marks_estimates():
    text = (ROOT / "docs" / "real_models.md").read_text(encoding="utf-8")
    steps = {part.splitlines()[0]: part for part in re.split(r"(?m)^## ", text)[1:] if part[0].isdigit()}
    for title, body in steps.items():
        if title.startswith(("0.", "8.")):  # the environment, and the baseline that repeats steps 5-7
            continue
        assert "*estimate*" in body or "*published*" in body, title
        assert re.search(r"\b(\d+(\.\d+)? ?(s|min)|seconds|minutes|hours?)\b", body), title
    assert "assumed sustained 50 MB/s" in steps["1. Get the base models"]
    assert "Memory" in steps["4. Check that the bans are readable"]
