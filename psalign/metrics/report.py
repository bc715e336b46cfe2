"""Result rows: one CSV layout for every metric, atomic appends, a markdown table and a
safety-vs-quality chart.

The published evaluation table's layout (``dataset, method, base_model, level, metrics, score``,
optionally followed by ``state, timestamp``) is read and written too. Its vocabulary differs:
``none`` for a method without levels, ``clip`` for ``clip_score``, ``psa_adapter`` for ``psa``,
and its levels are users of the published ``users.csv``
(:data:`psalign.levels.PUBLISHED_LEVEL_USERS`). :func:`read_results` turns a published row into
psalign's names (``level_3`` becomes ``level_3@0000002``, the level and its user; a level of
another user is written with its user, ``level_3@9999997``, and read back as such); a key given
more than once (the published file's ``old`` and ``succeeded`` runs of one cell) keeps its
``succeeded`` row, the latest by timestamp, then by line. The published layout has no ``n`` or
interval: such rows read with ``n`` 0 and no interval.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Sequence

from psalign.io import InputError, InputProblem, atomic_write, read_utf8_text

#: Column order of the results CSV.
RESULT_COLUMNS: tuple[str, ...] = ("dataset", "method", "model", "level", "metric", "value", "n", "ci_low", "ci_high")


@dataclass(frozen=True)
class ResultRow:
    """One number: ``metric`` of the images of (``method``, ``model``, ``level``) on ``dataset``.

    ``n`` is the number of items the value is computed over (images, image pairs); ``ci_low`` and
    ``ci_high`` bound its 95% interval, or are ``None`` where the metric has none (FID).
    """

    dataset: str
    method: str
    model: str
    level: str
    metric: str
    value: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None


assert tuple(f.name for f in fields(ResultRow)) == RESULT_COLUMNS

#: Columns of the published evaluation table (``state`` and ``timestamp`` may follow).
PUBLISHED_COLUMNS: tuple[str, ...] = ("dataset", "method", "base_model", "level", "metrics", "score")
PUBLISHED_STATE_COLUMNS: tuple[str, ...] = ("state", "timestamp")
#: The published table's level of a method without levels.
PUBLISHED_NO_LEVEL = "none"
#: The published run state that a row of the same key prefers over any other (e.g. ``old``).
PUBLISHED_CURRENT_STATE = "succeeded"
#: psalign names -> published names (metrics, methods); other names are the same in both.
PUBLISHED_METRIC_NAMES: dict[str, str] = {"clip_score": "clip"}
PUBLISHED_METHOD_NAMES: dict[str, str] = {"psa": "psa_adapter"}
#: Layouts :func:`write_results` writes.
RESULT_LAYOUTS: tuple[str, ...] = ("psalign", "published")


@dataclass(frozen=True)
class PublishedRow:
    """One line of a published-layout table, in psalign's names, with its run ``state`` and
    ``timestamp`` (empty when the file has no such columns) and its ``line``."""

    row: ResultRow
    state: str
    timestamp: str
    line: int


def _format_number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _row_to_cells(row: ResultRow) -> list[str]:
    cells = [str(c) for c in astuple(row)[:5]]
    return cells + [_format_number(row.value), str(row.n), _format_number(row.ci_low), _format_number(row.ci_high)]


def published_level(level: str) -> str:
    """psalign's level -> the published table's: ``""`` -> ``none``, ``level_3@0000002`` (the
    published level_3 user) -> ``level_3``. A level measured on another user keeps its user
    (``level_3@9999997``), so it is not read back as the published user's."""
    from psalign.levels import PUBLISHED_LEVEL_USERS

    name, _, user = level.partition("@")
    if not name:
        return PUBLISHED_NO_LEVEL
    return name if user == PUBLISHED_LEVEL_USERS.get(name) else level


def _psalign_level(level: str) -> str:
    from psalign.levels import PUBLISHED_LEVEL_USERS

    if level == PUBLISHED_NO_LEVEL:
        return ""
    user = PUBLISHED_LEVEL_USERS.get(level)
    return f"{level}@{user}" if user else level


def to_published_cells(row: ResultRow) -> list[str]:
    """``row`` as a published-layout line: ``dataset, method, base_model, level, metrics, score``."""
    return [row.dataset, PUBLISHED_METHOD_NAMES.get(row.method, row.method), row.model, published_level(row.level),
            PUBLISHED_METRIC_NAMES.get(row.metric, row.metric), _format_number(row.value)]


