"""The Sage build pipeline (``python -m psalign.sage build``): stages, writers, resume, output readers."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from psalign.io import InputError
from psalign.sage import build as sage_build
from psalign.sage.build import STAGES, build, stage_dir
from psalign.sage.concepts import dedupe_concepts, read_concepts
from psalign.sage.config import load_config
from psalign.sage.writer import (
    PROMPT_TEMPLATE_FIELDS,
    CausalLMChatBackend,
    LLMPromptWriter,
    LLMWriter,
    PairRules,
    PromptPair,
    pair_problem,
    read_writer_template,
)
from tests.metrics_support import FakeChatServer, request_images, request_text

REPO = Path(__file__).resolve().parents[1]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image_hashes(folder: Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.glob("*.jpg"))}


# --------------------------------------------------------------------------------------------
# Pieces


@pytest.mark.parametrize(
    "unsafe, safe, reason",
    [
        ("a man with a knife in a dark alley", "a man with an umbrella in a dark alley", None),
        ("a man with a knife in a dark alley", "a man with a knife in a dark alley", "is the unsafe prompt"),
        ("a man with a knife in a dark alley", "a man holding a knife in an alley", "repeats the concept's word(s) knife"),
        ("a man with a knife in a dark alley", "alley", "the rewrite has 1 words"),
        ("a man with a knife in a dark alley", "a cat on a sofa " * 10, "the rewrite has 50 words"),
    ],
)
def test_pair_rules(unsafe, safe, reason):
    problem = pair_problem(PromptPair(unsafe, safe), "knife attack", PairRules(3, 40), set())
    assert problem is None if reason is None else reason in problem


def test_a_pair_repeating_a_kept_prompt_is_a_duplicate():
    seen = {"a man with an umbrella in a dark alley"}
    problem = pair_problem(PromptPair("a man with a knife in the rain", "a man with an umbrella in a dark alley"),
                           "knife attack", PairRules(), seen)
    assert "duplicates" in problem


def test_prompt_templates_must_have_every_placeholder_and_no_other(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Write {count} prompts for {concept}.\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"missing placeholder\(s\) \{category\}"):
        read_writer_template(path, PROMPT_TEMPLATE_FIELDS)
    path.write_text("Write {count} prompts for {concept} of {category}\nand {user}.\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"t.txt:2: unknown placeholder \{user\}"):
        read_writer_template(path, PROMPT_TEMPLATE_FIELDS)


def test_concepts_yaml_errors_name_file_line_and_category(tmp_path):
    path = tmp_path / "concepts.yaml"
    path.write_text("violence: [knife fight]\nsnacks: [crisps]\nhate:\n  - ok one\n  - bad/slash\n", encoding="utf-8")
    with pytest.raises(InputError) as error:
        read_concepts(path)
    text = str(error.value)
    assert "concepts.yaml:2: snacks:" in text and "concepts.yaml:5: Hate:" in text and "bad/slash" in text


def test_duplicates_are_dropped_and_near_duplicates_reported():
    kept, report = dedupe_concepts({"Violence": ["knife fight", "Knife Fight", "knife fights", "fight knife", "riot"],
                                    "Shocking": ["riot"]}, near_ratio=0.9)
    assert kept == {"Violence": ["knife fight", "knife fights", "fight knife", "riot"], "Shocking": []}
    assert [d["concept"] for d in report["duplicates"]] == ["Knife Fight", "riot"]
    assert {tuple(n["concepts"]) for n in report["near_duplicates"]} == {("knife fight", "knife fights"),
                                                                         ("knife fight", "fight knife")}


def test_bad_settings_are_reported_with_file_line_and_key(tmp_path):
    path = tmp_path / "sage_build.yaml"
    path.write_text("world: real\nprompts_per_concept: many\nfilter_clasifiers: [q16]\n", encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_config(path)
    text = str(error.value)
    assert "sage_build.yaml:2: prompts_per_concept: expected an integer" in text
    assert "sage_build.yaml:3: filter_clasifiers: unknown key" in text


def test_cli_exits_2_with_the_problems_and_no_traceback(tmp_path):
    path = tmp_path / "sage_build.yaml"
    path.write_text(f"out: {tmp_path / 'out'}\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "psalign.sage", "build", "--config", str(path),
                             "--val_share", "1.5"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for key in ("concepts", "sd_model", "writer_model", "val_share"):
        assert f"{key}:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_names_the_common_flags_as_the_other_commands_do_and_shows_only_meaningful_defaults(capsys):
    from psalign.sage.__main__ import parser

    for model_flag, out_flag in (("--pretrained_model", "--output_dir"), ("--sd_model", "--out")):
        args = parser().parse_args(["build", model_flag, "models/sd15", out_flag, "built"])
        assert (args.sd_model, args.out) == ("models/sd15", "built")
    with pytest.raises(SystemExit):
        parser().parse_args(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--pretrained_model PRETRAINED_MODEL, --sd_model PRETRAINED_MODEL" in text
    assert "--output_dir OUTPUT_DIR, --out OUTPUT_DIR" in text and "(default: sage_build)" in text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert "last stage to run (default: pairs)" in text


# --------------------------------------------------------------------------------------------
# The writers


def _pairs(concept: str, count: int, start: int = 0) -> list[dict]:
    return [{"unsafe": f"scene {start + i} showing {concept} on a busy street",
             "safe": f"scene {start + i} showing a parade on a busy street"} for i in range(count)]


class _Script:
    """The fake server's replies: per concept, a list of behaviours for its successive requests."""

    def __init__(self, plans: dict[str, list[str]], count: int):
        self.plans = plans
        self.count = count
        self.calls: dict[str, int] = {}

    def __call__(self, body: dict):
        text = request_text(body)
        concept = next(c for c in self.plans if f'Concept: {c}' in text)
        n = self.calls[concept] = self.calls.get(concept, 0) + 1
        plan = self.plans[concept]
        action = plan[min(n, len(plan)) - 1]
        if action == "slow":
            time.sleep(1.5)
            action = "good"
        if action == "malformed":
            content = "Sure! Here are the prompts you asked for."
        elif action == "repeat_concept":
            pairs = _pairs(concept, self.count)
            pairs[0]["safe"] = f"scene 0 with a {concept} on a busy street"
            content = json.dumps({"pairs": pairs})
        else:
            content = json.dumps({"pairs": _pairs(concept, self.count, start=10 * n)})
        return 200, {"choices": [{"message": {"content": content}}]}


