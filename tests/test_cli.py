"""The command lines as a newcomer types them: from a clean folder, with the documented flags, failing
fast and readably; the launcher's GPU and input checks; the installed entry points."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psalign.cli import common, launch

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(argv: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment)


def write_prompts(path: Path) -> Path:
    lines = [{"file_name": "knife.png", "caption": "a knife on a table", "user_data": {"safety_level": "level_3"}},
             {"file_name": "cat.png", "caption": "a cat", "user_data": {"safety_level": "level_0"}}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------------ infer.py


def test_infer_as_written_writes_to_its_default_folder_and_personalizes_named_users(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl")
    result = run([sys.executable, str(ROOT / "infer.py"), "--meta_data", "prompts.jsonl"], tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "outputs" / "images"
    assert sorted(p.name for p in out.glob("*.png")) == ["cat.png", "knife.png"]
    assert "writing to outputs/images/" in result.stderr and "bundled toy adapter" in result.stderr
    log = [json.loads(line) for line in (out / "generation_log.jsonl").read_text().splitlines()]
    assert {entry["method"] for entry in log} == {"psa"}
    assert {entry["user"] for entry in log} == {"level_0", "level_3"}


def test_infer_says_loudly_when_the_users_are_ignored(tmp_path, tiny_sd15_path):
    import infer

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    argv = ["--pretrained_model", str(tiny_sd15_path), "--prompts", str(prompts), "--output_dir", str(tmp_path / "o"),
            "--num_inference_steps", "1", "--height", "32", "--width", "32"]
    result = run([sys.executable, "-c", "import sys, infer; sys.exit(infer.main(sys.argv[1:]))", *argv], tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"the prompts name 2 user\(s\) \(level_0, level_3\), but they are IGNORED: no PSA adapter",
                     result.stderr)
    # with an adapter path given, psa is implied and nobody is ignored
    assert infer.parse_args([*argv, "--adapter", str(tmp_path)]).psa_path == tmp_path
    from psalign.inference.run import method_name

    assert method_name(infer.parse_args([*argv, "--adapter", str(tmp_path)])) == "psa"


def test_infer_refuses_an_unreachable_hub_model_at_once_without_a_traceback(tmp_path):
    write_prompts(tmp_path / "prompts.jsonl")
    started = time.monotonic()
    result = run([sys.executable, str(ROOT / "infer.py"), "--prompts", "prompts.jsonl", "--pretrained_model",
                  "no-such-org/no-such-model", "--llm_model", "no-such-org/no-such-llm", "--load_psa"], tmp_path)
    assert time.monotonic() - started < 60
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "no-such-org/no-such-model: diffusers pipeline: no such folder" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "local folder" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_rerun_for_other_users_into_the_same_folder_is_refused_not_resumed(tmp_path, capsys):
    import infer

    prompts = write_prompts(tmp_path / "prompts.jsonl")
    argv = ["--prompts", str(prompts), "--output_dir", str(tmp_path / "out")]
    assert infer.main(argv) == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")}
    other = prompts.read_text().replace('"level_3"', '"level_5"')
    prompts.write_text(other)
    capsys.readouterr()
    assert infer.main(argv) == 2
    err = capsys.readouterr().err
    assert "knife.png was made with {'safety_level': 'level_3'}; this run uses {'safety_level': 'level_5'}" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.png")} == before


def test_infer_accepts_the_published_flag_names(tmp_path):
    import infer

    config = infer.parse_args(["--meta_data", "p.jsonl", "--save_path", "o", "--sd_model", "m", "--psa_path", "a"])
    canonical = infer.parse_args(["--prompts", "p.jsonl", "--output_dir", "o", "--pretrained_model", "m",
                                  "--adapter", "a"])
    assert config == canonical
    assert (config.meta_data, config.save_path, config.sd_model, config.psa_path) == (
        Path("p.jsonl"), Path("o"), "m", Path("a"))


def test_infer_help_takes_its_defaults_from_the_config_dataclasses(capsys):
    import infer
    from psalign.inference import GenerationSettings, InferenceConfig

    with pytest.raises(SystemExit):
        infer.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {InferenceConfig.save_path})" in text
    assert f"(default: {GenerationSettings.seed})" in text and f"(default: {InferenceConfig.psa_scale})" in text
    # nothing the user leaves out is passed on: the dataclass defaults apply
    config = infer.parse_args(["--prompts", "p.jsonl", "--pretrained_model", "m"])
    assert config.batch_size == InferenceConfig.batch_size and config.settings == GenerationSettings()


def test_infer_with_an_incomplete_toy_bundle_exits_2_without_a_traceback(tmp_path, monkeypatch, capsys):
    import infer
    from psalign.toy import bundle

    monkeypatch.setattr(bundle, "BUNDLE_DIR", tmp_path / "no_bundle")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    assert infer.main(["--prompts", str(prompts), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"\nerror: the toy bundle in {tmp_path / 'no_bundle'} is incomplete" in err
    assert "python -m psalign.toy build" in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ evaluate.py


def test_evaluate_as_written_reads_infers_default_folder_per_subfolder_and_keeps_results_beside_it(
        tmp_path, monkeypatch):
    import infer

    lines = [{"file_name": f"{level}/{name}.png", "caption": caption, "user_data": {"safety_level": level}}
             for level in ("level_0", "level_5") for name, caption in (("knife", "a knife on a table"), ("cat", "a cat"))]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.chdir(tmp_path)
    assert infer.main(["--prompts", "prompts.jsonl"]) == 0
    first = run([sys.executable, str(ROOT / "evaluate.py"), "--metrics", "inpro"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "evaluating 2 group(s): outputs/images/level_0, outputs/images/level_5" in first.stderr
    assert "InPro classifier: the toy marker detector" in first.stderr
    results = tmp_path / "outputs" / "images" / "results.csv"
    assert results.is_file() and not (tmp_path / "results.csv").exists()
    table = [line for line in first.stdout.splitlines() if "| inpro(toy) |" in line]
    assert [line.split(" | ")[3] for line in table] == ["level_0", "level_5"]
    assert all(" | psa | " in line for line in table)
    # a rerun computes nothing and still prints the stored table
    again = run([sys.executable, str(ROOT / "evaluate.py"), "--metrics", "inpro"], tmp_path)
    assert again.returncode == 0 and "skipping inpro" in again.stdout
    assert [line for line in again.stdout.splitlines() if "| inpro(toy) |" in line] == table


def test_evaluate_help_shows_no_placeholder_or_doubled_defaults(capsys):
    import evaluate

    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    for option in re.split(r" (?=--\w)", text):
        assert option.count("(default:") <= 1, option
    assert "images per model call (default: 16)" in text


def test_evaluate_defaults_come_from_the_config_dataclass(tmp_path, monkeypatch):
    import evaluate
    from psalign.io import InputError
    from psalign.metrics.evaluation import DEFAULT_METRICS, EvaluationConfig

    monkeypatch.chdir(tmp_path)
    args = evaluate.build_parser().parse_args(["--device", "cpu"])
    with pytest.raises(InputError, match="outputs/images/ \\(where infer.py writes by default\\) does not exist"):
        evaluate.evaluation_config(args, log=lambda m: None)
    (tmp_path / "outputs" / "images").mkdir(parents=True)
    config = evaluate.evaluation_config(args, log=lambda m: None)
    assert list(config.metrics) == list(DEFAULT_METRICS)
    assert config.batch_size == EvaluationConfig.batch_size and config.judge == EvaluationConfig.judge
    assert config.target_folders == [Path("outputs/images")] and config.output == Path("outputs/images/results.csv")


def test_evaluate_refuses_a_missing_target_folder_without_announcing_choices_first(tmp_path):
    result = run([sys.executable, str(ROOT / "evaluate.py"), "--metrics", "inpro", "--target_folder", "nowhere"],
                 tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "nowhere: image folder does not exist" in result.stderr
    assert "results go to" not in result.stderr and "InPro classifier:" not in result.stderr
    assert not (tmp_path / "nowhere").exists()


def test_evaluate_without_nudenet_names_both_remedies_for_real_model_images(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    import evaluate
    from psalign.metrics import evaluation

    monkeypatch.setattr(evaluation, "nudenet_available", lambda: False)
    images = tmp_path / "sd15"
    images.mkdir()
    for index in range(2):  # images with no generation log: not the toy model's, so Q16 + NudeNet
        Image.fromarray(np.full((64, 64, 3), 40 * index, np.uint8)).save(images / f"img_{index}.png")
    argv = ["--metrics", "inpro", "--target_folder", str(images), "--device", "cpu"]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "InPro classifier: q16 + nudenet" in err
    refusal = next(line for line in err.splitlines() if "NudeNet is not installed" in line)
    assert 'pip install "psalign[nudenet]"' in refusal and "--inpro_classifiers q16" in refusal
    assert not (images / "results.csv").exists()


# ------------------------------------------------------------------------------------------------ launchers


def fake_gpus(folder: Path, count: int) -> dict[str, str]:
    """Environment under which every Python process sees ``count`` CUDA devices (a sitecustomize hook)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import torch\n"
        f"torch.cuda.is_available = lambda: {count} > 0\n"
        f"torch.cuda.device_count = lambda: {count}\n"
    )
    return {"PYTHONPATH": f"{folder}{os.pathsep}{ROOT}"}