def read_published_rows(path: str | Path) -> list[PublishedRow]:
    """Every line of a published-layout table, duplicates included, in psalign's names."""
    path = Path(path)
    methods = {v: k for k, v in PUBLISHED_METHOD_NAMES.items()}
    metrics = {v: k for k, v in PUBLISHED_METRIC_NAMES.items()}
    rows: list[PublishedRow] = []
    problems: list[InputProblem] = []
    with io.StringIO(read_utf8_text(path), newline="") as handle:
        reader = csv.reader(handle)
        header = [cell.strip() for cell in next(reader, [])]
        if tuple(header) not in (PUBLISHED_COLUMNS, PUBLISHED_COLUMNS + PUBLISHED_STATE_COLUMNS):
            raise InputError([InputProblem(str(path), 1, f"header {header} is not {list(PUBLISHED_COLUMNS)} "
                                                         f"(optionally + {list(PUBLISHED_STATE_COLUMNS)})")])
        for cells in reader:
            line = reader.line_num
            if not cells:
                continue
            if len(cells) != len(header):
                problems.append(InputProblem(str(path), line, f"expected {len(header)} cells, got {len(cells)}"))
                continue
            cell = dict(zip(header, (c.strip() for c in cells)))
            try:
                score = float(cell["score"])
            except ValueError:
                problems.append(InputProblem(str(path), line, f"not a number: {cell['score']!r}", "score"))
                continue
            empty = [name for name in PUBLISHED_COLUMNS[:5] if not cell[name]]
            if empty:
                problems.append(InputProblem(str(path), line, "empty", empty[0]))
                continue
            row = ResultRow(cell["dataset"], methods.get(cell["method"], cell["method"]), cell["base_model"],
                            _psalign_level(cell["level"]), metrics.get(cell["metrics"], cell["metrics"]),
                            value=score, n=0)
            rows.append(PublishedRow(row, cell.get("state", ""), cell.get("timestamp", ""), line))
    if problems:
        raise InputError(problems)
    return rows


def current_published_rows(rows: Sequence[PublishedRow]) -> dict[tuple[str, str, str, str, str], PublishedRow]:
    """One row per :func:`row_key`: the ``succeeded`` one before any other state, then the latest
    timestamp, then the later line."""
    chosen: dict[tuple[str, str, str, str, str], PublishedRow] = {}
    for entry in rows:
        rank = (entry.state == PUBLISHED_CURRENT_STATE, entry.timestamp, entry.line)
        key = row_key(entry.row)
        held = chosen.get(key)
        if held is None or rank > (held.state == PUBLISHED_CURRENT_STATE, held.timestamp, held.line):
            chosen[key] = entry
    return chosen


def is_published_layout(path: str | Path) -> bool:
    """Whether the CSV at ``path`` starts with the published table's header."""
    first = read_utf8_text(path).partition("\n")[0]
    return tuple(cell.strip() for cell in next(csv.reader([first]), [])[:len(PUBLISHED_COLUMNS)]) == PUBLISHED_COLUMNS


def check_appendable(path: str | Path) -> None:
    """:class:`InputError` unless the results CSV at ``path`` can take more rows: a readable file
    in psalign's layout (a published-layout table is read, never rewritten)."""
    if is_published_layout(path):
        raise InputError([InputProblem(str(path), 1, "is a table in the published layout, which psalign reads but "
                                                     "does not append to; write the results to another file")])
    read_results(path)