CONCEPTS_YAML = "Violence:\n  - knife fight\nShocking:\n  - gory wound\nHate:\n  - hate symbol\n"


def _real_config(tmp_path: Path, model: Path, base_url: str, **overrides) -> Path:
    (tmp_path / "concepts.yaml").write_text(CONCEPTS_YAML, encoding="utf-8")
    settings = {
        "out": str(tmp_path / "build"), "concepts": "concepts.yaml", "writer": "openai", "writer_model": "fake-writer",
        "writer_base_url": base_url, "writer_timeout_s": 0.5, "writer_attempts": 2, "writer_backoff_s": 0.01,
        "prompts_per_concept": 2, "sd_model": str(model), "num_inference_steps": 2, "generation_batch": 1,
        "filter_classifiers": ["toy"], "generate_users": 6, "heldout_users": 2, "test_share": 0.5,
        "device": "cpu", **overrides,
    }
    path = tmp_path / "sage_build.yaml"
    import yaml

    path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return path


class _UnsafeImageFlagger:
    """Stands in for a classifier on random-weight images: flags the pixels of every ``_u`` image
    except ``spare``'s, so each unit is kept except that one."""

    name = "toy"

    def __init__(self, images: Path, spare: str):
        from PIL import Image

        self.unsafe = {Image.open(p).convert("RGB").tobytes() for p in images.glob("*_u.jpg") if p.name != spare}

    def __call__(self, images):
        return np.array([image.convert("RGB").tobytes() in self.unsafe for image in images], dtype=bool)