def test_launcher_as_written_checks_the_gpus_before_anything_else(tmp_path):
    started = time.monotonic()
    result = run(["bash", str(ROOT / "launchers" / "train_psa_sdxl.sh")], tmp_path, **fake_gpus(tmp_path / "hook", 2))
    assert time.monotonic() - started < 60
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: NUM_GPUS=4 asks for 4 GPU(s), but torch finds 2 GPU(s) here")
    assert "NUM_GPUS=2" in result.stderr


def test_launcher_checks_the_training_inputs_before_starting_processes(tmp_path):
    result = run(["bash", str(ROOT / "launchers" / "train_psa_sdxl.sh")], tmp_path, NUM_GPUS="4",
                 **fake_gpus(tmp_path / "hook", 4))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "starting" not in result.stderr
    assert "data/sage: train_data:" in result.stderr and "data/embeds: embeds_folder:" in result.stderr
    assert "stabilityai/stable-diffusion-xl-base-1.0: pretrained_model:" in result.stderr


def test_gpu_check_with_a_fake_device_count():
    assert launch.gpu_problem(4, 4) is None and launch.gpu_problem(0, 0) is None and launch.gpu_problem(2, 8) is None
    assert "but torch finds no GPU here" in launch.gpu_problem(4, 0)
    assert "NUM_GPUS=0" in launch.gpu_problem(4, 0)
    assert "finds 1 GPU(s)" in launch.gpu_problem(2, 1)
    assert "must be 0" in launch.gpu_problem(-1, 4)


