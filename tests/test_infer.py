"""infer.py: validation, seeds, resume, batching, multi-process sharding, base equivalence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import infer
from psalign.adapter import PSAAdapter
from psalign.embeddings import save_user_embedding
from psalign.inference import sample_seed
from psalign.levels import reference_user
from psalign.testing import build_tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
USER_DIM = 32  # the tiny causal LM's hidden size, so profile users can be embedded too


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sd15_path):
    """A random adapter for the tiny SD1.5 pipeline and an embeddings folder with two users and the levels."""
    root = tmp_path_factory.mktemp("infer")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet")
    adapter = PSAAdapter.for_unet(unet, USER_DIM)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    adapter.save_pretrained(root / "adapter")
    rng = np.random.default_rng(0)
    for user_id in ["0000001", "0000002"] + [reference_user(f"level_{k}").user_id for k in range(6)]:
        save_user_embedding(root / "embeds", user_id, rng.normal(size=USER_DIM).astype(np.float32))
    return {"model": tiny_sd15_path, "adapter": root / "adapter", "embeds": root / "embeds"}


def write_prompts(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


PROMPTS = [
    {"file_name": "a.png", "caption": "a cat", "user_data": {"User_ID": "0000001"}},
    {"file_name": "b.png", "caption": "a man holding a rifle", "user_data": {"User_ID": "0000002"}},
    {"file_name": "sub/c.png", "caption": "a cat", "user_data": {"user_id": "123", "safety_level": "strict"}},
    {"file_name": "d.png", "caption": "a red circle", "user_data": {"safety_level": "level_2"}},
]


def args(setup, prompts: Path, out: Path, *extra) -> list[str]:
    return [
        "--sd_model", str(setup["model"]), "--psa_path", str(setup["adapter"]), "--load_psa",
        "--embeds_folder", str(setup["embeds"]), "--meta_data", str(prompts), "--save_path", str(out),
        "--num_inference_steps", "2", "--guidance_scale", "3.0", *extra,
    ]


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path), dtype=np.int16)


def test_every_bad_line_is_reported_before_loading_a_model(setup, tmp_path, monkeypatch, capsys):
    bad = write_prompts(tmp_path / "bad.jsonl", [
        PROMPTS[0],
        "{not json",
        {"file_name": "x.png", "user_data": {"User_ID": "0000001"}},
        {"caption": "no file", "user_data": {"User_ID": "0000001"}},
        {"file_name": "a.png", "caption": "dup", "user_data": {"User_ID": "0000001"}},
        {"file_name": "y.png", "caption": "c", "user_data": {"safety_level": "ultra"}},
        {"file_name": "z.png", "caption": "c", "user_data": {"User_ID": "0000099"}},
        {"file_name": "../escape.png", "caption": "c", "user_data": {"User_ID": "0000001"}},
        {"file_name": "/abs.png", "caption": "c", "user_data": {"User_ID": "0000001"}},
        {"file_name": "w.png", "caption": "c", "user_data": {"Age": 30, "Banned_Categories": ["Nudity!"]}},
        {"file_name": "v.png", "caption": "c"},
        {"file_name": "s1.png", "caption": "c", "user_data": {"User_ID": "0000001"}, "seed": "7"},
        {"file_name": "s2.png", "caption": "c", "user_data": {"User_ID": "0000001"}, "seed": -1},
        {"file_name": "s3.png", "caption": "c", "user_data": {"User_ID": "0000001"}, "seed": True},
    ])

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the input was validated")

    monkeypatch.setattr("psalign.inference.pipeline.load_pipeline", no_model)
    assert infer.main(args(setup, bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    expected = {
        2: "invalid JSON",
        3: "caption: missing or empty",
        4: "file_name: missing",
        5: "file_name: duplicate of line 1",
        6: "unknown safety level 'ultra'",
        7: "no embedding for user 0000099",
        8: "contains '..' and would escape the output folder",
        9: "is absolute",
        10: "unknown safety category 'Nudity!'",
        11: "user_data: missing",
        12: "seed: must be an integer, got '7'",
        13: "seed: must be between 0 and 2**63 - 1, got -1",
        14: "seed: must be an integer, got True",
    }
    for line, reason in expected.items():
        assert any(f"bad.jsonl:{line}:" in row and reason in row for row in err.splitlines()), (line, reason, err)
    assert "bad.jsonl:1:" not in err
    assert not (tmp_path / "out").exists()


def test_generation_log_seeds_and_resume_after_interruption(setup, tmp_path, monkeypatch, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out"
    import psalign.inference.generate as generate

    real_save = generate.atomic_path
    calls = {"n": 0}

    def crash_on_third(path, suffix=""):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated interruption")
        return real_save(path, suffix)

    monkeypatch.setattr(generate, "atomic_path", crash_on_third)
    try:
        assert infer.main(args(setup, prompts, out)) == 130  # an interrupt ends with one line, resumable
    except KeyboardInterrupt:
        pytest.fail("the interrupt escaped infer.main")
    assert "interrupted:" in capsys.readouterr().err
    done = sorted(p.name for p in out.rglob("*.png"))
    assert done == ["a.png", "b.png"] and not list(out.rglob("*.tmp*"))
    before = {name: (out / name).stat().st_mtime_ns for name in done}

    monkeypatch.setattr(generate, "atomic_path", real_save)
    # resuming with other sampling settings would mix two runs: refused before a model is loaded
    with monkeypatch.context() as patch:
        patch.setattr("psalign.inference.pipeline.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
        assert infer.main([*args(setup, prompts, out), "--guidance_scale", "5.0"]) == 2
    err = capsys.readouterr().err
    for line, name in ((1, "a.png"), (2, "b.png")):
        assert f"generation_log.rank0.jsonl:{line}: guidance_scale: {name} was made with 3.0; this run uses 5.0" in err
    assert "--overwrite" in err
    assert {name: (out / name).stat().st_mtime_ns for name in done} == before
    assert infer.main(args(setup, prompts, out)) == 0
    assert {p.relative_to(out).as_posix() for p in out.rglob("*.png")} == {"a.png", "b.png", "sub/c.png", "d.png"}
    assert {name: (out / name).stat().st_mtime_ns for name in done} == before  # not regenerated
    log = [json.loads(line) for line in (out / "generation_log.jsonl").read_text().splitlines()]
    assert sorted(e["file_name"] for e in log) == ["a.png", "b.png", "d.png", "sub/c.png"]
    entry = next(e for e in log if e["file_name"] == "sub/c.png")
    assert entry["user"] == "level_5" and entry["seed"] == sample_seed(0, "sub/c.png")
    assert entry["adapter"] == str(setup["adapter"]) and entry["psa_scale"] == 1.0
    assert not list(out.glob("generation_log.rank*"))


def test_a_line_seed_replaces_the_derived_one_and_a_changed_seed_or_caption_is_not_resumed(setup, tmp_path, capsys):
    same = [{"file_name": f"{user}.png", "caption": "a red circle", "user_data": {"User_ID": user}, "seed": 42}
            for user in ("0000001", "0000002")]
    derived = {"file_name": "derived.png", "caption": "a red circle", "user_data": {"User_ID": "0000001"}}
    prompts = write_prompts(tmp_path / "p.jsonl", [*same, derived])
    out = tmp_path / "out"
    assert infer.main([*args(setup, prompts, out), "--psa_scale", "0"]) == 0  # user branch off: only the seed matters
    log = {e["file_name"]: e for e in map(json.loads, (out / "generation_log.jsonl").read_text().splitlines())}
    assert log["0000001.png"]["seed"] == log["0000002.png"]["seed"] == 42
    assert log["derived.png"]["seed"] == sample_seed(0, "derived.png")
    assert np.array_equal(pixels(out / "0000001.png"), pixels(out / "0000002.png"))
    assert not np.array_equal(pixels(out / "0000001.png"), pixels(out / "derived.png"))

    reseeded = write_prompts(tmp_path / "q.jsonl", [{**same[0], "seed": 43}])
    assert infer.main([*args(setup, reseeded, out), "--psa_scale", "0"]) == 2
    assert "seed: 0000001.png was made with 42; this run uses 43" in capsys.readouterr().err
    recaptioned = write_prompts(tmp_path / "r.jsonl", [{**same[0], "caption": "a blue circle"}])
    assert infer.main([*args(setup, recaptioned, out), "--psa_scale", "0"]) == 2
    assert "caption: 0000001.png was made with 'a red circle'; this run uses 'a blue circle'" in capsys.readouterr().err


def test_resume_refuses_a_retrained_adapter_at_the_same_path(setup, tmp_path, monkeypatch, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    mine = {**setup, "adapter": Path(shutil.copytree(setup["adapter"], tmp_path / "adapter"))}
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    out = tmp_path / "out"
    assert infer.main(args(mine, prompts, out)) == 0
    made = (out / "a.png").stat().st_mtime_ns
    weights = mine["adapter"] / "psa_adapter.safetensors"
    save_file({name: tensor + 1 for name, tensor in load_file(weights).items()}, weights)  # other weights, same path
    with monkeypatch.context() as patch:
        patch.setattr("psalign.inference.pipeline.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
        assert infer.main(args(mine, prompts, out)) == 2
    err = capsys.readouterr().err
    assert "generation_log.jsonl:1: adapter_sha256: a.png was made with" in err
    assert (out / "a.png").stat().st_mtime_ns == made



def test_resume_accepts_the_same_adapter_in_a_moved_folder_and_hashes_it_once_per_run(setup, tmp_path, monkeypatch):
    import shutil

    from psalign.io import weights_sha256
    from psalign.methods import psa

    hashed = []
    monkeypatch.setattr(psa, "weights_sha256", lambda path: hashed.append(path) or weights_sha256(path))
    mine = {**setup, "adapter": Path(shutil.copytree(setup["adapter"], tmp_path / "adapter"))}
    out = tmp_path / "out"
    assert infer.main(args(mine, write_prompts(tmp_path / "p1.jsonl", PROMPTS[:1]), out)) == 0
    assert hashed == [mine["adapter"]]  # the pre-load check and the log share one digest
    made = (out / "a.png").stat().st_mtime_ns
    moved = {**mine, "adapter": Path(shutil.move(mine["adapter"], tmp_path / "moved"))}
    assert infer.main(args(moved, write_prompts(tmp_path / "p2.jsonl", PROMPTS[:2]), out)) == 0
    assert (out / "a.png").stat().st_mtime_ns == made  # resumed, not refused or redrawn
    log = {e["file_name"]: e for e in map(json.loads, (out / "generation_log.jsonl").read_text().splitlines())}
    assert log["a.png"]["adapter"] == str(mine["adapter"]) and log["b.png"]["adapter"] == str(moved["adapter"])
    assert log["a.png"]["adapter_sha256"] == log["b.png"]["adapter_sha256"]

def test_resume_refuses_a_retrained_model_at_the_same_path_and_accepts_a_moved_one(setup, tmp_path, monkeypatch,
                                                                                    capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(setup["model"], tmp_path / "model"))
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    out = tmp_path / "out"
    assert infer.main(args({**setup, "model": model}, prompts, out)) == 0
    made = (out / "a.png").stat().st_mtime_ns
    moved = Path(shutil.move(model, tmp_path / "moved"))
    assert infer.main(args({**setup, "model": moved}, prompts, out)) == 0  # same weights elsewhere: resumed
    weights = next((moved / "unet").glob("*.safetensors"))
    save_file({name: tensor + 1 for name, tensor in load_file(weights).items()}, weights)  # retrained in place
    with monkeypatch.context() as patch:
        patch.setattr("psalign.inference.pipeline.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
        assert infer.main(args({**setup, "model": moved}, prompts, out)) == 2
    assert "generation_log.jsonl:1: model_sha256: a.png was made with" in capsys.readouterr().err
    assert (out / "a.png").stat().st_mtime_ns == made


def test_images_do_not_depend_on_batch_size(setup, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    assert infer.main(args(setup, prompts, tmp_path / "b1", "--batch_size", "1")) == 0
    assert infer.main(args(setup, prompts, tmp_path / "b3", "--batch_size", "3", "--grid", "user")) == 0
    for record in PROMPTS:
        one, three = pixels(tmp_path / "b1" / record["file_name"]), pixels(tmp_path / "b3" / record["file_name"])
        # the same seeds; batched matmuls may round a last bit differently, never more
        assert np.abs(one - three).max() <= 1 and (one == three).mean() > 0.99
    assert len(list((tmp_path / "b3" / "grids").glob("user_*.png"))) == 4


def test_user_grid_wraps_long_captions_instead_of_cutting_them(tmp_path, monkeypatch):
    from PIL import Image, ImageDraw

    from psalign.inference.generate import write_grids
    from psalign.inference.grid import CHAR_WIDTH
    from psalign.inference.records import PromptRecord, RecordUser

    caption = ("a red square beside a blue circle on a long table in a quiet park at dusk, with every word of "
               "this caption shown under the grid")
    Image.new("RGB", (8, 8), "gray").save(tmp_path / "a.png")
    record = PromptRecord(1, "a.png", caption, RecordUser("u1", "user u1", "u1", None), {})
    drawn: list[str] = []
    draw_text = ImageDraw.ImageDraw.text

    def text(self, xy, line, *args, **kwargs):
        drawn.append(line)
        return draw_text(self, xy, line, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    write_grids(tmp_path, [record], "user")
    lines = [line for line in drawn if line != "user u1"]
    assert len(lines) > 1 and " ".join(lines) == caption
    assert all(len(line) * CHAR_WIDTH <= 128 for line in lines)  # each line fits its 128 px column


def test_without_load_psa_equals_the_stock_pipeline(setup, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"file_name": "a.png", "caption": "a cat"}])
    out = tmp_path / "base"
    assert infer.main(["--sd_model", str(setup["model"]), "--meta_data", str(prompts), "--save_path", str(out),
                       "--num_inference_steps", "2", "--guidance_scale", "3.0", "--seed", "7"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(setup["model"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(sample_seed(7, "a.png"))).images[0]
    assert (np.asarray(image, dtype=np.int16) == pixels(out / "a.png")).all()


def test_profile_users_are_embedded_with_the_llm_and_cached(setup, tmp_path):
    llm = build_tiny_causal_lm(tmp_path / "llm", hidden_size=USER_DIM)
    embeds = tmp_path / "embeds"
    prompts = write_prompts(tmp_path / "p.jsonl", [
        {"file_name": "a.png", "caption": "a cat",
         "user_data": {"User_ID": "0000042", "Age": 15, "Religion": "Islam", "Banned_Categories": ["Sexuality"]}},
        {"file_name": "b.png", "caption": "a dog",
         "user_data": {"User_ID": "0000042", "Age": 15, "Religion": "Islam", "Banned_Categories": ["Sexuality"]}},
    ])
    base = args(setup, prompts, tmp_path / "out")
    base[base.index("--embeds_folder") + 1] = str(embeds)
    assert infer.main([*base, "--llm_model", str(llm)]) == 0
    assert (embeds / "0000042.npy").is_file() and np.load(embeds / "0000042.npy").shape == (USER_DIM,)
    # without --llm_model the cached embedding is enough
    assert infer.main([*base, "--overwrite"]) == 0


def test_two_processes_write_the_same_files_as_one(setup, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    assert infer.main(args(setup, prompts, tmp_path / "one", "--batch_size", "2")) == 0
    # accelerate 1.x starts CPU worker processes for --multi_gpu with ACCELERATE_USE_CPU=1 (gloo);
    # plain `--cpu --num_processes 2` starts a single process unless MPI is set up.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "infer.py"), *args(setup, prompts, tmp_path / "two", "--batch_size", "2")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote ") == 2  # one line per process
    one = sorted(p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two
    for name in (n for n in one if n.endswith(".png")):
        # same seeds; the child processes run 1 BLAS thread each, so float sums may round differently
        diff = np.abs(pixels(tmp_path / "one" / name) - pixels(tmp_path / "two" / name))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99


def test_sdxl_is_detected_from_the_model(setup, tmp_path, tiny_sdxl_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", [{"file_name": "a.png", "caption": "a cat"}])
    common = ["--meta_data", str(prompts), "--num_inference_steps", "2"]
    assert infer.main(["--sd_model", str(tiny_sdxl_path), "--save_path", str(tmp_path / "xl"), *common]) == 0
    log = json.loads((tmp_path / "xl" / "generation_log.jsonl").read_text())
    assert log["model"] == str(tiny_sdxl_path) and pixels(tmp_path / "xl" / "a.png").shape == (32, 32, 3)
    assert infer.main(["--sd_model", str(setup["model"]), "--sdxl", "--save_path", str(tmp_path / "x"), *common]) == 2
    assert f"--sdxl: {setup['model']} is not an SDXL pipeline" in capsys.readouterr().err


def test_profile_users_are_embedded_with_the_folders_template_and_saved_only_when_asked(tmp_path):
    from psalign.embeddings import claim_embedding_folder, embedding_info, find_user_embedding
    from psalign.inference.generate import user_embeddings
    from psalign.inference.records import PromptRecord, resolve_user

    class RecordingEncoder:
        batch_size = 8

        def __init__(self):
            self.texts = []

        def encode(self, texts):
            self.texts += texts
            return np.ones((len(texts), 3), dtype=np.float32)

    claim_embedding_folder(tmp_path, embedding_info("sentence", "minilm", "Banned: {banned}. Allowed: {allowed}."))
    user = resolve_user({"User_ID": "0000042", "Age": 30, "Banned_Categories": ["Violence", "Hate"]})
    records = [PromptRecord(1, "a.png", "a cat", user, {})]
    encoder = RecordingEncoder()
    out = user_embeddings(records, tmp_path, lambda: encoder, save_new=False)
    assert encoder.texts == ["Banned: Hate, Violence. Allowed: Harassment, Self-Harm, Sexuality, Shocking, Propaganda."]
    assert out[user.key].shape == (3,) and find_user_embedding(tmp_path, "0000042") is None
    user_embeddings(records, tmp_path, lambda: encoder)
    assert find_user_embedding(tmp_path, "0000042") is not None


def test_profile_users_with_another_encoder_than_the_folders_are_refused_before_loading(setup, tmp_path, capsys):
    import shutil

    from psalign.embeddings import claim_embedding_folder, embedding_info

    embeds = tmp_path / "embeds"
    shutil.copytree(setup["embeds"], embeds)
    claim_embedding_folder(embeds, embedding_info("llm", "some/llm"))
    prompts = write_prompts(tmp_path / "p.jsonl", [
        {"file_name": "p.png", "caption": "a cat", "user_data": {"Age": 30, "Banned_Categories": ["Hate"]}},
    ])
    argv = args(setup, prompts, tmp_path / "out", "--encoder", "sentence")
    argv[argv.index("--embeds_folder") + 1] = str(embeds)
    assert infer.main(argv) == 2
    err = capsys.readouterr().err
    assert "embedding_info.json: encoder: the stored embeddings come from the llm encoder" in err
    assert not (tmp_path / "out").exists()