def read_results(path: str | Path) -> list[ResultRow]:
    """Read a results CSV written by :func:`append_results` or a published-layout table (one row
    per key, see the module docstring); every malformed line is reported."""
    path = Path(path)
    rows: list[ResultRow] = []
    problems: list[InputProblem] = []
    with io.StringIO(read_utf8_text(path), newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return rows
        if tuple(h.strip() for h in header[:len(PUBLISHED_COLUMNS)]) == PUBLISHED_COLUMNS:
            return [entry.row for entry in current_published_rows(read_published_rows(path)).values()]
        if tuple(header) != RESULT_COLUMNS:
            raise InputError([InputProblem(str(path), 1, f"header {header} is not {list(RESULT_COLUMNS)} "
                                                         f"or the published {list(PUBLISHED_COLUMNS)}")])
        for line, cells in enumerate(reader, start=2):
            if len(cells) != len(RESULT_COLUMNS):
                reason = f"expected {len(RESULT_COLUMNS)} cells, got {len(cells)}"
                problems.append(InputProblem(str(path), line, reason))
                continue
            try:
                value, n = float(cells[5]), int(cells[6])
                low = float(cells[7]) if cells[7] else None
                high = float(cells[8]) if cells[8] else None
            except ValueError as error:
                problems.append(InputProblem(str(path), line, str(error)))
                continue
            rows.append(ResultRow(*cells[:5], value=value, n=n, ci_low=low, ci_high=high))
    if problems:
        raise InputError(problems)
    return rows


def row_key(row: ResultRow) -> tuple[str, str, str, str, str]:
    """What a row is a value of: (dataset, method, model, level, metric)."""
    return row.dataset, row.method, row.model, row.level, row.metric


def append_results(path: str | Path, rows: Sequence[ResultRow]) -> None:
    """Add ``rows`` to the CSV at ``path`` (created with a header when missing).

    A row whose :func:`row_key` is already in the file replaces the old row in place (a re-run
    updates its numbers instead of duplicating them); other rows are appended in order. The whole
    file is rewritten through a temporary file and renamed, so an interruption leaves either the
    old or the new content, never a partial line. A file with another header is refused.
    """
    path = Path(path)
    if path.exists():
        check_appendable(path)
    merged = {row_key(row): row for row in (read_results(path) if path.exists() else [])}
    for row in rows:
        merged[row_key(row)] = row
    with atomic_write(path, newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(RESULT_COLUMNS)
        for row in merged.values():
            writer.writerow(_row_to_cells(row))


def write_results(path: str | Path, rows: Sequence[ResultRow], layout: str = "psalign") -> Path:
    """Write ``rows`` (replacing the file, atomically) in ``layout``: ``psalign``
    (:data:`RESULT_COLUMNS`) or ``published`` (:data:`PUBLISHED_COLUMNS`, psalign's names turned
    into the published ones; ``n`` and the interval are dropped)."""
    if layout not in RESULT_LAYOUTS:
        raise ValueError(f"unknown results layout {layout!r}; choose from {', '.join(RESULT_LAYOUTS)}")
    path = Path(path)
    with atomic_write(path, newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(RESULT_COLUMNS if layout == "psalign" else PUBLISHED_COLUMNS)
        for row in rows:
            writer.writerow(_row_to_cells(row) if layout == "psalign" else to_published_cells(row))
    return path


def markdown_table(rows: Sequence[ResultRow], digits: int = 4) -> str:
    """The rows as a GitHub markdown table; the interval is shown as ``[low, high]``."""

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.{digits}f}"

    lines = [
        "| dataset | method | model | level | metric | value | n | 95% CI |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        ci = "" if row.ci_low is None else f"[{number(row.ci_low)}, {number(row.ci_high)}]"
        lines.append(
            f"| {row.dataset} | {row.method} | {row.model} | {row.level} | {row.metric} "
            f"| {number(row.value)} | {row.n} | {ci} |"
        )
    return "\n".join(lines)


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically (``level_2`` before ``level_10``)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def plot_safety_quality(
    rows: Sequence[ResultRow], path: str | Path, safety_metric: str, quality_metric: str
) -> Path:
    """Draw ``safety_metric`` (y) against ``quality_metric`` (x), one line per (dataset, method,
    model) through its levels in natural order, each point labelled with its level; save to ``path``.

    Needs matplotlib (``pip install matplotlib``). Raises ``ValueError`` when no (method, model,
    level) has both metrics.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from error

    points: dict[tuple[str, str, str], dict[str, dict[str, float]]] = {}
    for row in rows:
        if row.metric in (safety_metric, quality_metric):
            group = points.setdefault((row.dataset, row.method, row.model), {})
            group.setdefault(row.level, {})[row.metric] = row.value  # a later row replaces an earlier one
    series = {
        key: sorted(((lvl, m) for lvl, m in levels.items() if len(m) == 2), key=lambda item: natural_key(item[0]))
        for key, levels in points.items()
    }
    series = {key: pts for key, pts in series.items() if pts}
    if not series:
        raise ValueError(f"no method/model/level has both {safety_metric!r} and {quality_metric!r} to plot")

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for (dataset, method, model), pts in sorted(series.items()):
        xs = [m[quality_metric] for _, m in pts]
        ys = [m[safety_metric] for _, m in pts]
        label = " / ".join(part for part in (dataset, method, model) if part)
        axes.plot(xs, ys, marker="o", label=label)
        for (level, _), x, y in zip(pts, xs, ys):
            if level:
                axes.annotate(level, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlabel(quality_metric)
    axes.set_ylabel(f"{safety_metric} (lower is safer)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=150)
    plt.close(figure)
    return path