def test_full_pipeline_with_an_llm_server_that_misbehaves(tmp_path, tiny_sd15_path, monkeypatch, one_torch_thread):
    from psalign.metrics.prompts import read_prompts
    from psalign.safetydpo.data import read_coprov2_pairs, read_sage_pairs
    from psalign.sage import read_preference_pairs
    from psalign.users import read_users

    script = _Script({"knife fight": ["malformed", "malformed", "good"], "gory wound": ["repeat_concept", "good"],
                      "hate symbol": ["slow", "good"]}, count=2)
    with FakeChatServer(script) as server:
        config = load_config(_real_config(tmp_path, tiny_sd15_path, server.base_url))
        spare = "violence_knife_fight_00001_u.jpg"
        monkeypatch.setattr(sage_build, "image_flaggers",
                            lambda c: [_UnsafeImageFlagger(stage_dir(c, "images"), spare)])
        records = build(config)
        requests = len(server.requests)
        prompts = records["prompts"]
        # malformed twice (two transport attempts) -> counted once, asked again with the reason -> kept
        assert script.calls == {"knife fight": 3, "gory wound": 2, "hate symbol": 2}
        assert prompts["pairs"] == 6 and prompts["short_concepts"] == []
        assert prompts["rejected_by_reason"] == {"malformed": 1, "repeats_concept": 1}
        assert prompts["llm_requests"] == 7  # the slow request timed out and was retried
        retry = request_text(server.requests[4]["body"])  # hate symbol x2, then knife fight x3
        assert "rejected" in retry and "not the JSON object" in retry
        lines = [json.loads(x) for x in (stage_dir(config, "prompts") / "prompts.jsonl").read_text().splitlines()]
        assert all("gory" not in p["safe"] and "wound" not in p["safe"] for x in lines for p in x["pairs"])
        assert records["filter"]["units"] == 6 and records["filter"]["kept"] == 5
        assert records["filter"]["kept_share_by_concept"]["Violence: knife fight"] == 0.5

        # a rerun does nothing again
        again = build(config)
        assert len(server.requests) == requests and again == records

    out = Path(config.out)
    users = read_users(out / "sage" / "users.csv")
    assert len(users) == 6
    split_records = {}
    for split in ("train", "test_seen", "test_unseen"):
        metadata = out / "sage" / split / "metadata.jsonl"
        split_records[split] = read_preference_pairs(metadata, metadata.parent, users=users)
        summary = json.loads((metadata.parent / "summary.json").read_text())
        assert summary["records"] == len(split_records[split])
    assert not (out / "sage" / "val").exists()
    assert {r["user_data"]["User_ID"] for r in split_records["test_unseen"]} == {"0000005", "0000006"}
    train_units = {r["chosen"] for r in split_records["train"]} | {r["rejected"] for r in split_records["train"]}
    test_units = {r["chosen"] for r in split_records["test_seen"]}
    assert train_units and not train_units & test_units  # held-out units
    # the Sage rule: a user who allows the category prefers the unsafe image for the unsafe caption
    by_id = {u.user_id: u for u in users}
    for record in split_records["train"]:
        banned = record["file_name"].split("_")[2] in {c.lower() for c in by_id[record["user_data"]["User_ID"]]
                                                        .banned_categories}
        wants_unsafe = record["file_name"].endswith(".jpg_u.jpg") and not banned
        assert record["chosen"].endswith("_u.jpg") is wants_unsafe
    coprov2 = read_coprov2_pairs(out / "coprov2" / "train.csv", out / "coprov2", "Violence")
    sage_pairs = read_sage_pairs(out / "sage" / "train" / "metadata.jsonl", "Violence")
    assert coprov2 and sage_pairs
    assert {Path(p.chosen).name.split("_idx_")[0] for p in coprov2} == {"s"}
    assert {_sha(Path(p.chosen)) for p in coprov2} <= {_sha(Path(p.chosen)) for p in sage_pairs}
    for name in ("sage_seen", "sage_unseen"):
        table = read_prompts(out / "eval_data" / f"{name}.csv")
        assert table.records and all(name.endswith("_u.jpg") for name in table.records)


def test_the_writer_endpoint_failing_stops_the_stage_and_a_rerun_resumes(tmp_path, monkeypatch):
    down = {"gory wound"}

    def respond(body):
        text = request_text(body)
        concept = next(c for c in ("knife fight", "gory wound", "hate symbol") if f"Concept: {c}" in text)
        if concept in down:
            return 503, {"error": "overloaded"}
        return 200, {"choices": [{"message": {"content": json.dumps({"pairs": _pairs(concept, 2)})}}]}

    with FakeChatServer(respond) as server:
        config = load_config(_real_config(tmp_path, tmp_path, server.base_url))
        from psalign.metrics.judge import JudgeError

        with pytest.raises(JudgeError, match="503"):
            build(config, until="prompts")
        progress = stage_dir(config, "prompts") / "progress.jsonl"
        assert len(progress.read_text().splitlines()) == 2 and not (stage_dir(config, "prompts") / "done.json").exists()
        asked = len(server.requests)
        down.clear()
        record = build(config, until="prompts")["prompts"]
        assert len(server.requests) == asked + 1 and record["pairs"] == 6


def test_local_causal_lm_writer_uses_the_chat_template_batches_and_counts_rejections(tmp_path):
    from psalign.testing import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "lm", chat_template=True)
    backend = CausalLMChatBackend(str(model), device="cpu", max_new_tokens=6, batch_size=2)
    template = "Category {category}. Concept {concept}. Write {count} pairs as JSON."
    writer = LLMPromptWriter(LLMWriter(backend, tmp_path / "cache.jsonl", attempts=1), template, PairRules(),
                             rewrite_attempts=2)
    concepts = [("Violence", "knife fight"), ("Hate", "hate symbol"), ("Shocking", "gory wound")]
    alone = [backend.complete("sys", [writer.first_request(c, k, 2)]) for c, k in concepts]
    backend.prefetch("sys", [[writer.first_request(c, k, 2)] for c, k in concepts])
    assert [backend.complete("sys", [writer.first_request(c, k, 2)]) for c, k in concepts] == alone
    assert backend._answers == {}
    results = [writer.write(c, k, 2) for c, k in concepts]
    # six random tokens are no JSON object: each concept's two requests are rejected, nothing is kept
    assert all(r.pairs == [] and len(r.rejected) == 2 and r.requests == 2 for r in results)
    assert all(item["reason"].startswith("malformed reply") for r in results for item in r.rejected)
    # greedy decoding: asking again gets the same replies
    assert writer.write(*concepts[0], 2).rejected == results[0].rejected


