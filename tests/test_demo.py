"""The README's main command runs offline with the bundled toy model and writes images plus a contact sheet."""

import json

from PIL import Image

from psalign import demo
from psalign.toy.render import render
from psalign.toy.world import ToyObject


def test_demo_writes_images_a_contact_sheet_and_what_the_detector_sees(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path)]) == 0
    sheet = tmp_path / "contact_sheet.png"
    images = sorted((tmp_path / "images").rglob("*.png"))
    assert len(images) == len(demo.DEMO_LEVELS) * len(demo.DEMO_PROMPTS)
    width, height = Image.open(sheet).size
    assert width >= 128 * len(demo.DEMO_PROMPTS) and height >= 128 * len(demo.DEMO_LEVELS)
    printed = capsys.readouterr().out
    unsafe = sum(" with " in caption for caption in demo.DEMO_PROMPTS)
    assert printed.count(" marker (") == unsafe * len(demo.DEMO_LEVELS)
    assert "(banned)" in printed and "(allowed)" in printed and str(sheet) in printed
    # the bundled adapter keeps the promise in every cell: banned markers removed cleanly, allowed ones drawn
    assert printed.count(", as wanted") == len(demo.DEMO_LEVELS) * len(demo.DEMO_PROMPTS)
    assert "NOT as wanted" not in printed
    # a column of the sheet is one prompt drawn from one seed for every user
    log = [json.loads(line) for line in (tmp_path / "images" / "generation_log.jsonl").read_text().splitlines()]
    seeds = {(e["file_name"].split("/")[1], e["user"]): e["seed"] for e in log}
    for p in range(len(demo.DEMO_PROMPTS)):
        column = {seeds[f"prompt_{p}.png", level] for level in demo.DEMO_LEVELS}
        assert len(column) == 1, column
    assert len(set(seeds.values())) == len(demo.DEMO_PROMPTS)
    # running it again resumes: nothing is regenerated
    before = {p: p.stat().st_mtime_ns for p in images}
    demo.main(["--out", str(tmp_path)])
    assert {p: p.stat().st_mtime_ns for p in images} == before


def test_evaluate_scores_the_demos_output_folder_per_user(tmp_path, monkeypatch, capsys):
    import evaluate

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--output_dir", "demo_out"]) == 0
    capsys.readouterr()
    assert evaluate.main(["--target_folder", "demo_out"]) == 0
    captured = capsys.readouterr()
    groups = ", ".join(f"demo_out/images/{level}" for level in demo.DEMO_LEVELS)
    assert f"evaluating {len(demo.DEMO_LEVELS)} group(s): {groups}" in captured.err
    assert "the toy marker detector" in captured.err
    table = [line for line in captured.out.splitlines() if "| inpro(toy) |" in line]
    assert [line.split(" | ")[3] for line in table] == list(demo.DEMO_LEVELS)
    assert (tmp_path / "demo_out" / "results.csv").is_file() and not (tmp_path / "results.csv").exists()


def test_verdict_tells_drawn_removed_cleanly_replaced_and_blob():
    import numpy as np

    from psalign.toy.detect import detect
    from psalign.toy.render import MARKER_BOX

    square = ToyObject("red", "square")
    caption = square.caption("a fierce clash")  # a Violence concept
    blob = np.asarray(render(square)).copy()
    top, left, _ = MARKER_BOX
    blob[top + 2 : top + 6, left + 2 : left + 6] = (40, 20, 20)
    cases = {
        "drawn": render(square, "Violence"),
        "removed cleanly": render(square),
        "replaced by Propaganda": render(square, "Propaganda"),
        "blob": Image.fromarray(blob),
    }
    for words, image in cases.items():
        assert demo.verdict(detect(image), caption, ("Violence",)) == (words, words == "removed cleanly")
        assert demo.verdict(detect(image), caption, ()) == (words, words == "drawn")
    assert demo.describe(render(square), caption, ("Violence",)) == "Violence marker (banned): removed cleanly, as wanted"
    assert demo.describe(render(square), caption, ()) == "Violence marker (allowed): removed cleanly, NOT as wanted"
    assert demo.verdict(detect(render(square, "Hate")), square.caption(), ()) == ("drew Hate", False)
    assert demo.verdict(detect(render(square)), square.caption(), ()) == ("no marker", True)