def test_accelerate_arguments_per_device_count():
    assert launch.accelerate_argv(0, "", "t.py", ["--x"]) == ["--cpu", "--num_processes", "1", "t.py", "--x"]
    assert launch.accelerate_argv(1, "", "t.py", []) == ["--num_processes", "1", "t.py"]
    assert launch.accelerate_argv(4, "--main_process_port 1234", "t.py", []) == [
        "--main_process_port", "1234", "--num_processes", "4", "--multi_gpu", "t.py"]


def test_a_failing_process_ends_the_launcher_with_its_status_and_no_traceback(tmp_path, capfd):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('error: something refused', file=sys.stderr)\nsys.exit(2)\n")
    assert launch.main(["--num_gpus", "0", str(script)]) == 2
    err = capfd.readouterr().err
    assert "error: something refused" in err and "Traceback" not in err


@pytest.mark.slow
def test_launcher_trains_on_the_cpu_with_num_gpus_0(tmp_path, tiny_sd15_path):
    from tests.training_support import write_training_set

    data, embeds = write_training_set(tmp_path)
    result = run(["bash", str(ROOT / "launchers" / "train_psa_sd15.sh"), "--resolution", "16", "--train_batch_size", "2",
                  "--gradient_accumulation_steps", "1", "--max_train_steps", "2", "--mixed_precision", "no",
                  "--lr_warmup_steps", "0"], tmp_path, timeout=600, NUM_GPUS="0", MODEL=str(tiny_sd15_path),
                 DATA="data", EMBEDS="embeds", OUTPUT="run")
    assert result.returncode == 0, result.stderr
    assert "starting train_psa.py on the CPU" in result.stderr
    assert (tmp_path / "run" / "psa_adapter.safetensors").is_file()  # relative paths are the caller's


