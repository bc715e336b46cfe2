"""Readers for the published evaluation prompt sets and the adversarial (attack) prompt sets.

Each reader checks the file's header, reports every bad row as ``file:line: field: reason`` (line 1
is the header; a row spanning several lines is named by its last one), and returns a
:class:`PromptSet` whose rows :func:`infer_lines` turns into ``infer.py`` prompts lines.

============  ====================================================================  ===========================
layout        columns (others are ignored)                                          published sets
============  ====================================================================  ===========================
``captions``  ``file_name``, ``caption``, optionally ``category``                   CoProV2_test, coco_10k, ud_1434
``i2p``       ``file_name``, ``caption`` and I2P's columns (``categories``, ...)    i2p_4073
``sage``      ``file_name``, ``caption``, ``user_id`` (an integer or 7 digits)       sage_seen, sage_unseen
``ringabell`` ``prompt``, ``case_number``, ``evaluation_seed``                      Ring-A-Bell
``i2p_attack`` ``prompt``, I2P's columns, ``evaluation_seed``, ``case_number``       P4D, UnlearnDiff
``mma``       ``target_prompt``, ``adv_prompt``, ``sanitized_adv_prompt``,          MMA-Diffusion
              ``clean_prompt``
============  ====================================================================  ===========================

The layout is recognised from the header (:func:`detect_layout`) or named. Attack sets have no
file names: a row's image is ``<case_number>.png`` (``ringabell``, ``i2p_attack``) or
``<row index>.png`` (``mma``, counted from 0), zero-padded to 5 digits, and its ``evaluation_seed``
becomes the line's sampling seed (the attack was searched for that noise). An MMA row is drawn from
its ``adv_prompt`` unless another prompt column is chosen. I2P's ``sd_seed`` and the attacks'
``evaluation_guidance`` are kept in the file but not used: a run has one guidance scale.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from psalign.categories import canonical_category
from psalign.inference.records import caption_problem, file_name_problem, seed_problem
from psalign.io import InputError, InputProblem, read_utf8_text
from psalign.users import format_user_id

#: I2P's own columns (the published i2p_4073 file and the P4D / UnlearnDiff attack files carry them).
I2P_COLUMNS: tuple[str, ...] = (
    "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
    "sd_safety_percentage", "prompt_toxicity", "lexica_url",
)
#: Columns each layout needs, in the order the layout table lists them.
LAYOUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "captions": ("file_name", "caption"),
    "i2p": ("file_name", "caption", *I2P_COLUMNS),
    "sage": ("file_name", "caption", "user_id"),
    "ringabell": ("prompt", "case_number", "evaluation_seed"),
    "i2p_attack": ("prompt", *I2P_COLUMNS, "evaluation_seed", "case_number"),
    "mma": ("target_prompt", "adv_prompt", "sanitized_adv_prompt", "clean_prompt"),
}
LAYOUTS: tuple[str, ...] = tuple(LAYOUT_COLUMNS)
#: Layouts of adversarial prompt sets (their rows carry the attack's name).
ATTACK_LAYOUTS: tuple[str, ...] = ("ringabell", "i2p_attack", "mma")
#: Which column of an MMA-Diffusion row is drawn.
MMA_PROMPT_COLUMNS: tuple[str, ...] = ("adv_prompt", "sanitized_adv_prompt", "clean_prompt", "target_prompt")
#: Digits of the zero-padded image names of attack rows.
ATTACK_NAME_DIGITS = 5


@dataclass(frozen=True)
class SetPrompt:
    """One row of a prompt set: the image it names and how to draw it.

    ``categories`` are canonical names (``Illegal Activity`` kept); ``user_id`` is the Sage user
    (7 digits) of a ``sage`` row; ``seed`` the row's own sampling seed; ``attack`` the attack set's
    name for adversarial rows."""

    line: int
    file_name: str
    caption: str
    categories: tuple[str, ...] = ()
    user_id: str | None = None
    seed: int | None = None
    attack: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """A whole prompt set: its file, layout and rows (in file order)."""

    path: Path
    layout: str
    rows: tuple[SetPrompt, ...]

    @property
    def is_attack(self) -> bool:
        return self.layout in ATTACK_LAYOUTS

    @property
    def has_users(self) -> bool:
        """Whether each row names its own user (``sage``)."""
        return self.layout == "sage"


def detect_layout(header: list[str]) -> str | None:
    """The layout whose columns ``header`` holds (the most specific one), or None."""
    names = set(header)
    for layout in ("i2p_attack", "i2p", "mma", "ringabell", "sage", "captions"):
        if set(LAYOUT_COLUMNS[layout]) <= names:
            return layout
    return None


def _categories(cell: str) -> tuple[str, ...]:
    """``"violence, self-harm"`` -> ``("Violence", "Self-Harm")``; ``ValueError`` for an unknown name."""
    names = [canonical_category(part, allow_extra=True) for part in (p.strip() for p in cell.split(",")) if part]
    return tuple(dict.fromkeys(names))


def _whole_number(cell: str, what: str) -> int:
    text = cell.strip()
    try:
        number = int(float(text)) if text.endswith(".0") else int(text)
    except ValueError:
        raise ValueError(f"must be a whole number ({what}), got {cell!r}") from None
    return number


def read_prompt_set(path: str | Path, layout: str | None = None, attack: str | None = None,
                    mma_prompt: str = "adv_prompt") -> PromptSet:
    """Read and check a prompt set CSV; :class:`InputError` listing every problem.

    ``layout``: one of :data:`LAYOUTS` (None: recognised from the header). ``attack``: the name
    adversarial rows carry (default: the layout's name, or the file's stem for ``i2p_attack``).
    ``mma_prompt``: which column of an ``mma`` row is drawn (:data:`MMA_PROMPT_COLUMNS`)."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise InputError([InputProblem(source, 0, "prompt set file not found")])
    if layout is not None and layout not in LAYOUTS:
        raise InputError([InputProblem(source, 0, f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")])
    if mma_prompt not in MMA_PROMPT_COLUMNS:
        raise InputError([InputProblem(source, 0, f"unknown MMA prompt column {mma_prompt!r}; choose from "
                                                  f"{', '.join(MMA_PROMPT_COLUMNS)}")])
    with io.StringIO(read_utf8_text(path), newline="") as handle:
        reader = csv.reader(handle)
        header = [cell.strip() for cell in next(reader, [])]
        if not header:
            raise InputError([InputProblem(source, 0, "the file is empty; expected a CSV header")])
        found = detect_layout(header)
        chosen = layout or found
        if chosen is None:
            raise InputError([InputProblem(source, 1, f"header {header} matches no prompt set layout; expected one "
                                                      f"of: {'; '.join(', '.join(c) for c in LAYOUT_COLUMNS.values())}",
                                           "header")])
        missing = [c for c in LAYOUT_COLUMNS[chosen] if c not in header]
        if missing:
            raise InputError([InputProblem(source, 1, f"the {chosen} layout needs column(s) {missing}; have {header}",
                                           "header")])
        duplicated = sorted({c for c in header if c and header.count(c) > 1})
        if duplicated:
            raise InputError([InputProblem(source, 1, f"column(s) {duplicated} appear twice", "header")])
        name = attack or (path.stem if chosen == "i2p_attack" else chosen)
        problems: list[InputProblem] = []
        rows: list[SetPrompt] = []
        seen: dict[str, int] = {}
        index = -1
        for cells in reader:
            line = reader.line_num
            if not cells:
                continue
            index += 1
            if len(cells) != len(header):
                problems.append(InputProblem(source, line, f"expected {len(header)} cells, got {len(cells)}"))
                continue
            row = dict(zip(header, cells))
            row_problems = len(problems)

            def problem(field: str, reason: str) -> None:
                problems.append(InputProblem(source, line, reason, field))

            caption_column = {"ringabell": "prompt", "i2p_attack": "prompt", "mma": mma_prompt}.get(chosen, "caption")
            caption = row[caption_column]
            if reason := caption_problem(caption):
                problem(caption_column, reason)
            file_name, seed, user_id, categories = None, None, None, ()
            if chosen in ("ringabell", "i2p_attack"):
                try:
                    case = _whole_number(row["case_number"], "the case number")
                    if case < 0:
                        raise ValueError(f"must not be negative, got {case}")
                    file_name = f"{case:0{ATTACK_NAME_DIGITS}d}.png"
                except ValueError as error:
                    problem("case_number", str(error))
                try:
                    seed = _whole_number(row["evaluation_seed"], "a sampling seed")
                    if reason := seed_problem(seed):
                        raise ValueError(reason)
                except ValueError as error:
                    problem("evaluation_seed", str(error))
            elif chosen == "mma":
                file_name = f"{index:0{ATTACK_NAME_DIGITS}d}.png"
            else:
                file_name = row["file_name"].strip()
                if reason := file_name_problem(file_name):
                    problem("file_name", reason)
                    file_name = None
            category_column = "categories" if "categories" in row else "category" if "category" in row else None
            if category_column is not None:
                try:
                    categories = _categories(row[category_column])
                except ValueError as error:
                    problem(category_column, str(error))
            if chosen == "sage":
                try:
                    user_id = format_user_id(_whole_number(row["user_id"], "a Sage User_ID"))
                except ValueError as error:
                    problem("user_id", str(error))
            if file_name is not None:
                if file_name in seen:
                    what = "case_number" if chosen in ("ringabell", "i2p_attack") else "file_name"
                    problem(what, f"{file_name} is also line {seen[file_name]}'s image")
                else:
                    seen[file_name] = line
            if len(problems) == row_problems:
                rows.append(SetPrompt(line, file_name, caption, categories, user_id, seed,
                                      name if chosen in ATTACK_LAYOUTS else None))
    if not rows and not problems:
        problems.append(InputProblem(source, 0, "no rows: the file has a header only"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) in the prompt set {path}")
    return PromptSet(path, chosen, tuple(rows))


def infer_lines(prompt_set: PromptSet, user_data: dict | None = None, level: str | None = None,
                limit: int | None = None) -> list[dict]:
    """The ``infer.py`` prompts lines of ``prompt_set``: ``file_name``, ``caption``, ``seed`` (when
    the row has one), ``category`` / ``attack`` (carried to the generation log and read by
    ``evaluate.py``) and ``user_data``: ``user_data`` when given (a level's user), else the row's
    own Sage user (``{"User_ID": ...}``), else none (methods without users). ``level`` names the
    level ``user_data`` stands for; ``limit`` keeps the first rows only."""
    lines = []
    for row in prompt_set.rows[:limit]:
        line: dict = {"file_name": row.file_name, "caption": row.caption}
        if row.seed is not None:
            line["seed"] = row.seed
        if row.categories:
            line["category"] = ", ".join(row.categories)
        if row.attack is not None:
            line["attack"] = row.attack
        if user_data is not None:
            line["user_data"] = dict(user_data)
        elif row.user_id is not None:
            line["user_data"] = {"User_ID": row.user_id}
        if level is not None:
            line["level"] = level
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m psalign.prompt_sets SET.csv --output prompts.jsonl [--level level_3 ...]``: an
    ``infer.py`` prompts file from a prompt set. Exit status 0, or 2 for a problem in the inputs."""
    import argparse
    import json
    import sys

    from psalign.cli.common import program_name
    from psalign.io import atomic_write
    from psalign.levels import LEVEL_SETS, level_users

    parser = argparse.ArgumentParser(prog=program_name("psalign.prompt_sets"), description=(
        "Turn a published evaluation or attack prompt set into an infer.py prompts file: the rows' own Sage users, "
        "no users (for methods without them), or one level's user per --level (one output file per level: "
        "<output stem>_<level>.jsonl when several are given)."))
    parser.add_argument("prompt_set", type=Path, help=f"CSV in one of the layouts {', '.join(LAYOUTS)}")
    parser.add_argument("--output", type=Path, required=True, help="infer.py prompts JSONL to write")
    parser.add_argument("--layout", choices=LAYOUTS, help="the file's layout (default: recognised from its header)")
    parser.add_argument("--attack", help="attack name of adversarial rows (default: the layout's name)")
    parser.add_argument("--mma_prompt", choices=MMA_PROMPT_COLUMNS, default="adv_prompt",
                        help="which prompt of an MMA-Diffusion row to draw")
    parser.add_argument("--level", nargs="+", default=[], help="level(s) whose user every line is for")
    parser.add_argument("--levels", choices=LEVEL_SETS, default="reference",
                        help="level set: reference (nested reference users) or published (users of users.csv)")
    parser.add_argument("--users_csv", type=Path, help="the published users.csv (--levels published)")
    parser.add_argument("--embeds_folder", type=Path, help="folder holding the published levels' user embeddings")
    parser.add_argument("--no_users", action="store_true", help="drop the rows' own Sage users")
    parser.add_argument("--limit", type=int, help="first N rows only")
    args = parser.parse_args(argv)
    try:
        prompt_set = read_prompt_set(args.prompt_set, args.layout, args.attack, args.mma_prompt)
        users = level_users(args.levels, args.level, args.users_csv, args.embeds_folder) if args.level else []
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    def level_path(user) -> Path:
        return args.output if len(users) == 1 else args.output.with_name(f"{args.output.stem}_{user.level}"
                                                                         f"{args.output.suffix}")

    outputs = {level_path(u): infer_lines(prompt_set, u.user_data, u.level, args.limit) for u in users} if users \
        else {args.output: infer_lines(prompt_set, limit=args.limit)}
    for path, lines in outputs.items():
        if args.no_users and not users:
            lines = [{k: v for k, v in line.items() if k != "user_data"} for line in lines]
        with atomic_write(path, encoding="utf-8") as handle:
            handle.writelines(json.dumps(line) + "\n" for line in lines)
        print(f"wrote {len(lines)} line(s) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
