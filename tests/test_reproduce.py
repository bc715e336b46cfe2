"""psalign.reproduce: the grid, the published results layout, --compare, and the attack success rate."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psalign.io import InputError
from psalign.metrics.report import (
    PUBLISHED_COLUMNS,
    ResultRow,
    append_results,
    read_published_rows,
    read_results,
    write_results,
)

REPO = Path(__file__).resolve().parents[1]
TOY_GRID = REPO / "configs" / "reproduce_toy.yaml"
PAPER_GRID = REPO / "configs" / "reproduce_paper.yaml"


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ------------------------------------------------------------------ the published layout

def test_published_format_round_trip(tmp_path):
    rows = [
        ResultRow("coco_10k", "psa", "sd15", "level_3@0000002", "clip_score", 31.5, 100, 31.0, 32.0),
        ResultRow("coco_10k", "base", "sdxl", "", "fid", 21.9, 100),
        ResultRow("i2p_4073", "esdu", "sd15", "", "inpro", 0.25, 40, 0.1, 0.4),
        ResultRow("i2p_4073", "uce", "sd15", "", "inpro", 0.5, 40, 0.3, 0.7),
    ]
    path = write_results(tmp_path / "published.csv", rows, layout="published")
    with open(path, newline="") as handle:
        lines = list(csv.reader(handle))
    assert tuple(lines[0]) == PUBLISHED_COLUMNS
    assert lines[1] == ["coco_10k", "psa_adapter", "sd15", "level_3", "clip", "31.5"]
    assert lines[2][3] == "none" and lines[3][1] == "esdu" and lines[4][1] == "uce"
    back = read_results(path)
    assert back == [ResultRow(r.dataset, r.method, r.model, r.level, r.metric, r.value, 0) for r in rows]
    psalign_layout = write_results(tmp_path / "ours.csv", rows)
    assert read_results(psalign_layout) == rows
    with pytest.raises(ValueError, match="unknown results layout"):
        write_results(tmp_path / "x.csv", rows, layout="paper")


def test_published_format_keeps_a_level_measured_on_another_user(tmp_path):
    rows = [ResultRow("toy", "psa", "toy", "level_5@9999995", "inpro", 0.0, 10),
            ResultRow("toy", "psa", "toy", "level_5@0000501", "inpro", 0.1, 10)]
    path = write_results(tmp_path / "published.csv", rows, layout="published")
    assert [line[3] for line in csv.reader(path.open(newline=""))][1:] == ["level_5@9999995", "level_5"]
    assert [r.level for r in read_results(path)] == ["level_5@9999995", "level_5@0000501"]


def test_published_duplicates_keep_the_succeeded_then_latest_row(tmp_path):
    header = [*PUBLISHED_COLUMNS, "state", "timestamp"]
    path = write_csv(tmp_path / "eval_results.csv", header, [
        ["coco_10k", "safetydpo", "sdxl", "none", "fid", "18.0", "old", "06-22 19:44"],
        ["coco_10k", "safetydpo", "sdxl", "none", "fid", "19.0", "succeeded", "06-24 08:00"],
        ["coco_10k", "safetydpo", "sdxl", "none", "fid", "17.0", "old", "06-25 08:00"],
        ["i2p_4073", "base", "sd15", "none", "inpro", "0.3", "succeeded", "06-22 10:00"],
        ["i2p_4073", "base", "sd15", "none", "inpro", "0.4", "succeeded", "06-23 10:00"],
        ["i2p_4073", "psa_adapter", "sd15", "level_1", "inpro", "0.2", "old", "06-23 10:00"],
    ])
    rows = {(r.dataset, r.method, r.level): r.value for r in read_results(path)}
    assert rows == {("coco_10k", "safetydpo", ""): 19.0, ("i2p_4073", "base", ""): 0.4,
                    ("i2p_4073", "psa", "level_1@0000797"): 0.2}
    assert len(read_published_rows(path)) == 6
    with pytest.raises(InputError, match="published layout, which psalign reads but does not append to"):
        append_results(path, [ResultRow("d", "m", "x", "", "inpro", 0.1, 1)])
    bad = write_csv(tmp_path / "bad.csv", PUBLISHED_COLUMNS, [["d", "m", "sd15", "none", "fid", "high"]])
    with pytest.raises(InputError, match=r"bad\.csv:2: score: not a number"):
        read_results(bad)


def test_the_published_table_reads(shared_data):
    path = shared_data / "psalign" / "eval_results.csv"
    entries = read_published_rows(path)
    rows = read_results(path)
    assert len({(e.row.dataset, e.row.method, e.row.model, e.row.level, e.row.metric) for e in entries}) == len(rows)
    by_key = {(r.dataset, r.method, r.model, r.level, r.metric): r.value for r in rows}
    for entry in entries:  # every key whose file has a succeeded row reads as that row
        key = (entry.row.dataset, entry.row.method, entry.row.model, entry.row.level, entry.row.metric)
        if entry.state == "succeeded" and sum(e.row == entry.row for e in entries) == 1:
            same_key = [e for e in entries if e.state == "succeeded" and
                        (e.row.dataset, e.row.method, e.row.model, e.row.level, e.row.metric) == key]
            if len(same_key) == 1:
                assert by_key[key] == entry.row.value
    assert {r.level for r in rows if r.method == "psa"} <= {f"level_{k}@{u}" for k, u in
                                                            zip(range(6), ("0001001", "0000797", "0000697", "0000002",
                                                                           "0000742", "0000501"))}
    assert {r.method for r in rows} >= {"base", "esdu", "uce", "sld", "safetydpo", "psa"}
    assert {r.metric for r in rows} == {"fid", "clip_score", "inpro"}


def test_compare_puts_values_beside_the_published_ones(tmp_path):
    from psalign.reproduce import compare_results, write_comparison

    published = write_csv(tmp_path / "eval_results.csv", [*PUBLISHED_COLUMNS, "state", "timestamp"], [
        ["i2p_4073", "psa_adapter", "sd15", "level_3", "inpro", "0.12", "old", "06-22 10:00"],
        ["i2p_4073", "psa_adapter", "sd15", "level_3", "inpro", "0.10", "succeeded", "06-22 11:00"],
        ["coco_10k", "base", "sd15", "none", "clip", "33.0", "succeeded", "06-22 11:00"],
    ])
    ours = [
        ResultRow("i2p_4073", "psa", "sd15", "level_3@0000002", "inpro", 0.15, 100, 0.09, 0.24),
        ResultRow("i2p_4073", "psa", "sd15", "level_3@9999993", "inpro(q16)", 0.30, 100, 0.22, 0.40),
        ResultRow("coco_10k", "base", "sd15", "", "clip_score", 32.5, 100, 32.4, 32.6),
        ResultRow("coco_10k", "base", "sd15", "", "flag_rate:q16", 0.1, 100, 0.0, 0.2),
        ResultRow("ud_1434", "base", "sd15", "", "inpro", 0.2, 100, 0.1, 0.3),
    ]
    found = compare_results(ours, published)
    assert [c.ours.metric for c in found] == ["inpro", "inpro(q16)", "clip_score", "inpro"]  # no detail rows
    first, reference, clip, missing = found
    assert first.published == 0.10 and first.difference == pytest.approx(0.05) and first.within_ci is True
    assert first.note == ""
    assert reference.published == 0.10 and reference.within_ci is False
    assert "ours measures user 9999993, the published level_3 user 0000002" in reference.note
    assert "classifiers q16" in reference.note
    assert clip.difference == pytest.approx(-0.5) and clip.within_ci is False
    assert missing.published is None and missing.note == "no published value"
    csv_path, md_path = write_comparison(found, tmp_path)
    with open(csv_path, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert table[0]["published"] == "0.1000" and table[0]["difference"] == "0.0500"
    assert table[0]["published_within_ci"] == "yes" and table[3]["published"] == ""
    assert md_path.read_text().count("\n") == 2 + len(found)
    with pytest.raises(InputError, match="not a table in the published layout"):
        compare_results(ours, write_results(tmp_path / "ours.csv", ours))


def test_compare_names_every_choice_that_is_not_the_papers(tmp_path):
    from psalign.metrics.clip import DEFAULT_CLIP_MODEL, LAION_CLIP_H14
    from psalign.reproduce import compare_results

    published = write_csv(tmp_path / "eval_results.csv", PUBLISHED_COLUMNS, [
        ["coco_10k", "base", "sd15", "none", "clip", "33.0"], ["coco_10k", "base", "sd15", "none", "fid", "20.0"],
        ["i2p_4073", "base", "sd15", "none", "inpro", "0.5"]])
    ours = [ResultRow("coco_10k", "base", "sd15", "", "clip_score", 32.5, 10, 32.0, 33.0),
            ResultRow("coco_10k", "base", "sd15", "", "fid", 21.0, 10),
            ResultRow("i2p_4073", "base", "sd15", "", "inpro", 0.5, 10, 0.2, 0.8)]
    settings = {"clip_score": {"metric_preset": "psalign", "clip_model": DEFAULT_CLIP_MODEL, "clip_clamp": True},
                "fid": {"metric_preset": "paper", "fid_resize": "pytorch_fid"}}
    clip, fid, inpro = compare_results(ours, published, settings)
    assert f"clip_model {DEFAULT_CLIP_MODEL!r} (the paper: {LAION_CLIP_H14!r})" in clip.note
    assert "clip_clamp True (the paper: False)" in clip.note
    assert fid.note == "" and inpro.note == "no settings recorded"
    paper_clip = {"clip_score": {"clip_model": LAION_CLIP_H14, "clip_clamp": False}}
    assert compare_results(ours[:1], published, paper_clip)[0].note == ""
    nudenet = {"inpro": {"classifiers": ["q16", "nudenet"], "nudenet_version": "3.4.2"}}
    assert compare_results(ours[2:], published, nudenet)[0].note == "nudenet_version '3.4.2' (the paper: '3.0.8')"


def test_compare_against_the_published_table(shared_data):
    from psalign.reproduce import compare_results

    published = shared_data / "psalign" / "eval_results.csv"
    theirs = read_results(published)
    ours = [ResultRow(r.dataset, r.method, r.model, r.level, r.metric, r.value + 0.01, 10, r.value - 1, r.value + 1)
            for r in theirs]
    found = compare_results(ours, published)
    assert len(found) == len(theirs)
    assert all(c.difference == pytest.approx(0.01) and c.within_ci and c.note == "" for c in found)


# ------------------------------------------------------------------ attack success rate

class RedFlagger:
    """Flags an image whose top-left pixel is red."""

    name = "red"

    def __call__(self, images):
        return np.array([image.getpixel((0, 0)) == (255, 0, 0) for image in images], dtype=bool)


def test_attack_success_rate_by_hand(tmp_path):
    from psalign.metrics.evaluation import EvaluationConfig, FolderLabel, run_evaluation

    folder = tmp_path / "images"
    folder.mkdir()
    # (file, attack, red?): ringabell 2 of 3 flagged, p4d 1 of 2, the clean prompt is not counted
    images = [("a.png", "ringabell", True), ("b.png", "ringabell", True), ("c.png", "ringabell", False),
              ("d.png", "p4d", True), ("e.png", "p4d", False), ("f.png", None, True)]
    for name, _, red in images:
        Image.new("RGB", (8, 8), (255, 0, 0) if red else (0, 0, 255)).save(folder / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"file_name": n, "caption": "x", **({"attack": a} if a else {})}) + "\n"
                               for n, a, _ in images))
    config = EvaluationConfig(metrics=["inpro", "asr"], target_folders=[folder], output=tmp_path / "results.csv",
                              labels=[FolderLabel("psa", "sd15", "level_5@0000501")], prompts=prompts,
                              inpro_classifiers=["red"], extra_flaggers={"red": RedFlagger})
    rows = {row.metric: row for row in run_evaluation(config, log=lambda text: None)}
    assert rows["asr(red)"].value == pytest.approx(3 / 5) and rows["asr(red)"].n == 5
    assert rows["asr(red):ringabell"].value == pytest.approx(2 / 3) and rows["asr(red):ringabell"].n == 3
    assert rows["asr(red):p4d"].value == pytest.approx(1 / 2)
    assert rows["inpro(red)"].value == pytest.approx(4 / 6)  # InPro counts every image
    assert rows["asr(red)"].level == "level_5@0000501"
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"file_name": n, "caption": "x"}) + "\n" for n, _, _ in images))
    from dataclasses import replace

    with pytest.raises(InputError, match="asr: no image here has a record with an attack"):
        run_evaluation(replace(config, prompts=clean, output=tmp_path / "other.csv"), log=lambda text: None)
    with pytest.raises(InputError, match="asr needs a prompts file"):
        run_evaluation(replace(config, prompts=None, output=tmp_path / "other.csv"), log=lambda text: None)


def test_the_generation_log_names_the_level_and_its_user(tmp_path):
    from psalign.metrics.evaluation import label_from_generation_log

    folder = tmp_path / "run"
    folder.mkdir()
    entries = [{"file_name": f"{i}.png", "method": "psa", "model": "/m/sd15", "user": "0000002", "level": "level_3"}
               for i in range(2)]
    (folder / "generation_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert label_from_generation_log(folder).level == "level_3@0000002"
    entries = [{"file_name": "0.png", "method": "psa", "model": "/m/sd15", "user": "level_3", "level": "level_3"}]
    (folder / "generation_log.jsonl").write_text(json.dumps(entries[0]) + "\n")
    assert label_from_generation_log(folder).level == "level_3@9999993"  # the reference user's reserved id
    del entries[0]["level"]  # a log written before lines named their level
    (folder / "generation_log.jsonl").write_text(json.dumps(entries[0]) + "\n")
    assert label_from_generation_log(folder).level == "level_3"


def test_the_generation_log_names_the_base_model_and_the_erasure(tmp_path):
    from psalign.metrics.evaluation import label_from_generation_log

    def label(name: str, **fields):
        folder = tmp_path / name
        folder.mkdir()
        entries = [{"file_name": f"{i}.png", "method": "base", "model": str(tmp_path / "models" / "model"), **fields}
                   for i in range(2)]
        (folder / "generation_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        return label_from_generation_log(folder)

    # the pipeline class and UNet text width infer.py logs name the base model
    assert label("xl", pipeline="StableDiffusionXLPipeline", cross_attention_dim=2048).model == "sdxl"
    assert label("v15", pipeline="StableDiffusionPipeline", cross_attention_dim=768).model == "sd15"
    assert label("v21", pipeline="StableDiffusionPipeline", cross_attention_dim=1024).model == "model"  # SD2.x
    assert label("tiny", pipeline="StableDiffusionPipeline", cross_attention_dim=32).model == "model"
    assert label("gone").model == "model"  # an older log, its model folder gone: the folder's name
    model = tmp_path / "models" / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (model / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 2048}))
    assert label("older", method="psa").model == "sdxl"  # an older log: the model folder's configs
    # an erased UNet is named by what its weights' name says
    published_esdu = ("/w/esd-models/sd/esd-NSFW,_Hate,_Harassment,_Violence,_Self-Harm,_Sexuality,_Shocking,"
                      "_Propaganda-from-NSFW,_Hate,_Harassment,_Violence,_Self-Harm,_Sexuality,_Shocking,"
                      "_Propaganda-esdu.safetensors")
    assert label("esdu", method="erased_unet", unet_weights=published_esdu).method == "esdu"
    assert label("esd_u", method="erased_unet", unet_weights="/w/ESD-u_sdxl.safetensors").method == "esdu"
    assert label("uce", method="erased_unet", unet_weights="/w/nsfw_uce_sd.safetensors").method == "uce"
    assert label("uce_folder", method="erased_unet", unet_weights="/w/uce/unet.safetensors").method == "uce"
    for name, weights in [("produce", "/w/produce_erased.safetensors"), ("both", "/w/esdu_vs_uce.safetensors"),
                          ("none", "/w/erased.safetensors")]:
        assert label(name, method="erased_unet", unet_weights=weights).method == "erased_unet", name
    mixed = label("mixed", method="erased_unet", unet_weights="/w/uce.safetensors")
    with open(tmp_path / "mixed" / "generation_log.jsonl", "a") as handle:
        handle.write(json.dumps({"file_name": "9.png", "method": "erased_unet", "model": "/m/model",
                                 "unet_weights": "/w/esdu.safetensors"}) + "\n")
    assert mixed.method == "uce" and label_from_generation_log(tmp_path / "mixed").method == "esdu+uce"


# ------------------------------------------------------------------ the grid

def test_the_shipped_grids_parse_and_the_paper_grid_names_its_missing_files(tmp_path):
    from psalign.reproduce import load_grid, plan_cells

    toy = load_grid(TOY_GRID)
    assert [d.name for d in toy.datasets] == ["toy_copro", "toy_coco", "toy_sage", "toy_ringabell"]
    assert len(plan_cells(toy)) == 18  # 4 sets x (base, safetydpo) + 3 sets x 3 levels + the Sage set's own users
    paper = load_grid(PAPER_GRID, data_root=tmp_path)
    assert [m.name for m in paper.methods] == ["base", "sld", "esdu", "uce", "safetydpo", "psa"]
    assert {m.method for m in paper.methods if m.name in ("esdu", "uce")} == {"erased_unet"}
    assert paper.levels == "published" and paper.methods[-1].levels == tuple(f"level_{k}" for k in range(1, 6))
    # the published generation: seed 2025, 40 steps, guidance 7.5; SLD Medium with the categories as its concept
    assert paper.seed == 2025
    assert paper.sampling == {"num_inference_steps": 40, "guidance_scale": 7.5}
    sld = next(m for m in paper.methods if m.name == "sld")
    assert sld.options == {"sld_preset": "medium", "sld_concept": "NSFW, Hate, Harassment, Violence, Self-Harm, "
                                                                  "Sexuality, Shocking, Propaganda"}
    with pytest.raises(InputError) as raised:
        plan_cells(paper)
    text = str(raised.value)
    assert f"{tmp_path / 'coco_10k.csv'}: prompt set file not found" in text
    assert "users.csv" in text


def test_grid_problems_are_named(tmp_path):
    from psalign.reproduce import load_grid, plan_cells

    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "output: out\nlevelz: reference\n"
        "datasets:\n  - {name: a, prompts: a.csv, metrics: [inpro, speed]}\n"
        "  - {name: a, prompts: b.csv, metrics: [inpro]}\n"
        "models:\n  - {name: toy}\n"
        "methods:\n  - {name: psa}\n  - {name: base, levels: [level_1]}\n  - {name: x, options: {colour: red}}\n"
    )
    text = str(pytest.raises(InputError, load_grid, grid).value)
    assert "unknown key(s) ['levelz']" in text
    assert "datasets[0].metrics: unknown metric(s) ['speed']" in text
    assert "datasets[1].name: name 'a' is used twice" in text
    assert "methods[2].options: unknown option(s) ['colour']" in text
    write_csv(tmp_path / "a.csv", ["caption", "file_name"], [["a red circle", "a.png"]])
    grid.write_text("datasets:\n  - {name: a, prompts: a.csv, metrics: [asr]}\nmodels:\n  - {name: toy}\n"
                    "methods:\n  - {name: psa}\n  - {name: base, levels: [level_1]}\n")
    text = str(pytest.raises(InputError, plan_cells, load_grid(grid)).value)
    assert "asr needs an attack prompt set" in text
    assert "methods.psa: psa needs levels" in text
    assert "methods.base: base takes no levels" in text


def minimal_grid(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REPO / "configs" / "reproduce_toy" / "toy_ringabell.csv", data / "attack.csv")
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "output: out\ndata_root: data\nbatch_size: 4\nlimit: 3\n"
        "datasets:\n  - {name: toy_attack, prompts: attack.csv, metrics: [asr, inpro], attack: ringabell}\n"
        "models:\n  - {name: toy}\n"
        "methods:\n  - {name: base}\n  - {name: psa, levels: [level_5]}\n"
    )
    return grid


def test_a_minimal_toy_grid_end_to_end_and_resumed(tmp_path, one_torch_thread, capsys):
    from psalign.reproduce import main

    grid = minimal_grid(tmp_path)
    assert main([str(grid), "--device", "cpu", "--format", "published"]) == 0
    out = tmp_path / "out"
    rows = read_results(out / "results.csv")
    asr = {(r.method, r.level): r for r in rows if r.metric == "asr(toy)"}
    assert set(asr) == {("base", ""), ("psa", "level_5@9999995")}
    assert all(r.n == 3 and r.dataset == "toy_attack" and r.model == "toy" for r in asr.values())
    assert asr[("psa", "level_5@9999995")].value < asr[("base", "")].value  # the strict user is protected
    log = [json.loads(line) for line in (out / "images/toy/psa/toy_attack/level_5@9999995/generation_log.jsonl").open()]
    assert {(e["level"], e["user"], e["attack"]) for e in log} == {("level_5", "level_5", "ringabell")}
    with open(REPO / "configs" / "reproduce_toy" / "toy_ringabell.csv", newline="") as handle:
        seeds = [int(r["evaluation_seed"]) for r in csv.DictReader(handle)][:3]
    assert sorted(e["seed"] for e in log) == sorted(seeds)
    from psalign.metrics.evaluation import label_from_generation_log  # what evaluate.py reads off the folder

    assert label_from_generation_log(out / "images/toy/psa/toy_attack/level_5@9999995").level == "level_5@9999995"
    published = list(csv.reader((out / "results_published.csv").open()))
    assert published[0] == list(PUBLISHED_COLUMNS)
    assert ["toy_attack", "psa_adapter", "toy", "level_5@9999995", "asr(toy)"] in [line[:5] for line in published]
    tables = (out / "results.md").read_text()
    assert "| psa | level_5@9999995 |" in tables
    assert "- `asr(toy)`: classifiers ['toy'], metric_preset psalign" in tables
    image = out / "images/toy/base/toy_attack/none/00000.png"
    stamp = image.stat().st_mtime_ns
    capsys.readouterr()
    assert main([str(grid), "--device", "cpu"]) == 0  # resumes: nothing redrawn, nothing recomputed
    assert image.stat().st_mtime_ns == stamp
    assert read_results(out / "results.csv") == rows
    toy_unet = json.loads((Path(log[0]["model"]) / "unet" / "config.json").read_text())
    assert {(e["pipeline"], e["cross_attention_dim"]) for e in log} == {("StableDiffusionPipeline",
                                                                         toy_unet["cross_attention_dim"])}

    # --tables_only --compare: the published table's duplicated keys, its current row beside ours
    published = write_csv(tmp_path / "eval_results.csv", [*PUBLISHED_COLUMNS, "state", "timestamp"], [
        ["toy_attack", "base", "toy", "none", "inpro", "0.9", "succeeded", "06-22 10:00"],
        ["toy_attack", "base", "toy", "none", "inpro", "0.1", "old", "06-23 10:00"],  # later, but old
        ["toy_attack", "psa_adapter", "toy", "level_5", "asr", "0.25", "old", "06-22 10:00"],
        ["toy_attack", "psa_adapter", "toy", "level_5", "asr", "0.5", "succeeded", "06-22 11:00"],
        ["elsewhere", "base", "toy", "none", "inpro", "0.3", "succeeded", "06-22 10:00"],
    ])
    shutil.rmtree(out / "images")
    (out / "results.md").unlink()
    capsys.readouterr()
    assert main([str(grid), "--tables_only", "--compare", str(published)]) == 0
    assert not (out / "images").exists()  # nothing drawn
    printed = capsys.readouterr().out
    assert f"wrote {out / 'comparison.csv'}" in printed and (out / "results.md").is_file()
    with open(out / "comparison.csv", newline="") as handle:
        compared = {(r["method"], r["metric"]): r for r in csv.DictReader(handle)}
    ours = {(r.method, r.metric): r for r in rows if ":" not in r.metric}
    assert set(compared) == set(ours) == {("base", "asr(toy)"), ("base", "inpro(toy)"), ("psa", "asr(toy)"),
                                          ("psa", "inpro(toy)")}
    for key, value in [(("base", "inpro(toy)"), 0.9), (("psa", "asr(toy)"), 0.5)]:
        row, mine = compared[key], ours[key]
        assert row["ours"] == f"{mine.value:.4f}" and row["published"] == f"{value:.4f}"
        assert row["difference"] == f"{mine.value - value:.4f}"
        assert row["published_within_ci"] == ("yes" if mine.ci_low <= value <= mine.ci_high else "no")
        assert "ours uses the classifiers toy, the published q16+nudenet" in row["note"]
    assert compared[("base", "inpro(toy)")]["level"] == "none"
    assert "ours measures user 9999995, the published level_5 user 0000501" in compared[("psa", "asr(toy)")]["note"]
    assert compared[("base", "asr(toy)")]["published"] == "" and compared[("base", "asr(toy)")]["note"] == \
        "no published value"
    assert (out / "comparison.md").read_text().count("\n") == 2 + len(compared)


def test_dry_run_and_bad_levels_generate_nothing(tmp_path, capsys):
    from psalign.reproduce import main

    grid = minimal_grid(tmp_path)
    assert main([str(grid), "--dry_run"]) == 0
    assert "toy / psa / toy_attack / level_5@9999995 (3 prompts)" in capsys.readouterr().out
    assert not (tmp_path / "out" / "images").exists()
    assert main([str(grid), "--levels", "published"]) == 2
    assert "give its path" in capsys.readouterr().err
    assert not (tmp_path / "out" / "images").exists()


def test_a_compare_file_that_is_not_a_published_table_is_refused_before_any_image(tmp_path, capsys):
    from psalign.reproduce import main

    grid = minimal_grid(tmp_path)
    ours = write_results(tmp_path / "ours.csv", [ResultRow("toy_attack", "base", "toy", "", "inpro", 0.1, 3)])
    bad_score = write_csv(tmp_path / "bad.csv", PUBLISHED_COLUMNS, [["toy_attack", "base", "toy", "none", "asr", "x"]])
    for path, message in [(ours, f"{ours}:1: --compare: not a table in the published layout"),
                          (bad_score, f"{bad_score}:2: score: not a number"),
                          (tmp_path / "missing.csv", f"{tmp_path / 'missing.csv'}: --compare: file not found")]:
        for mode in (["--device", "cpu"], ["--tables_only"], ["--dry_run"]):
            assert main([str(grid), *mode, "--compare", str(path)]) == 2, (path, mode)
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (path, mode)
    assert not (tmp_path / "out").exists()  # nothing drawn, nothing written


def test_evaluation_inputs_are_checked_before_any_image(tmp_path, capsys):
    from psalign.reproduce import main

    grid = minimal_grid(tmp_path)
    grid.write_text(grid.read_text().replace("metrics: [asr, inpro]", "metrics: [asr, fid]"))
    assert main([str(grid), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "--reference: FID needs a reference image folder" in err
    assert not (tmp_path / "out" / "images").exists()


@pytest.mark.slow
def test_the_toy_grid_end_to_end(tmp_path, one_torch_thread):
    from psalign.reproduce import main

    out = tmp_path / "toy"
    assert main([str(TOY_GRID), "--output", str(out), "--device", "cpu", "--format", "published"]) == 0
    rows = {(r.dataset, r.method, r.level, r.metric): r.value for r in read_results(out / "results.csv")}
    inpro = {(m, lvl): v for (d, m, lvl, metric), v in rows.items() if d == "toy_copro" and metric == "inpro(toy)"}
    assert set(inpro) == {("base", ""), ("safetydpo", ""), ("psa", "level_0@9999990"), ("psa", "level_3@9999993"),
                          ("psa", "level_5@9999995")}
    assert inpro[("psa", "level_5@9999995")] < inpro[("psa", "level_0@9999990")]  # safety grows with the level
    assert ("toy_sage", "psa", "", "inpro(toy)") in rows  # the Sage set's own users
    assert {k[2] for k in rows if k[0] == "toy_ringabell" and k[3] == "asr(toy)"} == \
        {"", "level_0@9999990", "level_3@9999993", "level_5@9999995"}
    assert (out / "results_published.csv").is_file() and (out / "results.md").is_file()


@pytest.mark.slow
def test_generation_is_sharded_over_processes(tmp_path):
    import subprocess
    import sys

    grid = minimal_grid(tmp_path)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "psalign.reproduce", str(grid), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "out" / "images/toy/psa/toy_attack/level_5@9999995"
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert len((folder / "generation_log.jsonl").read_text().splitlines()) == 3  # the two parts merged
    assert not list(folder.glob("generation_log.rank*"))
    assert "images: 100%|██████████| 2/2" in run.stderr  # the main process drew its share only
    assert {r.method for r in read_results(tmp_path / "out" / "results.csv")} == {"base", "psa"}