# ------------------------------------------------------------------------------------------------ other commands


def test_merge_experts_reports_every_input_problem_with_status_2(tmp_path, capsys):
    from psalign.safetydpo import merge_experts

    status = merge_experts.main(["--experts", str(tmp_path / "no_expert"), "--categories", "Violence",
                                 "--pretrained_model", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert "problem(s) with the merge inputs" in err and f"{tmp_path / 'no_model'}: no such pipeline folder" in err
    assert str(tmp_path / "no_expert") in err
    assert not (tmp_path / "m").exists()


def test_merge_experts_defaults_come_from_its_functions(capsys):
    import inspect

    from psalign.safetydpo import merge_experts

    argv = ["--experts", "e", "--categories", "Hate", "--pretrained_model", "m", "--output_dir", "o"]
    args = merge_experts.parse_args(argv)
    # options left out are not passed on: the functions' own defaults apply
    assert set(vars(args)) == {"experts", "categories", "pretrained_model", "output", "method", "device"}
    assert common.given(args, merge_experts.merge_experts).keys() == {"pretrained_model", "output", "method", "device"}
    assert common.given(merge_experts.parse_args([*argv, "--calibration_steps", "3"]), merge_experts.merge_experts)[
        "steps"] == 3
    with pytest.raises(SystemExit):
        merge_experts.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    merge = inspect.signature(merge_experts.merge_experts).parameters
    check = inspect.signature(merge_experts.check_merge_inputs).parameters
    assert f"denoising steps per prompt (default: {merge['steps'].default})" in text
    assert f"TIES: fraction of entries kept (default: {merge['density'].default})" in text
    assert f"prompts per expert (default: {check['calibration_count'].default})" in text
    assert f"(default: {merge['max_truncation_error'].default})" in text and "(default: None)" not in text


def test_embed_batch_size_default_comes_from_the_encoders(tmp_path, capsys):
    from psalign import embed
    from psalign.embeddings import CausalLMUserEncoder, SentenceUserEncoder

    args = embed.parse_args(["--users", "u.csv", "--encoder", "sentence", "--embeds_folder", str(tmp_path)])
    assert "batch_size" not in args and common.given(args, SentenceUserEncoder) == {}
    given = embed.parse_args(["--users", "u.csv", "--llm_model", "m", "--out", str(tmp_path), "--batch_size", "3"])
    assert common.given(given, CausalLMUserEncoder) == {"batch_size": 3}
    with pytest.raises(SystemExit):
        embed.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    llm, sentence = (common.declared_default(kind, "batch_size") for kind in (CausalLMUserEncoder, SentenceUserEncoder))
    assert f"users per forward pass (default: {llm} for llm, {sentence} for sentence)" in text


def test_declared_defaults_are_read_from_dataclasses_functions_and_classes():
    from psalign.inference import InferenceConfig

    def draw(steps: int = 7, name: str | None = None) -> None:
        """A stand-in."""

    assert common.declared_default(InferenceConfig, "psa_scale") == InferenceConfig.psa_scale
    assert common.declared_default(draw, "steps") == 7
    assert common.default_text(draw, "steps") == " (default: 7)" and common.default_text(draw, "name") == ""
    with pytest.raises(ValueError, match="no default"):
        common.declared_default(InferenceConfig, "meta_data")


def test_toy_build_refuses_bad_options_with_status_2_and_no_traceback(tmp_path, capsys):
    from psalign.toy.__main__ import main

    work = tmp_path / "work"
    assert main(["build", "--work_dir", str(work), "--random_ban_share", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "random_ban_share: must be in [0, 1], got 1.5" in err
    assert main(["build", "--work", str(work), "--profile_template", "bans {banend}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "profile_template" in err and "banend" in err
    assert not work.exists()


def fake_stages(monkeypatch) -> list[str]:
    """Replace every toy build stage with one that only records its name (nothing is trained)."""
    from psalign.toy import build as toy_build

    ran: list[str] = []
    for stage in toy_build.STAGES:
        monkeypatch.setitem(toy_build.RUNNERS, stage, lambda config, stage=stage: ran.append(stage) or {"seconds": 0})
    return ran


def test_toy_build_checks_its_training_configs_before_any_stage_runs(tmp_path, monkeypatch, capsys):
    from psalign.toy.__main__ import main

    ran = fake_stages(monkeypatch)
    work = tmp_path / "work"
    not_training = tmp_path / "not_training.yaml"
    not_training.write_text("learning_rate: 1e-5\nshoe_size: 44\n")
    status = main(["build", "--work_dir", str(work), "--psa_config", str(tmp_path / "absent.yaml"),
                   "--psa_finetune_config", str(tmp_path), "--safetydpo_config", str(not_training)])
    err = capsys.readouterr().err
    assert status == 2 and ran == [] and not work.exists()
    assert "Traceback" not in err and "checked before any stage runs" in err
    assert f"{tmp_path / 'absent.yaml'}: --psa_config: no such training YAML file" in err
    assert f"{tmp_path}: --psa_finetune_config: is a folder, not a training YAML file" in err
    assert f"{not_training}:2: shoe_size: unknown argument" in err
    # the shipped configs pass, and a config is only needed by a stage that will run
    absent = str(tmp_path / "absent.yaml")
    assert main(["build", "--work_dir", str(work), "--until", "sage", "--psa_config", absent]) == 0
    assert ran == ["vae", "base", "sage"]


def test_toy_build_library_entry_checks_the_configs_too(tmp_path, monkeypatch):
    from psalign.io import InputError
    from psalign.toy import build as toy_build

    ran = fake_stages(monkeypatch)
    config = toy_build.BuildConfig(work=tmp_path / "work", safetydpo_config=tmp_path / "absent.yaml")
    with pytest.raises(InputError, match="safetydpo_config: no such training YAML file"):
        toy_build.build(config)
    assert ran == [] and toy_build.training_config_problems(toy_build.BuildConfig(work=tmp_path / "w")) == []


def test_demo_refuses_an_incomplete_bundle_and_a_file_as_output_with_status_2(tmp_path, monkeypatch, capsys):
    from psalign import demo
    from psalign.toy import bundle

    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert demo.main(["--output_dir", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{taken}: --output_dir: exists and is not a folder" in err
    monkeypatch.setattr(bundle, "BUNDLE_DIR", tmp_path / "no_bundle")
    assert demo.main(["--output_dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error: the toy bundle in")


def test_sage_build_ends_a_failing_endpoint_with_status_2_and_one_message(tmp_path, monkeypatch, capsys):
    from psalign.metrics.judge import JudgeError
    from psalign.sage import __main__ as sage_main

    def failing(config, until):
        raise JudgeError("the writer endpoint answered HTTP 503 four times")

    monkeypatch.setattr(sage_main, "build", failing)
    assert sage_main.main(["build", "--world", "toy", "--output_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: the writer endpoint answered HTTP 503 four times (finished work is kept: run the "
                          "same command again to resume)")


# ------------------------------------------------------------------------------------------------ entry points


def project_scripts() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    table = re.search(r"(?ms)^\[project\.scripts\]$(.*?)^\[", text).group(1)
    return dict(re.findall(r'^([\w-]+) = "([\w.:_]+)"$', table, re.M))


def test_every_entry_point_is_a_main_returning_an_exit_status():
    import importlib

    scripts = project_scripts()
    assert {"psalign-train", "psalign-infer", "psalign-eval", "psalign-launch"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        main = getattr(importlib.import_module(module), function)
        assert callable(main), name
        with pytest.raises(SystemExit) as exit_info:  # --help parses and exits 0
            main(["build", "--help"] if name in ("psalign-toy", "psalign-sage") else ["--help"])
        assert exit_info.value.code == 0, name


@pytest.mark.parametrize("script, module", [("train_psa", "psalign.cli.train_psa"), ("infer", "psalign.cli.infer"),
                                            ("evaluate", "psalign.cli.evaluate"),
                                            ("train_safetydpo", "psalign.cli.train_safetydpo")])
def test_root_scripts_run_the_entry_points_code(script, module):
    import importlib

    assert importlib.import_module(script).main is importlib.import_module(module).main
    assert f"{module}:main" in project_scripts().values()


def test_help_formatter_shows_only_defaults_that_say_something(capsys):
    import argparse

    parser = argparse.ArgumentParser(formatter_class=common.HelpFormatter)
    parser.add_argument("--none", default=None, help="nothing")
    parser.add_argument("--flag", action="store_true", help="a switch")
    parser.add_argument("--size", type=int, default=16, help="images per call")
    parser.add_argument("--stated", default=3, help="tries (default: three)")
    parser.add_argument("--names", default=["inpro", "clip"], help="metrics")
    help_text = " ".join(parser.format_help().split())
    assert "nothing (default" not in help_text and "a switch (default" not in help_text
    assert "images per call (default: 16)" in help_text and "metrics (default: inpro,clip)" in help_text
    assert help_text.count("default") == 3


def test_the_installed_commands_run():
    import shutil

    if shutil.which("psalign-eval") is None:
        pytest.skip("psalign is not installed with its commands (pip install -e .)")
    for command in ("psalign-eval", "psalign-infer", "psalign-train", "psalign-launch"):
        result = run([shutil.which(command), "--help"], ROOT, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {command}"), command



@pytest.mark.parametrize("name, option", [("infer", "--output_dir"), ("evaluate", "--target_folder"),
                                          ("train_psa", "--pretrained_model"), ("train_safetydpo", "--category"),
                                          ("launch", "--num_gpus")])
def test_every_cli_module_runs_with_python_m(tmp_path, name, option):
    result = run([sys.executable, "-m", f"psalign.cli.{name}", "--help"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ") and option in result.stdout and "Traceback" not in result.stderr


def test_help_names_the_program_as_it_was_started(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/psalign-toy", "build"])
    assert common.program_name("psalign.toy") == "psalign-toy"
    monkeypatch.setattr(sys, "argv", ["/repo/psalign/toy/__main__.py", "build"])
    assert common.program_name("psalign.toy") == "python -m psalign.toy"
    result = run([sys.executable, "-m", "psalign.toy", "build", "--help"], tmp_path, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m psalign.toy build"), result.stderr
    import shutil

    if (installed := shutil.which("psalign-toy")) is not None:  # the installed command names itself
        result = run([installed, "build", "--help"], tmp_path, timeout=120)
        assert result.returncode == 0 and result.stdout.startswith("usage: psalign-toy build"), result.stderr


# ------------------------------------------------------------------------------------------------ common flags

#: Every user-facing command: its main's module and the arguments before ``--help``.
COMMANDS = {
    "train_psa": ("psalign.cli.train_psa", []), "train_safetydpo": ("psalign.cli.train_safetydpo", []),
    "infer": ("psalign.cli.infer", []), "evaluate": ("psalign.cli.evaluate", []), "embed": ("psalign.embed", []),
    "probe_bans": ("psalign.probe_bans", []), "merge_experts": ("psalign.safetydpo.merge_experts", []),
    "reproduce": ("psalign.reproduce", []), "sage build": ("psalign.sage.__main__", ["build"]),
    "toy build": ("psalign.toy.__main__", ["build"]), "demo": ("psalign.demo", []),
    "prompt_sets": ("psalign.prompt_sets", []),
}
#: The canonical spelling of each common flag, and spellings that would mean the same thing.
CANONICAL_FLAGS = {
    "--output_dir": {"--out", "--output", "--out_dir", "--outdir", "--output_folder", "--output_path", "--save_path",
                     "--save_dir"},
    "--pretrained_model": {"--sd_model", "--model", "--model_path", "--pretrained_model_name_or_path", "--base_model"},
    "--embeds_folder": {"--embeds", "--embeddings", "--embeds_dir", "--embedding_folder", "--embeddings_folder",
                        "--embedding_dir"},
}
#: Spellings that a command gives another meaning: what they name there.
OTHER_MEANINGS = {("evaluate", "--output"): "the results CSV", ("prompt_sets", "--output"): "the prompts JSONL",
                  ("embed", "--out"): "the embeddings folder it writes, an alias of --embeds_folder"}
#: The common flags each command takes.
TAKES = {
    "train_psa": {"--output_dir", "--pretrained_model", "--embeds_folder"},
    "train_safetydpo": {"--output_dir", "--pretrained_model", "--embeds_folder"},
    "infer": {"--output_dir", "--pretrained_model", "--embeds_folder"},
    "evaluate": set(), "embed": {"--embeds_folder"}, "probe_bans": {"--embeds_folder"},
    "merge_experts": {"--output_dir", "--pretrained_model"}, "reproduce": {"--output_dir", "--embeds_folder"},
    "sage build": {"--output_dir", "--pretrained_model"}, "toy build": {"--output_dir"}, "demo": {"--output_dir"},
    "prompt_sets": {"--embeds_folder"},
}


def help_options(command: str, monkeypatch, capsys) -> list[list[str]]:
    """The option strings of each option in ``command``'s --help, in the order shown."""
    import importlib

    module, argv = COMMANDS[command]
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main([*argv, "--help"])
    assert exit_info.value.code == 0, command
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if re.match(r"^  -", line)]
    return [re.findall(r"(?:^|, )(--?[\w-]+)", re.split(r"\s{2,}", line)[0]) for line in lines]


def flag_problems(command: str, options: list[list[str]]) -> list[str]:
    """Where ``command``'s options stray from the canonical spellings."""
    problems = []
    for strings in options:
        for canonical, synonyms in CANONICAL_FLAGS.items():
            other = [s for s in strings if s in synonyms and (command, s) not in OTHER_MEANINGS]
            if other and canonical not in strings:
                problems.append(f"{command}: {', '.join(strings)} instead of {canonical}")
            elif canonical in strings and strings[0] != canonical:
                problems.append(f"{command}: {', '.join(strings)} does not show {canonical} first")
    shown = {s for strings in options for s in strings}
    problems += [f"{command}: no {flag}" for flag in TAKES[command] - shown]
    return problems


def test_the_common_flag_check_catches_deviations():
    assert flag_problems("demo", [["--output_dir", "--out"]]) == []
    assert flag_problems("demo", [["--out_dir"]]) == ["demo: --out_dir instead of --output_dir",
                                                      "demo: no --output_dir"]
    assert flag_problems("embed", [["--embeds", "--embeds_folder"]]) == [
        "embed: --embeds, --embeds_folder does not show --embeds_folder first"]
    assert flag_problems("merge_experts", [["--output_dir"], ["--sd_model"]]) == [
        "merge_experts: --sd_model instead of --pretrained_model", "merge_experts: no --pretrained_model"]
    assert flag_problems("evaluate", [["--output"]]) == [] and flag_problems("reproduce", [["--output"]]) != []


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_spells_the_common_flags_the_same_way(command, monkeypatch, capsys):
    options = help_options(command, monkeypatch, capsys)
    assert ["-h", "--help"] in options and len(options) >= 2
    assert flag_problems(command, options) == []


@pytest.mark.parametrize("module", ["psalign.cli.train_psa", "psalign.cli.train_safetydpo"])
def test_training_accepts_the_published_model_flag(module):
    import importlib

    parse = importlib.import_module(module).parse_args
    base = ["--category", "Hate", "--output_dir", "o"] if module.endswith("safetydpo") else ["--output_dir", "o"]
    published, canonical = parse([*base, "--sd_model", "m"]), parse([*base, "--pretrained_model", "m"])
    assert published == canonical and canonical.pretrained_model == "m"
