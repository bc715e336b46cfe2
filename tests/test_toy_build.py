"""Pieces of the toy build: resumable training loops, the toy population, the toy world's run of the
Sage build pipeline (concepts, template writer, detector filter, substitution pairs), and the bundle lookup."""

from pathlib import Path

import pytest
import torch

from psalign.categories import CATEGORIES
from psalign.io import InputError
from psalign.toy import build as toy_build
from psalign.toy.render import render
from psalign.toy.sage_data import (
    SUBSTITUTION_INDEX,
    ToyTemplateWriter,
    substitution_decoy,
    substitution_units,
    toy_concepts,
    toy_users,
)
from psalign.toy.world import OBJECTS, ToyObject, seen_concepts


def _run(tmp_path, steps, fail_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    data = torch.randn(16, 3)

    def loss_fn(step):
        if step == fail_at:
            raise KeyboardInterrupt
        rng = toy_build._step_rng(0, 9, step)
        batch = data[torch.from_numpy(rng.integers(16, size=4))]
        return model(batch).pow(2).mean()

    log, earlier = toy_build._train("t", {"m": model}, optimizer, loss_fn, steps, tmp_path / "ck.pt", every=2,
                                    schedule=lambda step: toy_build._lr_factor(step, 2, steps))
    return model, log, earlier


def test_training_loop_resumes_exactly_where_it_stopped(tmp_path):
    straight, straight_log, _ = _run(tmp_path / "a", steps=6)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", steps=6, fail_at=5)  # checkpoint at step 4, then killed
    resumed, resumed_log, earlier = _run(tmp_path / "b", steps=6)
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)
    assert earlier > 0  # the interrupted process's time is carried over
    assert [e["step"] for e in resumed_log] == [e["step"] for e in straight_log] == [6]


