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
                   "Data: users, Sage pairs and user embeddings", "Building your own Sage data", "The toy world",
                   "Benchmarks", "Citation")


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


#: Words about how the project is worked on, which a reader of the README has no use for.
PROCESS_WORDS = (r"\bissues?\b", r"\bbars?\b", r"\bbudgets?\b", r"\bthis machine\b", r"\bsessions?\b",
                 r"\bthis \d+-core\b", r"\bthe task\b")


def test_readme_has_no_process_words():
    text = README.read_text(encoding="utf-8")
    found = {pattern: m.group(0) for pattern in PROCESS_WORDS if (m := re.search(pattern, text, re.IGNORECASE))}
    assert not found, found


def test_the_process_word_check_catches_them():
    for line in ("All the issue's bars are met.", "Timed on this machine.", "a 2-session run", "The budget allows 3"):
        assert any(re.search(pattern, line, re.IGNORECASE) for pattern in PROCESS_WORDS), line
    assert not any(re.search(pattern, "tissue sessionless barstool", re.IGNORECASE) for pattern in PROCESS_WORDS)


def test_license_and_notice_cover_the_shipped_q16_prompts():
    import tomllib

    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"]["text"] == "MIT" and license_text.startswith("MIT License")
    assert "Permission is hereby granted, free of charge" in license_text
    notice = (ROOT / "NOTICE").read_text(encoding="utf-8")
    shipped = "psalign/assets/q16_prompts.safetensors"
    assert shipped in notice and (ROOT / shipped).is_file()
    assert "https://github.com/ml-research/Q16" in notice and "MIT License" in notice
    beside = re.search(r"psalign/assets/q16_prompts\.NOTICE\.md", notice)
    assert beside and (ROOT / beside.group(0)).is_file()  # the full licence text ships with the file
    readme = README.read_text(encoding="utf-8")
    assert "](LICENSE)" in readme and "](NOTICE)" in readme


def _closing_brace(text: str, start: int) -> int:
    """The index of the ``}`` that closes the ``{`` at ``start``."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise AssertionError(f"unbalanced braces after {text[start:start + 40]!r}")


def bibtex_entries(text: str) -> list[tuple[str, dict[str, str]]]:
    """``(key, {field: value})`` of every entry in the ``bibtex`` blocks of ``text``."""
    entries = []
    for block in re.findall(r"(?s)```bibtex\n(.*?)```", text):
        for entry in re.finditer(r"@\w+\{", block):
            body = block[entry.end():_closing_brace(block, entry.end() - 1)]
            key, _, rest = body.partition(",")
            fields, position = {}, 0
            while field := re.compile(r"\s*(\w+)\s*=\s*\{").match(rest, position):
                close = _closing_brace(rest, field.end() - 1)
                fields[field.group(1)] = " ".join(rest[field.end():close].split())
                position = close + 1
                position += 1 if rest[position:position + 1] == "," else 0
            assert not rest[position:].strip(), f"{key}: cannot read {rest[position:position + 40]!r}"
            entries.append((key.strip(), fields))
    return entries


def test_readme_cites_psa_safetydpo_diffusion_dpo_and_q16():
    text = README.read_text(encoding="utf-8")
    citation = text[text.index("## Citation"):]
    found = bibtex_entries(citation)
    entries = dict(found)
    assert len(entries) == len(found) >= 4  # keys are unique
    titles = {key: re.sub(r"[{}]", "", fields.get("title", "")) for key, fields in entries.items()}
    wanted = {"PSA": "Personalized Safety Alignment for Text-to-Image Diffusion Models",
              "SafetyDPO": "SafetyDPO: Scalable Safety Alignment for Text-to-Image Generation",
              "Diffusion-DPO": "Diffusion Model Alignment Using Direct Preference Optimization",
              "Q16": "Can Machines Help Us Answering Question 16 in Datasheets"}
    for paper, title in wanted.items():
        matching = [key for key, shown in titles.items() if title in shown]
        assert len(matching) == 1, (paper, titles)
        fields = entries[matching[0]]
        assert fields.get("author") and re.fullmatch(r"(19|20)\d\d", fields.get("year", "")), (paper, fields)
        assert fields.get("journal") or fields.get("booktitle"), paper


def test_the_toy_world_and_benchmark_notes_exist_and_the_readme_links_them():
    readme = README.read_text(encoding="utf-8")
    for name in ("docs/toy_world.md", "docs/benchmarks.md"):
        path = ROOT / name
        assert path.is_file() and path.read_text(encoding="utf-8").startswith("# "), name
        assert re.search(rf"\]\({re.escape(name)}(#[\w-]+)?\)", readme), name