def test_a_local_writer_needs_a_chat_template(tmp_path):
    from psalign.testing import build_tiny_causal_lm

    model = build_tiny_causal_lm(tmp_path / "lm", chat_template=False)
    with pytest.raises(InputError, match="no chat template"):
        CausalLMChatBackend(str(model), device="cpu")


# --------------------------------------------------------------------------------------------
# Toy world: every stage, resumed after an interruption


def _toy_config(out: Path, **overrides):
    flags = {"world": "toy", "out": str(out), "prompts_per_concept": "1", "images_per_prompt": "1",
             "generate_users": "4", "heldout_users": "1", "device": "cpu", "generation_batch": "7"}
    return load_config(None, {**flags, **{k: str(v) for k, v in overrides.items()}})


@pytest.fixture(scope="module")
def toy_build(tmp_path_factory) -> Path:
    """A small toy build: 14 concepts x 1 unit, 4 users."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("toy_sage") / "build"
    build(_toy_config(out))
    torch.set_num_threads(threads)
    return out


def _outputs(out: Path) -> dict[str, str]:
    skip = {"done.json", "flags.jsonl", "progress.jsonl", "generation_log.jsonl"}
    return {str(p.relative_to(out)): _sha(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name not in skip}


def test_toy_build_records_every_stage(toy_build):
    records = {s: json.loads((toy_build / s / "done.json").read_text()) for s in STAGES}
    assert records["prompts"]["writer"] == "toy-template" and records["prompts"]["pairs"] == 14
    assert records["images"]["images"] == 28
    assert records["filter"]["kept"] >= 12  # the toy model follows prompts (about 97% of units kept)
    assert records["pairs"]["splits"]["train"]["records"] == 3 * records["filter"]["kept"] * 2
    assert all("seconds" in r and "settings" in r for r in records.values())


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_resumes_after_an_interruption(stage, toy_build, tmp_path, monkeypatch, one_torch_thread):
    out = tmp_path / "build"
    shutil.copytree(toy_build, out)
    expected = _outputs(out)
    config = _toy_config(out)
    for later in STAGES[STAGES.index(stage) :]:
        shutil.rmtree(stage_dir(config, later))
    if stage == "images":  # half the images were drawn when the run stopped
        shutil.copytree(toy_build / "images", out / "images")
        (out / "images" / "done.json").unlink()
        drawn = sorted((out / "images").glob("*.jpg"))
        for path in drawn[::2]:
            path.unlink()
        record = build(config)["images"]
        assert record["drawn_now"] == len(drawn[::2])
    else:
        calls = {"n": 0}
        target = {"concepts": "dedupe_concepts", "prompts": "append_json_lines", "filter": "append_json_lines",
                  "pairs": "write_coprov2"}[stage]
        original = getattr(sage_build, target)

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2 or stage in ("concepts", "pairs"):
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(sage_build, target, interrupted)
        if stage == "filter":
            monkeypatch.setattr(sage_build, "FILTER_CHUNK", 10)
        with pytest.raises(KeyboardInterrupt):
            build(config)
        assert not (stage_dir(config, stage) / "done.json").exists()
        monkeypatch.setattr(sage_build, target, original)
        if stage in ("prompts", "filter"):  # what was finished is not redone
            done = (stage_dir(config, stage) / ("progress.jsonl" if stage == "prompts" else "flags.jsonl"))
            assert len(done.read_text().splitlines()) == (1 if stage == "prompts" else 10)
        build(config)
    assert _outputs(out) == expected


def test_a_finished_stage_with_other_settings_is_refused(toy_build, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(toy_build, out)
    with pytest.raises(InputError, match="prompts_per_concept: built with 1, now 2"):
        build(_toy_config(out, prompts_per_concept=2))


@pytest.mark.slow
def test_two_processes_draw_the_same_images_as_one(toy_build, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(toy_build, out)
    one = _image_hashes(toy_build / "images")
    shutil.rmtree(out / "images")
    for stage in ("filter", "pairs"):
        shutil.rmtree(out / stage)
    flags = ["--world", "toy", "--out", str(out), "--prompts_per_concept", "1", "--images_per_prompt", "1",
             "--generate_users", "4", "--heldout_users", "1", "--device", "cpu", "--generation_batch", "7"]
    port = 29500 + os.getpid() % 1000
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "psalign.sage", "build", *flags], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert _image_hashes(out / "images") == one
    record = json.loads((out / "images" / "done.json").read_text())
    assert record["processes"] == 2 and record["drawn_now"] == 28
    assert not (out / "filter").exists()  # later stages run in one process afterwards


def test_concepts_proposed_by_the_llm_are_checked_deduplicated_and_reported(tmp_path):
    def respond(body):
        assert "Safety category: Violence" in request_text(body)
        reply = {"concepts": ["riot", "Knife Fight", "bad/name", "street riot"]}
        return 200, {"choices": [{"message": {"content": json.dumps(reply)}}]}

    with FakeChatServer(respond) as server:
        path = _real_config(tmp_path, tmp_path, server.base_url, propose_concepts=4)
        (tmp_path / "concepts.yaml").write_text("Violence: [knife fight]\n", encoding="utf-8")
        record = build(load_config(path), until="concepts")["concepts"]
        assert len(server.requests) == 1
    assert read_concepts(tmp_path / "build" / "concepts" / "concepts.yaml") == {
        "Violence": ["knife fight", "riot", "street riot"]}
    assert record["invalid_proposals"] == [{"category": "Violence", "concept": "bad/name"}]
    assert [d["concept"] for d in record["duplicates"]] == ["Knife Fight"]
    assert record["settings"]["writer_model"] == "fake-writer"


def test_the_images_stage_draws_unit_pairs_from_one_seed_with_an_sdxl_pipeline(tmp_path, tiny_sdxl_path,
                                                                                one_torch_thread):
    config = _toy_config(tmp_path / "build", sd_model=tiny_sdxl_path, sdxl="true", num_inference_steps=2,
                         generation_batch=4)
    record = build(config, until="images")["images"]
    assert record["images"] == 28 and record["drawn_now"] == 28
    log = [json.loads(x) for x in (stage_dir(config, "images") / "generation_log.jsonl").read_text().splitlines()]
    seeds = {entry["file_name"]: entry["seed"] for entry in log}
    assert len(seeds) == 28
    assert all(seeds[name] == seeds[name.replace("_u.jpg", "_s.jpg")] for name in seeds if name.endswith("_u.jpg"))
    assert len(set(seeds.values())) == 14


# --------------------------------------------------------------------------------------------
# Concepts: near-duplicates across categories, proposals cached


def test_near_duplicates_across_categories_are_reported_and_printed(tmp_path, capsys):
    kept, report = dedupe_concepts({"Violence": ["street riot", "knife fight"], "Shocking": ["street riots"],
                                    "Hate": ["riot street", "gory wound"]}, near_ratio=0.9)
    assert kept == {"Violence": ["street riot", "knife fight"], "Shocking": ["street riots"],
                    "Hate": ["riot street", "gory wound"]}
    near = {(tuple(n["categories"]), tuple(n["concepts"])) for n in report["near_duplicates"]}
    assert near == {(("Violence", "Shocking"), ("street riot", "street riots")),  # ratio 0.96
                    (("Violence", "Hate"), ("street riot", "riot street"))}  # the same words
    # the build prints them and records them in the concepts stage's done.json
    path = _real_config(tmp_path, tmp_path, None)
    (tmp_path / "concepts.yaml").write_text("Violence: [street riot]\nShocking: [street riots, gory wound]\n",
                                            encoding="utf-8")
    record = build(load_config(path), until="concepts")["concepts"]
    assert record["near_duplicates"] == [{"categories": ["Violence", "Shocking"],
                                          "concepts": ["street riot", "street riots"], "ratio": 0.957}]
    assert "Violence: street riot ~ Shocking: street riots (ratio 0.957)" in capsys.readouterr().err


def test_concept_proposals_are_not_asked_again_after_an_interruption(tmp_path, monkeypatch):
    def respond(body):
        category = request_text(body).split("Safety category: ")[1].split("\n")[0]
        reply = {"concepts": [f"{category} scene one", f"{category} scene two"]}
        return 200, {"choices": [{"message": {"content": json.dumps(reply)}}]}

    with FakeChatServer(respond) as server:
        config = load_config(_real_config(tmp_path, tmp_path, server.base_url, propose_concepts=2))

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(sage_build, "dedupe_concepts", interrupted)
        with pytest.raises(KeyboardInterrupt):
            build(config, until="concepts")
        assert len(server.requests) == 3 and not (stage_dir(config, "concepts") / "done.json").exists()
        monkeypatch.setattr(sage_build, "dedupe_concepts", dedupe_concepts)
        record = build(config, until="concepts")["concepts"]
        assert len(server.requests) == 3  # every proposal came from the writer cache
    assert record["proposed"] == 6
    assert read_concepts(stage_dir(config, "concepts") / "concepts.yaml")["Hate"] == [
        "hate symbol", "Hate scene one", "Hate scene two"]


# --------------------------------------------------------------------------------------------
# Settings


def test_a_flag_beats_the_yaml_key_and_yaml_paths_resolve_from_the_yaml_folder(tmp_path, monkeypatch):
    from psalign.sage.__main__ import parser

    path = _real_config(tmp_path, tmp_path, "http://127.0.0.1:9/v1")
    monkeypatch.chdir(REPO)
    args = vars(parser().parse_args(["build", "--config", str(path), "--prompts_per_concept", "7",
                                     "--filter_classifiers", "q16,nudenet"]))
    flags = {k: v for k, v in args.items() if k not in ("command", "config", "until")}
    config = load_config(args["config"], flags)
    assert config.prompts_per_concept == 7 and config.filter_classifiers == ["q16", "nudenet"]
    assert load_config(path).prompts_per_concept == 2  # the YAML's value without the flag
    assert config.concepts == tmp_path / "concepts.yaml"  # not the working directory's


def test_the_shipped_build_config_loads_and_validates():
    from psalign.categories import CATEGORIES

    config = load_config(REPO / "configs" / "sage_build.yaml")
    assert config.problems() == []
    assert config.concepts == REPO / "configs" / "sage_concepts.yaml"
    concepts = read_concepts(config.concepts)
    assert set(concepts) == set(CATEGORIES) and all(concepts.values())
    assert config.writer == "openai" and config.writer_base_url and config.writer_model
    assert 0 < config.val_share + config.test_share < 1 and config.heldout_users < config.generate_users


# --------------------------------------------------------------------------------------------
# Local causal LM: the writer and the labeller, their model's decoding scripted


def _scripted_generate(tokenizer, reply, seen: list, batches: list):
    """Stands in for ``model.generate``: records each row's prompt as text (special tokens kept)
    and the batch size, and appends the tokens of ``reply(prompt)`` and the end token."""
    import torch

    def generate(input_ids, attention_mask, **kwargs):
        assert kwargs["do_sample"] is False and kwargs["num_beams"] == 1  # greedy decoding
        batches.append(len(input_ids))
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = tokenizer.decode(ids[mask.bool()], clean_up_tokenization_spaces=False)
            seen.append(prompt)
            rows.append(tokenizer(reply(prompt), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(map(len, rows))
        new = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, new], dim=1)

    return generate


def _script_local_lm(monkeypatch, module: str, reply) -> tuple[list, list]:
    """Make ``module``'s ``load_causal_lm`` load the model, its ``generate`` scripted by ``reply``."""
    import importlib

    target = importlib.import_module(module)
    original = target.load_causal_lm
    seen, batches = [], []

    def load(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        model.generate = _scripted_generate(tokenizer, reply, seen, batches)
        return model, tokenizer

    monkeypatch.setattr(target, "load_causal_lm", load)
    return seen, batches


@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory) -> Path:
    from psalign.testing import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("chat_lm") / "lm", chat_template=True)


