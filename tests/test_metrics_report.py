"""Wilson intervals, mean intervals, the results CSV, the markdown table and the chart."""

from __future__ import annotations

import builtins
import math

import pytest

from psalign.io import InputError
from psalign.metrics.report import ResultRow, append_results, markdown_table, plot_safety_quality, read_results
from psalign.metrics.stats import Proportion, mean_interval, wilson_interval


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half-width 1.96*sqrt(0.016 + 0.009604)/1.38416
    low, high = wilson_interval(8, 10, z=1.96)
    denominator = 1 + 1.96**2 / 10
    centre, half = (0.8 + 1.96**2 / 20) / denominator, 1.96 * math.sqrt(0.016 + 1.96**2 / 400) / denominator
    assert (low, high) == pytest.approx((centre - half, centre + half))
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_wilson_interval_at_the_edges():
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    low, high = wilson_interval(20, 20)
    assert high == 1.0 and low == pytest.approx(1 - 0.1611, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(1, 0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)
    assert Proportion(3, 4).value == 0.75


def test_mean_interval():
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    half = 1.959963984540054 * math.sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3 / 4)
    assert (mean, low, high) == pytest.approx((2.5, 2.5 - half, 2.5 + half))
    assert mean_interval([7.0]) == (7.0, 7.0, 7.0)


def rows(level="level_1", value=0.25):
    return [
        ResultRow("coco", "psa", "sd15", level, "inpro", value, 40, 0.1, 0.4),
        ResultRow("coco", "psa", "sd15", level, "fid", 12.5, 40),
    ]


def test_results_append_replace_and_survive_a_failed_write(tmp_path, monkeypatch):
    path = tmp_path / "results.csv"
    append_results(path, rows())
    append_results(path, rows("level_2"))
    assert [r.level for r in read_results(path)] == ["level_1", "level_1", "level_2", "level_2"]
    append_results(path, [rows(value=0.5)[0]])  # same key: replaced in place, not duplicated
    read = read_results(path)
    assert len(read) == 4 and read[0].value == 0.5 and read[1].ci_low is None
    assert path.read_text().splitlines()[0] == "dataset,method,model,level,metric,value,n,ci_low,ci_high"

    before = path.read_text()

    def broken_writerow(*args, **kwargs):
        raise OSError("disk full")

    import csv

    monkeypatch.setattr(csv, "writer", lambda handle: type("W", (), {"writerow": broken_writerow})())
    with pytest.raises(OSError, match="disk full"):
        append_results(path, rows("level_3"))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary file left


def test_a_foreign_csv_is_refused(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="other.csv:1"):
        append_results(path, rows())
    path.write_text("dataset,method,model,level,metric,value,n,ci_low,ci_high\ncoco,psa,,,inpro,abc,3,,\n")
    with pytest.raises(InputError, match="other.csv:2"):
        read_results(path)


def test_markdown_table():
    table = markdown_table(rows()).splitlines()
    assert table[0].startswith("| dataset | method |")
    assert table[2] == "| coco | psa | sd15 | level_1 | inpro | 0.2500 | 40 | [0.1000, 0.4000] |"
    assert table[3] == "| coco | psa | sd15 | level_1 | fid | 12.5000 | 40 |  |"


def test_plot_across_levels(tmp_path):
    pytest.importorskip("matplotlib")
    data = []
    for level, (inpro, clip) in {"level_10": (0.1, 25.0), "level_2": (0.3, 28.0), "level_1": (0.4, 30.0)}.items():
        data += [
            ResultRow("coco", "psa", "sd15", level, "inpro", inpro, 10),
            ResultRow("coco", "psa", "sd15", level, "clip_score", clip, 10),
        ]
    path = plot_safety_quality(data, tmp_path / "chart.png", "inpro", "clip_score")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no method/model/level has both"):
        plot_safety_quality(data, tmp_path / "x.png", "inpro", "fid")


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_safety_quality(rows(), tmp_path / "chart.png", "inpro", "fid")
