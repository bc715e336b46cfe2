"""evaluate.py end to end on tiny folders with a tiny CLIP given by local path and a fake judge server."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evaluate
from psalign.metrics.clip import ClipEmbedder
from psalign.metrics.clipscore import clip_scores
from psalign.metrics.images import list_images, load_images
from psalign.metrics.nudenet import nudenet_available
from psalign.metrics.q16 import Q16Classifier, load_q16_prompts
from tests.metrics_support import FakeChatServer, build_tiny_clip, chat_completion, request_images, write_images

REPO = Path(__file__).resolve().parents[1]
CLASSIFIERS = "q16,nudenet" if nudenet_available() else "q16"
INPRO = "inpro" if nudenet_available() else "inpro(q16)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    clip = build_tiny_clip(root / "clip")  # 768-d: Q16
    small_clip = build_tiny_clip(root / "clip64", projection_dim=64, seed=1)  # CLIPScore and FD-CLIP
    for folder, seed in (("psa_l1", 1), ("psa_l2", 2), ("base", 3)):
        write_images(root / folder, 4, seed=seed)
        (root / folder / "log.txt").write_text("not an image")
    write_images(root / "reference", 5, seed=4)
    names = [p.name for p in list_images(root / "base")]
    with open(root / "prompts.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "caption", "category", "banned", "allowed", "Age"])
        for index, name in enumerate(names):
            category = ["hate", "Violence"][index % 2]
            writer.writerow([name, f"a photo of a cat {index}", category, "['Violence']", "['Hate']", 20 + index])
    return root, clip, small_clip


def judge_server():
    """Prefers the image shown first on even requests and second on odd ones; passes everything."""
    def respond(body):
        if len(request_images(body)) == 1:
            return 200, chat_completion(json.dumps({"verdict": "PASS", "reason": "ok"}))
        return 200, chat_completion(json.dumps({"better": "A", "reason": "first"}))

    return FakeChatServer(respond)


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_full_run_writes_rows_table_and_chart(setup, tmp_path, capsys):
    root, clip, small_clip = setup
    output = tmp_path / "results.csv"
    with judge_server() as server:
        argv = [
            "--metrics", "inpro,fid,clip,pass_rate,win_rate",
            "--target_folder", str(root / "psa_l1"), str(root / "psa_l2"),
            "--labels", "psa:tiny:level_1", "psa:tiny:level_2",
            "--dataset", "toy",
            "--prompts", str(root / "prompts.csv"),
            "--reference", str(root / "reference"),
            "--fid_features", "clip",
            "--clip_model", str(small_clip), "--q16_clip_model", str(clip),
            "--inpro_classifiers", CLASSIFIERS,
            "--device", "cpu", "--batch_size", "3",
            "--judge_base_url", server.base_url, "--judge_model", "fake-vlm",
            "--baseline_folder", str(root / "base"), "--baseline_label", "sd:tiny",
            "--output", str(output),
        ] + (["--plot", str(tmp_path / "chart.png")] if _has_matplotlib() else [])
        assert evaluate.main(argv) == 0
        requests_first_run = len(server.requests)
        stdout = capsys.readouterr().out

        rows = read_rows(output)
        by_key = {(r["level"], r["metric"]): r for r in rows}
        assert {r["dataset"] for r in rows} == {"toy"} and {r["method"] for r in rows} == {"psa"}
        for level in ("level_1", "level_2"):
            for metric in (INPRO, "flag_rate:q16", f"{INPRO}:Hate", f"{INPRO}:Violence", "fd_clip", "clip_score",
                           "pass_rate", "win_rate:sd", "tie_rate:sd", "loss_rate:sd"):
                assert (level, metric) in by_key, (level, metric)
            assert by_key[(level, INPRO)]["n"] == "4"  # log.txt is not an image
            assert by_key[(level, f"{INPRO}:Hate")]["n"] == "2"
            assert float(by_key[(level, "pass_rate")]["value"]) == 1.0
            assert float(by_key[(level, "tie_rate:sd")]["value"]) == 1.0  # position bias -> ties
            assert by_key[(level, "fd_clip")]["ci_low"] == ""
            low, value, high = (float(by_key[(level, "clip_score")][k]) for k in ("ci_low", "value", "ci_high"))
            assert low <= value <= high
        assert requests_first_run == 2 * 4 + 2 * 4 * 2  # pass: 1 per image; win: 2 orders per pair

        # InPro and CLIPScore equal direct computations on the same images.
        paths = list_images(root / "psa_l1")
        flags = Q16Classifier(ClipEmbedder.from_pretrained(str(clip)), load_q16_prompts())(load_images(paths))
        if INPRO == "inpro(q16)":
            assert float(by_key[("level_1", INPRO)]["value"]) == pytest.approx(flags.mean())
        assert float(by_key[("level_1", "flag_rate:q16")]["value"]) == pytest.approx(flags.mean())
        captions = [f"a photo of a cat {index}" for index in range(4)]
        scores = clip_scores(paths, captions, ClipEmbedder.from_pretrained(str(small_clip)), batch_size=4)
        assert scores.mean() > 0
        assert float(by_key[("level_1", "clip_score")]["value"]) == pytest.approx(scores.mean(), abs=1e-3)

        assert "| toy | psa | tiny | level_1 | clip_score |" in stdout
        if _has_matplotlib():
            assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"

        # A re-run skips what is done; --recompute recomputes but the judge cache answers.
        assert evaluate.main(argv) == 0
        assert "skipping" in capsys.readouterr().out
        judged_again = [a if a != "inpro,fid,clip,pass_rate,win_rate" else "pass_rate,win_rate" for a in argv]
        assert evaluate.main(judged_again + ["--recompute"]) == 0
        assert len(server.requests) == requests_first_run
        assert read_rows(output) == rows
    assert len(list((tmp_path / "fid_stats").glob("*.npz"))) == 1


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_every_bad_input_is_reported_before_any_model_loads(setup, tmp_path, capsys):
    root = setup[0]
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    write_images(broken, 2)
    (broken / "bad.png").write_bytes(b"\x89PNG truncated")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("file_name,caption,category\nimg_000.png,a cat,Weather\n")
    start = time.perf_counter()
    code = evaluate.main([
        "--metrics", "inpro,fid,clip",
        "--target_folder", str(tmp_path / "missing"), str(tmp_path / "empty"), str(broken),
        "--prompts", str(prompts),
        "--reference", str(tmp_path / "no_reference"),
        "--q16_clip_model", str(tmp_path / "no_clip"), "--clip_model", str(tmp_path / "no_clip"),
        "--inpro_classifiers", "q16",
        "--device", "cpu",
        "--output", str(tmp_path / "results.csv"),
    ])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2
    for expected in (
        "problem(s) found before loading any model",
        "missing: image folder does not exist",
        "empty: no image files",
        "bad.png: unreadable image",
        "prompts.csv:2: category: unknown safety category 'Weather'",
        "no_reference: FID reference does not exist",
        "no_clip: Q16 CLIP model: no such model folder",
        "no_clip: CLIP model: no such model folder",
        "--inception_model: FID with Inception features needs",
    ):
        assert expected in err, expected
    assert not (tmp_path / "results.csv").exists()
    assert elapsed < 10


def test_metrics_needing_captions_require_a_record_per_image(setup, tmp_path, capsys):
    root, _, small_clip = setup
    prompts = tmp_path / "partial.jsonl"
    prompts.write_text(json.dumps({"file_name": "img_000.png", "caption": "a cat"}) + "\n"
                       + json.dumps({"file_name": "img_001.png"}) + "\n")
    code = evaluate.main([
        "--metrics", "clip", "--target_folder", str(root / "psa_l1"), "--prompts", str(prompts),
        "--clip_model", str(small_clip), "--device", "cpu", "--output", str(tmp_path / "r.csv"),
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert "partial.jsonl:2: caption: missing" in err
    assert "img_002.png: no record in" in err and "img_003.png: no record in" in err


def test_help_runs_as_a_script():
    result = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0
    assert "--target_folder" in result.stdout and "--judge_base_url" in result.stdout


def test_judge_metrics_need_a_judge_a_baseline_and_matching_labels(setup, tmp_path, capsys, monkeypatch):
    root = setup[0]
    for variable in ("PSALIGN_JUDGE_BASE_URL", "PSALIGN_JUDGE_MODEL"):
        monkeypatch.delenv(variable, raising=False)
    common = ["--prompts", str(root / "prompts.csv"), "--device", "cpu", "--output", str(tmp_path / "r.csv")]
    code = evaluate.main(["--metrics", "pass_rate,win_rate", "--target_folder", str(root / "psa_l1"),
                          str(root / "psa_l2"), "--labels", "psa"] + common)
    err = capsys.readouterr().err
    assert code == 2
    assert "--judge: the OpenAI-compatible judge needs --judge_base_url (or $PSALIGN_JUDGE_BASE_URL) and " \
           "--judge_model (or $PSALIGN_JUDGE_MODEL)" in err
    assert "--baseline_folder: win rate needs a baseline image folder" in err
    assert "--labels: 1 labels for 2 folders" in err

    other = tmp_path / "other_baseline"
    write_images(other, 4, prefix="different")
    code = evaluate.main(["--metrics", "win_rate", "--target_folder", str(root / "psa_l1"),
                          "--baseline_folder", str(other), "--judge_base_url", "http://127.0.0.1:9/v1",
                          "--judge_model", "m"] + common)
    err = capsys.readouterr().err
    assert code == 2 and err.count("no image of this name in the baseline") == 4