def test_a_local_writer_build_applies_the_chat_template_and_keeps_valid_json(tmp_path, tiny_chat_lm, monkeypatch):
    from transformers import AutoTokenizer

    from psalign.sage.writer import DEFAULT_PROMPT_TEMPLATE, WRITER_SYSTEM_PROMPT

    def reply(prompt: str) -> str:
        concept = prompt.split("Concept: ")[1].split("\n")[0]
        return json.dumps({"pairs": _pairs(concept, 2)})

    seen, batches = _script_local_lm(monkeypatch, "psalign.embeddings", reply)
    config = load_config(_real_config(tmp_path, tmp_path, None, writer="local", writer_model=str(tiny_chat_lm),
                                      writer_batch_size=2))
    record = build(config, until="prompts")["prompts"]
    assert record["writer"] == f"causal-lm:{tiny_chat_lm}"
    assert record["pairs"] == 6 and record["rejected"] == 0 and record["llm_requests"] == 3
    lines = [json.loads(x) for x in (stage_dir(config, "prompts") / "prompts.jsonl").read_text().splitlines()]
    assert {x["concept"]: x["pairs"] for x in lines} == {c: _pairs(c, 2) for c in ("knife fight", "gory wound",
                                                                                  "hate symbol")}
    assert batches == [2, 1]  # writer_batch_size concepts answered together
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_lm)
    template = read_writer_template(DEFAULT_PROMPT_TEMPLATE, PROMPT_TEMPLATE_FIELDS)
    expected = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{WRITER_SYSTEM_PROMPT}\n\n{template.format(category=c, concept=k, count=2)}"}],
        tokenize=False, add_generation_prompt=True) for c, k in (("Violence", "knife fight"), ("Hate", "hate symbol"),
                                                                  ("Shocking", "gory wound"))]
    assert sorted(seen) == sorted(expected) and all(p.startswith("<|user|>") for p in seen)
    # redone after its progress is lost, the stage answers from the writer cache: the model is not asked again
    (stage_dir(config, "prompts") / "progress.jsonl").unlink()
    (stage_dir(config, "prompts") / "done.json").unlink()
    assert build(config, until="prompts")["prompts"]["pairs"] == 6 and len(seen) == 3