class _WritesAFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_stage_checkpoint_is_refused_without_running_it(tmp_path):
    marker, folder = tmp_path / "ran", tmp_path / "b"
    folder.mkdir()
    torch.save({"step": 4, "m": _WritesAFileWhenUnpickled(marker)}, folder / "ck.pt")
    with pytest.raises(toy_build.TensorFileError, match=r"ck\.pt holds more than tensors.*delete it to restart"):
        _run(folder, steps=6)
    assert not marker.exists()


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    factors = [toy_build._lr_factor(step, warmup=10, total=100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_toy_users_have_rule_and_random_bans_and_distinct_ids():
    train, heldout = toy_users(200, 40, seed=3, random_ban_share=0.5)
    ids = [u.user_id for u in train + heldout]
    assert len(set(ids)) == 240 and heldout[0].user_id == "0000201"
    rule_sets = {(), ("Hate", "Propaganda"), ("Harassment", "Shocking"), ("Violence", "Self-Harm", "Sexuality")}

    def rule_made(banned):  # a union of the rule engine's three groups
        return any(set(banned) == set().union(*combo) for k in range(4) for combo in _combinations(rule_sets, k))

    off_rule = sum(not rule_made(u.banned_categories) for u in train)
    assert 0.25 * len(train) < off_rule < 0.6 * len(train)
    assert toy_users(200, 40, seed=3, random_ban_share=0.5) == (train, heldout)  # seeded
    only_rules, _ = toy_users(200, 0, seed=3, random_ban_share=0.0)
    assert all(rule_made(u.banned_categories) for u in only_rules)
    for user in train:
        assert set(user.banned_categories) | set(user.allowed_categories) == set(CATEGORIES)


def test_uniform_ban_sizes_give_every_count_as_often_and_binomial_is_the_bundled_draw():
    from collections import Counter

    from psalign.toy.bundle import BUNDLE_DIR
    from psalign.users import read_users

    train, _ = toy_users(1400, 0, seed=0, random_ban_share=1.0, random_ban_sizes="uniform")
    counts = Counter(len(u.banned_categories) for u in train)
    assert sorted(counts) == list(range(len(CATEGORIES) + 1))
    assert all(120 < counts[k] < 230 for k in counts)  # 175 expected each (binomial: 11 lone-free users, 547 with 3)
    binomial, _ = toy_users(1400, 0, seed=0, random_ban_share=1.0)
    assert Counter(len(u.banned_categories) for u in binomial)[1] < 0.5 * counts[1]
    # the default draw is the one the bundled users were made with
    bundled = read_users(BUNDLE_DIR / "users_train.csv")
    assert toy_users(len(bundled), 0, seed=0, random_ban_share=0.8)[0] == bundled
    with pytest.raises(ValueError, match="random_ban_sizes"):
        toy_users(10, 0, seed=0, random_ban_share=1.0, random_ban_sizes="poisson")


def _combinations(items, k):
    import itertools

    return itertools.combinations(sorted(items), k)


def test_toy_concepts_are_the_seen_concepts_and_the_template_writer_pairs_every_object():
    concepts = toy_concepts()
    assert list(concepts) == list(CATEGORIES)
    assert all(concepts[c] == list(seen_concepts(c)) for c in CATEGORIES)
    result = ToyTemplateWriter().write("Violence", "a fierce clash", len(OBJECTS))
    assert [(p.unsafe, p.safe) for p in result.pairs] == [(o.caption("a fierce clash"), o.caption()) for o in OBJECTS]
    assert result.rejected == []
    with pytest.raises(ValueError, match="at most 12 prompts"):
        ToyTemplateWriter().write("Violence", "a fierce clash", len(OBJECTS) + 1)


def _kept_units() -> list[dict]:
    """Filter-stage lines of one kept unit per (seen concept, object)."""
    units = []
    for category in CATEGORIES:
        for concept in seen_concepts(category):
            for index, obj in enumerate(OBJECTS):
                stem = f"{category.lower()}_{concept.replace(' ', '_')}_{index:05d}"
                units.append({"category": category, "concept": concept, "index": index, "unsafe": obj.caption(concept),
                              "safe": obj.caption(), "unsafe_image": f"{stem}_u.jpg", "safe_image": f"{stem}_s.jpg",
                              "kept": True})
    return units


def test_substitution_pairs_reject_another_categorys_marker_on_the_same_object_for_banned_categories_only(tmp_path):
    import numpy as np

    from psalign.sage import SageUnit, build_preference_pairs, chosen_captions
    from psalign.toy.sage_data import copy_decoy_images

    users, _ = toy_users(6, 0, seed=1, random_ban_share=1.0)
    kept = _kept_units()
    by_image = {u["unsafe_image"]: u for u in kept}
    plain = [SageUnit(user.user_id, u["category"], u["concept"], u["index"], u["safe"], u["unsafe"],
                      f"img/{u['safe_image']}", f"img/{u['unsafe_image']}") for user in users for u in kept[::12]]
    records = build_preference_pairs(plain, users)
    decoys = substitution_units(records, users, kept, "img", np.random.default_rng(0))
    expected = sum(len(seen_concepts(c)) for user in users for c in user.banned_categories)
    assert len(decoys) == expected > 0
    for decoy in decoys:
        user = next(u for u in users if u.user_id == decoy.user_id)
        assert decoy.category in user.banned_categories and decoy.index == SUBSTITUTION_INDEX
        copied = decoy.unsafe_image.removeprefix("img/decoys/")
        source = by_image[copied.removesuffix("_decoy.jpg") + "_u.jpg"]
        assert source["category"] != decoy.category  # another category's marker, on the prompt's object
        assert source["safe"] == decoy.safe_caption and decoy.unsafe_caption == f"{decoy.safe_caption} with {decoy.concept}"
    decoy_records = build_preference_pairs(decoys, users)
    assert all(r["rejected"].endswith("_decoy.jpg") and r["chosen"].endswith("_s.jpg") for r in decoy_records)
    # no record claims its own caption drew a decoy, so the safe-anchor captions stay consistent
    captions = chosen_captions(records + decoy_records)
    assert captions[len(records):] == [unit.safe_caption for unit in decoys for _ in (0, 1)]
    # the decoy images are copies of the kept units' unsafe images
    (tmp_path / "img").mkdir()
    for unit in kept:
        (tmp_path / "img" / unit["unsafe_image"]).write_bytes(unit["unsafe_image"].encode())
    copy_decoy_images(decoys, tmp_path / "img", "img")
    for decoy in decoys:
        copied = tmp_path / decoy.unsafe_image
        assert copied.read_bytes() == (copied.name.removesuffix("_decoy.jpg") + "_u.jpg").encode()


def test_substitution_decoy_names_the_object_it_cannot_find():
    import numpy as np

    only_violence = [u for u in _kept_units() if u["category"] == "Violence"]
    with pytest.raises(RuntimeError, match="red square outside Violence"):
        substitution_decoy(only_violence, "Violence", ToyObject("red", "square"), np.random.default_rng(0))


@pytest.mark.parametrize(
    "unsafe_marker, safe_marker, kept",
    [
        ("Violence", None, True),
        (None, None, False),  # the unsafe image lacks a marker
        ("Violence", "Violence", False),  # the safe image has one
        ("Hate", None, True),  # the rule of every InPro classifier: flagged, whatever the category
    ],
)
def test_toy_units_are_kept_when_the_detector_flags_the_unsafe_image_only(tmp_path, unsafe_marker, safe_marker, kept):
    import json

    from psalign.sage.build import run_filter, stage_dir
    from psalign.sage.config import load_config

    config = load_config(None, {"world": "toy", "out": str(tmp_path), "prompts_per_concept": "1",
                                "images_per_prompt": "1"})
    obj = ToyObject("red", "square")
    line = {"category": "Violence", "concept": "a fierce clash", "requests": 0, "rejected": [],
            "pairs": [{"unsafe": obj.caption("a fierce clash"), "safe": obj.caption()}]}
    (stage_dir(config, "prompts")).mkdir(parents=True)
    (stage_dir(config, "prompts") / "prompts.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    images = stage_dir(config, "images")
    images.mkdir()
    render(obj, unsafe_marker).save(images / "violence_a_fierce_clash_00000_u.jpg", quality=95, subsampling=0)
    render(obj, safe_marker).save(images / "violence_a_fierce_clash_00000_s.jpg", quality=95, subsampling=0)
    record = run_filter(config)
    assert record["kept"] == int(kept) and record["kept_share_by_category"] == {"Violence": float(kept)}


def test_bundled_paths_name_what_is_missing(tmp_path):
    from psalign.toy.bundle import bundled_paths

    (tmp_path / "model").mkdir()
    with pytest.raises(FileNotFoundError, match="python -m psalign.toy build"):
        bundled_paths(tmp_path)


def test_build_rejects_an_unknown_stage(tmp_path):
    with pytest.raises(ValueError, match="unknown stage"):
        toy_build.build(toy_build.BuildConfig(work=tmp_path), until="nope")
    assert list(tmp_path.iterdir()) == []


def test_bundled_training_arguments_name_build_paths_not_the_building_machine(tmp_path):
    from psalign.toy.bundle import portable_paths

    work = tmp_path / "toy_build"
    args = {"pretrained_model": str(work / "model"), "train_data": str(work / "sage" / "metadata.jsonl"),
            "embeds_folder": "/elsewhere/embeds", "cache_dir": None, "resume_from_checkpoint": "latest",
            "beta_dpo": 30.0}
    portable = portable_paths(args, work)
    assert portable == {**args, "pretrained_model": "<build>/model", "train_data": "<build>/sage/metadata.jsonl"}
    assert args["pretrained_model"] == str(work / "model")  # the input is left alone


def test_each_stage_records_its_own_thread_count_and_the_model_card_shows_it(tmp_path):
    import json
    import time

    from psalign.toy.bundle import BUNDLE_DIR, model_card

    config = toy_build.BuildConfig(work=tmp_path, threads=3)
    record = toy_build._finish(config, "sage", time.perf_counter(), {"records": 5})
    assert record["threads"] == 3
    assert json.loads((tmp_path / "sage" / toy_build.DONE_FILE).read_text()) == record
    info = json.loads((BUNDLE_DIR / "build_info.json").read_text())
    info["stages"]["sage"] = {**info["stages"]["sage"], "seconds": 12.5, "threads": 3}
    info["stages"]["psa"].pop("threads", None)  # a stage finished before threads were recorded
    card = model_card(info)
    assert "sage 12.5 s (3 thread(s))" in card
    assert f"psa {info['stages']['psa']['seconds']:g} s (? thread(s))" in card


def test_model_card_says_when_the_adapter_saw_substitution_pairs():
    import json

    from psalign.toy.bundle import BUNDLE_DIR, model_card

    info = json.loads((BUNDLE_DIR / "build_info.json").read_text())
    info["build_config"]["substitution_pairs"] = False
    assert "substitution pairs" not in model_card(info)
    info["build_config"]["substitution_pairs"] = True
    assert "substitution pairs" in model_card(info)
    assert "drawn uniformly" not in model_card(info)
    info["build_config"]["random_ban_sizes"] = "uniform"
    assert "random subset instead (its size drawn uniformly from 0 to 7)" in model_card(info)


def test_build_flags_reach_the_config():
    import argparse

    parser = toy_build.add_build_arguments(argparse.ArgumentParser())
    defaults = toy_build.config_from_args(parser.parse_args([]))
    assert (defaults.random_ban_share, defaults.substitution_pairs) == (0.8, False)
    assert defaults.profile_template == toy_build.TOY_PROFILE_TEMPLATE
    assert defaults.random_ban_sizes == "binomial"
    args = parser.parse_args(["--random_ban_share", "0.6", "--substitution_pairs", "--random_ban_sizes", "uniform",
                              "--profile_template", "Bans: {banned}. Allows: {allowed}."])
    config = toy_build.config_from_args(args)
    assert (config.random_ban_share, config.substitution_pairs, config.random_ban_sizes) == (0.6, True, "uniform")
    assert config.profile_template == "Bans: {banned}. Allows: {allowed}."
    with pytest.raises(ValueError, match="random_ban_share"):
        toy_build.config_from_args(parser.parse_args(["--random_ban_share", "1.5"]))
    with pytest.raises(InputError, match="profile_template"):
        toy_build.config_from_args(parser.parse_args(["--profile_template", "bans {banend}"]))


def test_work_dir_is_the_work_folders_flag_and_work_its_alias(tmp_path):
    import argparse

    parser = toy_build.add_build_arguments(argparse.ArgumentParser())
    assert parser.parse_args(["--work_dir", str(tmp_path)]).work == tmp_path
    assert parser.parse_args(["--work", str(tmp_path)]).work == tmp_path
    assert "--work_dir DIR, --work DIR" in parser.format_help()


def test_model_card_names_the_objective_that_trained_the_adapter():
    import json

    from psalign.toy.bundle import BUNDLE_DIR, model_card

    info = json.loads((BUNDLE_DIR / "build_info.json").read_text())
    objective = info["stages"]["psa"]["objective"]
    objective.pop("objective", None)  # a record from before objectives were recorded: Diffusion-DPO
    assert "Objective:\n  Diffusion-DPO with beta" in model_card(info) and "safe anchor" not in model_card(info)
    objective.update(objective="safe_anchor")
    assert "`safe_anchor`: the safe anchor" in model_card(info)
    objective.update(objective="dpo_safe_anchor", anchor_loss_weight=2.0)
    assert "`dpo_safe_anchor`: Diffusion-DPO with beta" in model_card(info) and "plus 2 x the safe anchor" in model_card(info)
    objective.update(objective="dpo_chosen_target", chosen_target_weight=6.0, snr_gamma=5.0)
    assert "`dpo_chosen_target`: Diffusion-DPO with beta" in model_card(info)
    assert "plus 6 x the chosen target" in model_card(info) and "gamma 5" in model_card(info)
    objective.update(objective="kv_anchor", text_edit_layers=2)
    stated = model_card(info).split("Objective:")[1].split("Last logged")[0]
    assert stated.strip().startswith("`kv_anchor`: the cross-attention keys and values") and "Diffusion-DPO" not in stated
    assert "a user text edit of 2 blocks" in stated
    objective.update(text_edit_layers=0)
    assert "text edit of" not in model_card(info)


def test_base_from_reuses_a_bundles_model_and_records_and_never_overwrites(tmp_path):
    import json

    from psalign.toy.bundle import BUNDLE_DIR

    config = toy_build.BuildConfig(work=tmp_path / "work")
    assert config.out == tmp_path / "work" / "bundle"  # never the package's assets unless asked
    toy_build.reuse_base_model(config, BUNDLE_DIR)
    bundled = json.loads((BUNDLE_DIR / "build_info.json").read_text())["stages"]
    for stage in ("vae", "base"):
        record = toy_build.stage_done(config, stage)
        assert record == {**bundled[stage], "reused_from": str(BUNDLE_DIR)}
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "work" / "model" / unet).read_bytes() == (BUNDLE_DIR / "model" / unet).read_bytes()
    with pytest.raises(FileExistsError, match="model exists"):
        toy_build.reuse_base_model(config, BUNDLE_DIR)
    assert toy_build.stage_done(config, "safetydpo") is None
    with_lora = toy_build.BuildConfig(work=tmp_path / "with_lora")
    toy_build.reuse_base_model(with_lora, BUNDLE_DIR, safetydpo=True)
    assert toy_build.stage_done(with_lora, "safetydpo")["reused_from"] == str(BUNDLE_DIR)
    lora = "pytorch_lora_weights.safetensors"
    assert (tmp_path / "with_lora" / "safetydpo" / "merged" / lora).read_bytes() == (BUNDLE_DIR / "safetydpo" / lora).read_bytes()


def test_build_toy_sage_writes_users_and_substitution_pairs_and_names_a_concept_without_units(
    tmp_path, monkeypatch, one_torch_thread
):
    import shutil

    from psalign.categories import category_token
    from psalign.sage import parse_sage_record_name, read_preference_pairs
    from psalign.sage import config as sage_config
    from psalign.toy import bundled_model_path, sage_data
    from psalign.users import read_users

    # a tiny toy Sage build: three categories, one seen concept each, two objects, one seed per pair
    concepts = {c: [seen_concepts(c)[0]] for c in ("Hate", "Violence", "Shocking")}
    monkeypatch.setattr(sage_data, "toy_concepts", lambda: concepts)
    monkeypatch.setitem(sage_config.TOY_DEFAULTS, "prompts_per_concept", 2)
    folder = tmp_path / "sage"
    settings = dict(model_dir=bundled_model_path(), folder=folder, train_users=3, heldout_users=1,
                    random_ban_share=1.0, substitution_pairs=True, pool_seeds=1, seed=0, steps=20,
                    guidance_scale=3.0, batch_size=12)
    result = sage_data.build_toy_sage(**settings)

    train, heldout = toy_users(3, 1, seed=0, random_ban_share=1.0)
    assert read_users(folder / "users_train.csv") == train and read_users(folder / "users_heldout.csv") == heldout
    assert read_users(folder / "users.csv") == train + heldout and heldout[0].user_id == "0000004"
    assert read_users(folder / "sage" / "users_heldout.csv") == heldout  # the pipeline held out the same user
    assert result["train_users"] == 3 and result["heldout_users"] == 1 and result["pool_units"] == 6

    metadata = folder / sage_data.TRAIN_METADATA
    records = read_preference_pairs(metadata, metadata.parent, users=train)
    assert result["records"] == len(records)
    names = [parse_sage_record_name(r["file_name"]) for r in records]
    plain = [r for r, n in zip(records, names) if n.index < SUBSTITUTION_INDEX]
    extra = [(r, n) for r, n in zip(records, names) if n.index >= SUBSTITUTION_INDEX]
    assert len(plain) == 3 * 3 * 2  # users x concepts x (unsafe, safe caption), one unit each
    banned = {u.user_id: set(u.banned_categories) for u in train}
    assert len(extra) == 2 * sum(len(b & set(concepts)) for b in banned.values()) > 0
    images = folder / "images"
    for record, name in extra:
        assert name.category in banned[name.user_id]
        decoy = metadata.parent / record["rejected"]
        source = images / decoy.name.replace("_decoy.jpg", "_u.jpg")
        assert decoy.parent.name == sage_data.DECOY_FOLDER and decoy.read_bytes() == source.read_bytes()
        assert not source.name.startswith(category_token(name.category) + "_")  # another category's marker
        assert record["chosen"].endswith("_s.jpg")

    # the model drew no marker for one concept: its unsafe images look like its safe ones
    for stage in ("filter", "pairs"):
        shutil.rmtree(folder / stage)
    token = f"{category_token('Violence')}_{concepts['Violence'][0].replace(' ', '_')}_"
    for unsafe in images.glob(f"{token}*_u.jpg"):
        shutil.copyfile(unsafe.with_name(unsafe.name.replace("_u.jpg", "_s.jpg")), unsafe)
    missing = rf"no usable image pair for the concepts \['Violence: {concepts['Violence'][0]}'\]"
    with pytest.raises(RuntimeError, match=missing):
        sage_data.build_toy_sage(**settings)


@pytest.mark.parametrize("name", ["toy.yaml", "toy_safe_anchor.yaml", "toy_chosen_target.yaml", "toy_kv_anchor.yaml"])
def test_shipped_toy_configs_point_at_the_default_build_folders(name):
    """The configs say they run after the build's first four stages from the repository root: their
    model, data and embeddings paths are those the build itself passes for ``--work_dir toy_build``."""
    import yaml

    from psalign.toy.build import BuildConfig, psa_overrides

    path = Path(__file__).resolve().parents[1] / "configs" / name
    values = yaml.safe_load(path.read_text(encoding="utf-8"))
    expected = psa_overrides(BuildConfig(work="toy_build"))
    for key in ("pretrained_model", "train_data", "embeds_folder"):
        assert Path(values[key]) == Path(expected[key]), key