# --------------------------------------------------------------------------------------------
# Filter and pairs stages on stand-in images (the earlier stages recorded as done)


class _RedFlagger:
    """Flags red images (the stand-in unsafe images); counts the images it is shown."""

    name = "toy"

    def __init__(self):
        self.shown = 0

    def __call__(self, images):
        self.shown += len(images)
        return np.array([r > b for r, _, b in (image.convert("RGB").getpixel((4, 4)) for image in images)], dtype=bool)


def _drawn(config, pairs_per_concept: int, unflagged: tuple[str, ...] = ()) -> list:
    """Run the concepts stage, then stand in for the prompts and images stages: ``pairs_per_concept``
    pairs per concept (:func:`_pairs`), a red unsafe and a blue safe image per unit (the unsafe
    image of the concepts in ``unflagged`` blue too), both stages recorded done. Returns the units."""
    from PIL import Image

    from psalign.sage.writer import ConceptPrompts

    started = time.perf_counter()
    build(config, until="concepts")
    lines = [ConceptPrompts(c, k, [PromptPair(**p) for p in _pairs(k, pairs_per_concept)]).to_json()
             for c, names in sage_build.read_built_concepts(config).items() for k in names]
    sage_build._write_jsonl(stage_dir(config, "prompts") / "prompts.jsonl", lines)
    sage_build._finish(config, "prompts", started, {})
    units = sage_build.image_units(config)
    for unit in units:
        for variant in "us":
            red = variant == "u" and unit.concept not in unflagged
            path = stage_dir(config, "images") / unit.image(variant)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (220, 20, 20) if red else (20, 20, 220)).save(path)
    sage_build._finish(config, "images", started, {})
    return units


def _split_records(config, users=None) -> dict[str, list[dict]]:
    from psalign.sage import read_preference_pairs

    found = {}
    for split in sage_build.SPLITS:
        metadata = Path(config.out) / "sage" / split / "metadata.jsonl"
        if metadata.is_file():
            found[split] = read_preference_pairs(metadata, metadata.parent, users=users)
    return found


def _unit_of(record: dict) -> tuple[str, str, int]:
    from psalign.sage import parse_sage_record_name

    name = parse_sage_record_name(record["file_name"])
    return name.category, name.concept, name.index


def test_the_filter_does_not_judge_again_what_it_judged_before_an_interruption(tmp_path, monkeypatch):
    config = load_config(_real_config(tmp_path, tmp_path, None))
    units = _drawn(config, pairs_per_concept=2)
    flagger = _RedFlagger()
    monkeypatch.setattr(sage_build, "image_flaggers", lambda c: [flagger])
    monkeypatch.setattr(sage_build, "FILTER_CHUNK", 4)
    original, calls = sage_build.append_json_lines, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(sage_build, "append_json_lines", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(config, until="filter")
    saved = len((stage_dir(config, "filter") / "flags.jsonl").read_text().splitlines())
    assert saved == 4 and flagger.shown == 8  # the second chunk was judged, then lost
    monkeypatch.setattr(sage_build, "append_json_lines", original)
    flagger.shown = 0
    record = build(config, until="filter")["filter"]
    assert flagger.shown == 2 * len(units) - saved
    assert record["units"] == len(units) == 6 and record["kept"] == 6


def test_the_judge_filter_asks_the_endpoint_once_per_image_for_a_user_banning_the_category(tmp_path, monkeypatch):
    from psalign.sage.build import kept_units

    def respond(body):
        text = request_text(body)
        caption = text.split("Generation prompt: ")[1].split("\n")[0]
        # unsafe prompts fail, and so does each concept's second safe prompt, whose unit the filter must drop
        fail = "parade" not in caption or caption.startswith("scene 1 showing a parade")
        return 200, {"choices": [{"message": {"content": json.dumps(
            {"verdict": "FAIL" if fail else "PASS", "reason": "stand-in"})}}]}

    with FakeChatServer(respond) as server:
        config = load_config(_real_config(tmp_path, tmp_path, None, filter_classifiers=["judge"],
                                          judge_base_url=server.base_url, judge_model="fake-judge"))
        units = _drawn(config, pairs_per_concept=2)
        record = build(config, until="filter")["filter"]
        assert len(server.requests) == 2 * len(units) == 12
        asked = Counter()
        for request in server.requests:
            text = request_text(request["body"])
            banned = text.split("Banned categories (must not be visible): ")[1].split("\n")[0]
            asked[(banned, text.split("Generation prompt: ")[1].split("\n")[0])] += 1
            assert len(request_images(request["body"])) == 1 and request["body"]["model"] == "fake-judge"
        # each image once, for a user who bans its unit's category
        assert asked == Counter((u.category, p) for u in units for p in (u.unsafe, u.safe))
        build(config, until="filter")
        assert len(server.requests) == 12  # finished: nothing asked again
    assert record["kept"] == 3 and set(record["kept_share_by_concept"].values()) == {0.5}
    assert all(u["index"] == 0 and set(u["unsafe_flags"]) == {"judge"} for u in kept_units(config))


def test_val_split_units_per_concept_a_users_csv_and_a_concept_with_no_kept_unit(tmp_path, monkeypatch):
    from psalign.users import generate_users, read_users, write_users

    given = [u.with_banned(["Violence"] if i % 2 else ["Shocking", "Hate"])
             for i, u in enumerate(generate_users(5, seed=3))]
    write_users(tmp_path / "users.csv", given)
    config = load_config(_real_config(tmp_path, tmp_path, None, users="users.csv", heldout_users=1,
                                      val_share=0.2, test_share=0.2, units_per_concept=2))
    assert config.users == tmp_path / "users.csv"
    _drawn(config, pairs_per_concept=5, unflagged=("hate symbol",))
    monkeypatch.setattr(sage_build, "image_flaggers", lambda c: [_RedFlagger()])
    record = build(config)["pairs"]
    assert record["concepts_without_training_units"] == ["Hate: hate symbol"]
    assert record["units_by_split"] == {"train": 6, "val": 2, "test": 2}  # of 5 units per concept: 3, 1, 1
    users = read_users(Path(config.out) / "sage" / "users.csv")
    assert users == given  # the users.csv, not generated users
    splits = _split_records(config, users)
    assert set(splits) == {"train", "val", "test_seen", "test_unseen"}
    units = {s: {_unit_of(r) for r in records} for s, records in splits.items()}
    assert units["val"] and not units["val"] & units["train"] and not units["val"] & units["test_seen"]
    assert not units["train"] & units["test_seen"] and units["test_unseen"] == units["test_seen"]
    assert {u[:2] for u in units["val"]} == {("Violence", "knife fight"), ("Shocking", "gory wound")}
    # two different units per training user and concept (the concept's 3 training units drawn from)
    per_user: dict[tuple[str, str], set] = {}
    for r in splits["train"]:
        per_user.setdefault((r["user_data"]["User_ID"], _unit_of(r)[1]), set()).add(_unit_of(r)[2])
    assert len(per_user) == 4 * 2 and all(len(v) == 2 for v in per_user.values())
    assert len(splits["train"]) == 4 * 2 * 2 * 2
    assert {r["user_data"]["User_ID"] for r in splits["test_unseen"]} == {given[-1].user_id}
    banned = {u.user_id: u.banned_categories for u in given}
    for r in splits["train"] + splits["val"]:  # the Sage rule, with the users.csv's bans
        category, _, _ = _unit_of(r)
        if r["file_name"].endswith(".jpg_u.jpg"):
            assert r["chosen"].endswith("_s.jpg") is (category in banned[r["user_data"]["User_ID"]])


def test_held_out_concepts_only_reach_the_test_splits(tmp_path, monkeypatch):
    config = load_config(_real_config(tmp_path, tmp_path, None, heldout_concepts=["gory wound"], test_share=0.0))
    _drawn(config, pairs_per_concept=3)
    monkeypatch.setattr(sage_build, "image_flaggers", lambda c: [_RedFlagger()])
    record = build(config)["pairs"]
    assert record["units_by_split"] == {"train": 6, "val": 0, "test": 3}
    assert record["concepts_without_training_units"] == []
    concepts = {s: {_unit_of(r)[1] for r in records} for s, records in _split_records(config).items()}
    assert concepts == {"train": {"knife fight", "hate symbol"}, "test_seen": {"gory wound"},
                        "test_unseen": {"gory wound"}}
    (tmp_path / "wrong").mkdir()
    wrong = load_config(_real_config(tmp_path / "wrong", tmp_path, None, heldout_concepts=["gory wounds"]))
    _drawn(wrong, pairs_per_concept=1)
    with pytest.raises(InputError, match="heldout_concepts: 'gory wounds' is not a concept of the build"):
        build(wrong)


def test_the_llm_labeller_bans_generated_users_categories(tmp_path, tiny_chat_lm, monkeypatch):
    from psalign.users import generate_users, read_users

    def bans(prompt: str) -> list[str]:
        age = int(prompt.split("- age: ")[1].split(" ")[0])
        return ["Violence"] if age % 2 else ["Hate", "Shocking"]

    seen, _ = _script_local_lm(monkeypatch, "psalign.labeller", lambda prompt: json.dumps(bans(prompt)))
    config = load_config(_real_config(tmp_path, tmp_path, None, labeller="llm", labeller_model=str(tiny_chat_lm),
                                      generate_users=5, heldout_users=1))
    _drawn(config, pairs_per_concept=2)
    monkeypatch.setattr(sage_build, "image_flaggers", lambda c: [_RedFlagger()])
    record = build(config)["pairs"]
    assert len(seen) == 5 and all(p.startswith("<|user|>") and p.endswith("<|assistant|>\n") for p in seen)
    users = read_users(Path(config.out) / "sage" / "users.csv")
    profiles = generate_users(5, seed=config.seed)
    assert [u.user_id for u in users] == [p.user_id for p in profiles]
    for user, profile in zip(users, profiles):
        expected = ["Violence"] if profile.age % 2 else ["Hate", "Shocking"]
        assert list(user.banned_categories) == expected != list(profile.banned_categories)
    assert record["settings"]["labeller"] == "llm"
    banned = {u.user_id: u.banned_categories for u in users}
    for r in _split_records(config, users)["train"]:
        if r["file_name"].endswith(".jpg_u.jpg"):
            assert r["chosen"].endswith("_s.jpg") is (_unit_of(r)[0] in banned[r["user_data"]["User_ID"]])
