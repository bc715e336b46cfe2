"""The user text edit (psalign.adapter.text_edit) and the kv_anchor objective that trains it: the pure
loss by hand, the edit in the UNet on both processor paths, saving and loading, the step function,
training runs on tiny SD1.5- and SDXL-shaped pipelines, config checks and init_adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from psalign.adapter import PSAAdapter, inspect_adapter, load_adapter
from psalign.adapter.adapter import FORMAT_VERSION
from psalign.adapter.text_edit import UserTextEdit, text_edit_heads
from psalign.formats import PSA_CONFIG_NAME
from psalign.io import InputError
from psalign.loss import kv_anchor_loss
from psalign.training import PSATrainer, load_training_config, read_metrics, train
from psalign.training.conditioning import TextConditioning
from psalign.training.objectives import OBJECTIVES, cross_attention_kv, kv_anchor_step_loss

from .training_support import USER_DIM, tiny_config, train_whole_and_resumed, write_sage_training_set

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REQUIRED = dict(pretrained_model="m", train_data="d", embeds_folder="e", output_dir="o")


def load_unet(path: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False).eval()


def sd15_inputs(unet, batch: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=gen),
        "timestep": torch.tensor([10.0 * (i + 1) for i in range(batch)]),
        "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen),
    }


def randomize_edit_output(adapter: PSAAdapter, seed: int = 1) -> PSAAdapter:
    """Random values for the text edit's zero-initialised output projection (a 'trained' edit)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.text_edit.proj_out.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return adapter


def randomize(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return module


def run(unet, adapter, inputs, users=None):
    with torch.no_grad():
        if users is not None:
            adapter.activate(adapter(users))
        return unet(**inputs).sample


# ---------------------------------------------------------------------------------------------- pure loss


def test_kv_anchor_loss_is_the_mean_of_the_per_tensor_mean_squared_errors():
    adapted = [torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[2.0], [0.0], [1.0]]])]  # (1, 1, 2) and (1, 3, 1)
    anchor = [torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0.0], [0.0], [0.0]]])]
    for tensor in adapted + anchor:
        tensor.requires_grad_(True)
    out = kv_anchor_loss(adapted, anchor)
    # entry 0: (1 + 4) / 2 = 2.5; entry 1: (4 + 0 + 1) / 3 = 5/3; mean (2.5 + 5/3) / 2
    expected = (2.5 + 5 / 3) / 2
    assert out.loss.item() == pytest.approx(expected)
    assert list(out.logged) == ["loss", "kv_anchor_mse"]
    assert out.metrics() == pytest.approx({"loss": expected, "kv_anchor_mse": expected})
    out.loss.backward()
    # d/da of mean_j mean_i (a - b)^2 = 2 (a - b) / (n_j values * 2 entries)
    assert adapted[0].grad.flatten().tolist() == pytest.approx([0.5, 1.0])
    assert adapted[1].grad.flatten().tolist() == pytest.approx([2 / 3, 0.0, 1 / 3])
    assert all(a.grad is None for a in anchor)  # the frozen keys and values are a target, not trained


def test_kv_anchor_loss_refuses_mismatched_or_empty_lists():
    with pytest.raises(ValueError, match="equally long, non-empty lists; got 2 and 1"):
        kv_anchor_loss([torch.zeros(1, 2, 3)] * 2, [torch.zeros(1, 2, 3)])
    with pytest.raises(ValueError, match="non-empty lists; got 0 and 0"):
        kv_anchor_loss([], [])
    with pytest.raises(ValueError, match=r"pair up in shape; got \(1, 2, 3\) and \(1, 3, 3\)"):
        kv_anchor_loss([torch.zeros(1, 2, 3)], [torch.zeros(1, 3, 3)])


# ---------------------------------------------------------------------------------------------- the edit


def test_text_edit_is_per_token_bidirectional_and_user_conditioned():
    torch.manual_seed(0)
    edit = UserTextEdit(32, num_layers=2, num_heads=text_edit_heads(32)).eval()
    text, users = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    assert torch.equal(edit(text, users), text)  # zero-initialised output: a fresh edit is the identity
    randomize(edit.proj_out)
    with torch.no_grad():
        delta = edit(text, users) - text
        later = text.clone()
        later[:, 4] = torch.randn(2, 32)  # change a later token only (not by a constant: LayerNorm drops that)
        changed = edit(later, users) - later
        other_user = edit(text, torch.randn(2, 3, 32)) - text
    assert not torch.allclose(delta[:, 0], delta[:, 1], atol=1e-3)  # per token, not one shift for all
    assert not torch.allclose(changed[:, 1], delta[:, 1], atol=1e-4)  # an earlier token sees the later one
    assert not torch.allclose(other_user, delta, atol=1e-4)
    assert edit(text.to(torch.bfloat16), users).dtype == torch.bfloat16  # returned in the text's dtype
    assert text_edit_heads(32) == 1 and text_edit_heads(768) == 768 // 64
    with pytest.raises(ValueError, match="at least one layer"):
        UserTextEdit(32, num_layers=0, num_heads=1)
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        UserTextEdit(32, num_layers=1, num_heads=3)


def test_edit_text_scales_the_edit_and_is_a_no_op_without_an_edit(tiny_sd15_path):
    unet = load_unet(tiny_sd15_path)
    adapter = randomize_edit_output(PSAAdapter.for_unet(unet, USER_DIM, text_edit_layers=2).attach(unet))
    text, users = torch.randn(2, 77, 32), torch.randn(2, USER_DIM)
    with torch.no_grad():
        full = adapter.edit_text(text, adapter(users, scale=1.0))
        half = adapter.edit_text(text, adapter(users, scale=0.5))
        assert torch.equal(adapter.edit_text(text, adapter(users, scale=0.0)), text)
    assert not torch.allclose(full, text, atol=1e-3)
    torch.testing.assert_close(half, (text + full) / 2)
    adapter.detach(unet)
    plain = PSAAdapter.for_unet(unet, USER_DIM).attach(unet)
    assert plain.text_edit is None and plain.config.text_edit_layers == 0
    conditioning = plain(users)
    assert conditioning.user_tokens is None and plain.edit_text(text, conditioning) is text


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_the_adapter_forward_with_text_returns_only_the_edit(tiny_sd15_path, num_tokens):
    """What kv_anchor calls through the DDP wrapper: the edited text and the user tokens, and none of
    the additive branch's tensors (DDP would wait for gradients that never come)."""
    unet = load_unet(tiny_sd15_path)
    adapter = randomize_edit_output(
        PSAAdapter.for_unet(unet, USER_DIM, num_user_tokens=num_tokens, text_edit_layers=1).attach(unet))
    text, users = torch.randn(2, 77, 32), torch.randn(2, USER_DIM)
    with torch.no_grad():
        only_edit = adapter(users, text=text)
        torch.testing.assert_close(only_edit.edited_text, adapter.edit_text(text, adapter(users)))
    assert only_edit.user_tokens is not None
    assert (only_edit.output_offsets, only_edit.user_keys, only_edit.user_values) == (None, None, None)
    adapter.detach(unet)
    with pytest.raises(ValueError, match="no text edit"):
        PSAAdapter.for_unet(unet, USER_DIM).attach(unet)(users, text=text)


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_fresh_edit_is_the_identity_and_a_trained_one_changes_the_output_per_user(tiny_sd15_path, num_tokens):
    """num_tokens 1: the processor's fast path; 2: the general path. The additive user branch stays
    at its zero init, so any change comes from the text edit."""
    unet = load_unet(tiny_sd15_path)
    inputs = sd15_inputs(unet, batch=2)
    base = run(unet, None, inputs)
    adapter = PSAAdapter.for_unet(unet, USER_DIM, num_user_tokens=num_tokens, text_edit_layers=2).attach(unet)
    assert adapter.uses_fast_path == (num_tokens == 1)
    assert len(adapter.text_edit.blocks) == 2
    users = torch.randn(2, USER_DIM)
    assert torch.equal(run(unet, adapter, inputs, users), base)
    randomize_edit_output(adapter)
    edited = run(unet, adapter, inputs, users)
    assert not torch.allclose(edited, base, atol=1e-4)
    assert not torch.allclose(run(unet, adapter, inputs, torch.randn(2, USER_DIM)), edited, atol=1e-4)
    with adapter.disabled():
        assert torch.equal(run(unet, adapter, inputs), base)


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_cross_attention_kv_is_what_the_layers_compute_from_the_edited_text(tiny_sd15_path, num_tokens):
    """The keys and values kv_anchor trains are the ones each cross-attention layer projects in a
    UNet pass with the adapter's edit active, on either processor path."""
    unet = load_unet(tiny_sd15_path)
    adapter = randomize_edit_output(
        PSAAdapter.for_unet(unet, USER_DIM, num_user_tokens=num_tokens, text_edit_layers=1).attach(unet))
    inputs, users = sd15_inputs(unet, batch=2), torch.randn(2, USER_DIM)
    seen = {}
    for index, attn in enumerate(adapter.attention_layers):
        for kind, projection in (("k", attn.to_k), ("v", attn.to_v)):
            projection.register_forward_hook(
                lambda module, args, output, key=(index, kind): seen.__setitem__(key, output.detach()))
    run(unet, adapter, inputs, users)
    layers = adapter.attention_layers
    assert len(seen) == 2 * len(layers) == 2 * len(adapter.config.layer_names)
    with torch.no_grad():
        kv = cross_attention_kv(layers, adapter.edit_text(inputs["encoder_hidden_states"], adapter(users)))
    for index in range(len(layers)):
        torch.testing.assert_close(kv[2 * index], seen[(index, "k")])
        torch.testing.assert_close(kv[2 * index + 1], seen[(index, "v")])


def test_the_edit_runs_once_per_unet_call_for_keyword_or_positional_text_and_leaves_with_detach(tiny_sd15_path):
    unet = load_unet(tiny_sd15_path)
    inputs, users = sd15_inputs(unet, batch=2), torch.randn(2, USER_DIM)
    base = run(unet, None, inputs)
    adapter = randomize_edit_output(PSAAdapter.for_unet(unet, USER_DIM, text_edit_layers=1).attach(unet))
    calls = []
    adapter.text_edit.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    keyword = run(unet, adapter, inputs, users)
    assert calls == [(2, 77, 32)]  # one edit shared by every cross-attention layer
    with torch.no_grad():
        positional = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    assert torch.equal(positional, keyword) and len(calls) == 2
    with pytest.raises(ValueError, match="the user conditioning has 2 rows but the UNet batch has 1"):
        unet(**{k: v[:1] for k, v in inputs.items()})
    adapter.detach(unet)
    assert torch.equal(run(unet, None, inputs), base) and len(calls) == 2  # no processor, no hook left


def test_a_text_edit_refuses_a_unet_that_projects_the_text_first(tiny_sd15_path):
    unet = load_unet(tiny_sd15_path)
    unet.encoder_hid_proj = torch.nn.Linear(32, 32)
    PSAAdapter.for_unet(unet, USER_DIM).attach(unet)  # the published branch does not read the text
    unet = load_unet(tiny_sd15_path)
    unet.encoder_hid_proj = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match="encoder_hid_proj"):
        PSAAdapter.for_unet(unet, USER_DIM, text_edit_layers=1).attach(unet)


# ---------------------------------------------------------------------------------------------- saving


def test_save_load_round_trip_of_an_edit_and_the_format_versions(tiny_sd15_path, tmp_path):
    unet = load_unet(tiny_sd15_path)
    adapter = randomize(PSAAdapter.for_unet(unet, USER_DIM, text_edit_layers=2))
    adapter.set_embedding_stats(torch.randn(USER_DIM), torch.rand(USER_DIM) + 0.5)
    adapter.save_pretrained(tmp_path / "edit")
    saved = json.loads((tmp_path / "edit" / PSA_CONFIG_NAME).read_text())
    assert saved["format_version"] == FORMAT_VERSION == 2 and saved["text_edit_layers"] == 2
    assert inspect_adapter(tmp_path / "edit").text_edit_layers == 2

    loaded = load_adapter(tmp_path / "edit", unet)
    assert loaded.text_edit is not None and len(loaded.text_edit.blocks) == 2
    assert adapter.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in adapter.state_dict().items())
    inputs, users = sd15_inputs(unet, batch=2), torch.randn(2, USER_DIM)
    out_loaded = run(unet, loaded, inputs, users)
    loaded.detach(unet)
    assert torch.equal(run(unet, adapter.attach(unet), inputs, users), out_loaded)

    # without a text edit: still written as version 1, which older psalign reads
    PSAAdapter.for_unet(unet, USER_DIM).save_pretrained(tmp_path / "plain")
    plain_file = tmp_path / "plain" / PSA_CONFIG_NAME
    plain = json.loads(plain_file.read_text())
    assert plain["format_version"] == 1 and plain["text_edit_layers"] == 0
    del plain["text_edit_layers"]  # as a version-1 config written before the text edit existed
    plain_file.write_text(json.dumps(plain))
    assert PSAAdapter.from_pretrained(tmp_path / "plain").text_edit is None

    newer = tmp_path / "edit" / PSA_CONFIG_NAME
    newer.write_text(json.dumps({**saved, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1} is newer than this psalign supports"):
        PSAAdapter.from_pretrained(tmp_path / "edit")
    with pytest.raises(ValueError, match="is newer than this psalign supports"):
        inspect_adapter(tmp_path / "edit")


# ---------------------------------------------------------------------------------------------- step


def _step_inputs(pairs: int = 3):
    torch.manual_seed(0)
    text, anchor = TextConditioning(torch.randn(pairs, 77, 32)), TextConditioning(torch.randn(pairs, 77, 32))
    return text, anchor, torch.randn(pairs, USER_DIM), torch.zeros(pairs, dtype=torch.bool)


def _failing_unet(unet):
    def called(module, args):
        raise AssertionError("the kv_anchor step ran the UNet")

    unet.register_forward_pre_hook(called)
    return unet


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_kv_anchor_step_trains_only_the_edit_and_the_user_projection(tiny_sd15_path, num_tokens):
    unet = _failing_unet(load_unet(tiny_sd15_path))
    adapter = PSAAdapter.for_unet(unet, USER_DIM, num_user_tokens=num_tokens, text_edit_layers=2).attach(unet)
    text, anchor, users, null = _step_inputs()
    assert kv_anchor_step_loss(adapter, adapter, text, text, users, null).loss.item() == 0  # fresh edit: identity
    fresh = kv_anchor_step_loss(adapter, adapter, text, anchor, users, null)
    assert fresh.loss.item() > 0 and fresh.metrics()["kv_anchor_mse"] == pytest.approx(fresh.loss.item())
    with torch.no_grad():  # the fresh edit's loss is that of the unedited caption's keys and values
        unedited = kv_anchor_loss(cross_attention_kv(adapter.attention_layers, text.prompt_embeds),
                                  cross_attention_kv(adapter.attention_layers, anchor.prompt_embeds))
    assert fresh.loss.item() == pytest.approx(unedited.loss.item())

    randomize_edit_output(adapter)
    out = kv_anchor_step_loss(adapter, adapter, text, anchor, users, null)
    assert out.loss.item() != pytest.approx(fresh.loss.item())
    out.loss.backward()
    assert all(p.grad is not None for p in adapter.text_edit.parameters())
    assert sum(p.grad.abs().sum() for p in adapter.text_edit.blocks.parameters()) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.user_proj.parameters())
    additive = list(adapter.to_v.parameters()) + (list(adapter.to_k.parameters()) if adapter.to_k is not None else [])
    assert (adapter.to_k is not None) == (num_tokens > 1)
    assert additive and all(p.grad is None for p in additive)


def test_kv_anchor_step_needs_an_adapter_with_a_text_edit(tiny_sd15_path):
    unet = _failing_unet(load_unet(tiny_sd15_path))
    adapter = PSAAdapter.for_unet(unet, USER_DIM).attach(unet)
    text, anchor, users, null = _step_inputs()
    with pytest.raises(ValueError, match="set text_edit_layers > 0"):
        kv_anchor_step_loss(adapter, adapter, text, anchor, users, null)
    adapter.detach(unet)
    edit = PSAAdapter.for_unet(unet, USER_DIM, text_edit_layers=1).attach(unet)
    with pytest.raises(ValueError, match="set text_edit_layers > 0"):
        kv_anchor_step_loss(edit, edit, text, anchor, None, None)  # a LoRA run has no users


def test_kv_anchor_is_registered_as_a_chosen_caption_objective_that_leaves_weights_unused():
    objective = OBJECTIVES["kv_anchor"]
    assert objective.needs_chosen_caption and not objective.trains_every_weight
    assert all(OBJECTIVES[name].trains_every_weight for name in OBJECTIVES if name != "kv_anchor")


# ---------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def sage_set(tmp_path_factory):
    return write_sage_training_set(tmp_path_factory.mktemp("sage_pairs"))


def test_sd15_kv_anchor_run_learns_the_edit_and_writes_it(tiny_sd15_path, sage_set, tmp_path):
    data, embeds = sage_set
    out = tmp_path / "run"
    # every pair in each batch: the banned unit's unsafe-caption pairs, anchored to their safe rewrite,
    # always count
    train(tiny_config(tiny_sd15_path, data, embeds, out, objective="kv_anchor", text_edit_layers=2,
                      max_train_steps=20, train_batch_size=8, learning_rate=1e-2, user_dropout=0.0,
                      proportion_empty_prompts=0.0))
    metrics = read_metrics(out)
    assert sorted(metrics) == list(range(1, 21))
    assert all(metrics[step]["kv_anchor_mse"] == metrics[step]["loss"] for step in metrics)
    assert metrics[1]["loss"] > 0 and metrics[20]["loss"] < metrics[1]["loss"] / 2

    adapter = load_adapter(out, load_unet(tiny_sd15_path))
    assert adapter.config.text_edit_layers == 2 and len(adapter.text_edit.blocks) == 2
    assert adapter.config.extra["training_args"]["objective"] == "kv_anchor"
    assert json.loads((out / PSA_CONFIG_NAME).read_text())["format_version"] == 2
    assert adapter.text_edit.proj_out.weight.abs().sum() > 0  # trained away from the identity
    assert all(torch.equal(p, torch.zeros_like(p)) for p in adapter.to_v.parameters())  # no gradient reaches it


def test_sd15_kv_anchor_run_resumes_exactly(tiny_sd15_path, sage_set, tmp_path):
    data, embeds = sage_set
    whole, split = train_whole_and_resumed(tiny_sd15_path, data, embeds, tmp_path, objective="kv_anchor",
                                           text_edit_layers=2, train_batch_size=8, user_dropout=0.25,
                                           proportion_empty_prompts=0.25)
    assert whole[3]["kv_anchor_mse"] > 0
    assert sorted(split) == [1, 2, 3]
    assert split[3]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-6)
    final_whole = PSAAdapter.from_pretrained(tmp_path / "whole").state_dict()
    final_split = PSAAdapter.from_pretrained(tmp_path / "split").state_dict()
    assert all(torch.equal(final_whole[k], final_split[k]) for k in final_whole)


def test_resuming_with_another_edit_depth_is_refused_before_loading(tiny_sd15_path, sage_set, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    data, embeds = sage_set
    common = dict(objective="kv_anchor", text_edit_layers=2, max_train_steps=2, checkpointing_steps=2)
    train(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", **common))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    with pytest.raises(InputError, match="resume_from_checkpoint: the adapter has a text edit of 2 block"):
        PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", resume_from_checkpoint="latest",
                               **{**common, "text_edit_layers": 1, "max_train_steps": 4}))


def test_sdxl_kv_anchor_run_and_its_cached_twin(tiny_sdxl_path, sage_set, tmp_path):
    """SDXL end to end, on the fly and from the precompute cache (with the chosen captions'
    embeddings): identical inputs give identical losses."""
    data, embeds = sage_set
    common = dict(objective="kv_anchor", text_edit_layers=2, train_batch_size=8, proportion_empty_prompts=0.25)
    train(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "direct", **common))
    train(tiny_config(tiny_sdxl_path, data, embeds, tmp_path / "cached", precompute=True, **common))
    direct, cached = read_metrics(tmp_path / "direct"), read_metrics(tmp_path / "cached")
    assert sorted(direct) == [1, 2] and all(direct[s]["kv_anchor_mse"] > 0 for s in (1, 2))
    for step in (1, 2):
        assert cached[step]["kv_anchor_mse"] == pytest.approx(direct[step]["kv_anchor_mse"], rel=1e-5), step
    adapter = PSAAdapter.from_pretrained(tmp_path / "direct")
    assert adapter.config.extra["model_type"] == "sdxl" and adapter.config.text_edit_layers == 2
    assert adapter.config.cross_attention_dim == 64 and adapter.text_edit.proj_out.in_features == 64


@pytest.mark.parametrize("objective", ["kv_anchor", "dpo"])
def test_ddp_looks_for_unused_weights_only_under_kv_anchor(objective, tiny_sd15_path, sage_set, tmp_path):
    """kv_anchor leaves the additive user branch without a gradient, which DDP must be told about."""
    data, embeds = sage_set
    trainer = PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", objective=objective,
                                     text_edit_layers=1))
    assert trainer.accelerator.ddp_handler.find_unused_parameters == (objective == "kv_anchor")


# ---------------------------------------------------------------------------------------------- config


def test_kv_anchor_needs_a_text_edit_and_text_edit_layers_is_non_negative():
    with pytest.raises(InputError, match=r"defaults: text_edit_layers: the kv_anchor objective trains the adapter's "
                                         r"text edit: set it >= 1"):
        load_training_config(None, {**REQUIRED, "objective": "kv_anchor"})
    with pytest.raises(InputError, match=r"command line: --text_edit_layers: must be >= 0, got -1"):
        load_training_config(None, {**REQUIRED, "text_edit_layers": -1})
    one = load_training_config(None, {**REQUIRED, "objective": "kv_anchor", "text_edit_layers": 1})
    assert one.text_edit_layers == 1
    # a text edit is allowed with any objective (the DPO objectives train it through the UNet)
    assert load_training_config(None, {**REQUIRED, "text_edit_layers": 2}).objective == "dpo"


def test_a_lora_run_refuses_the_text_edit_and_kv_anchor():
    lora = {**REQUIRED, "trainable": "lora", "embeds_folder": None}
    with pytest.raises(InputError, match=r"--text_edit_layers: not supported with trainable lora"):
        load_training_config(None, {**lora, "text_edit_layers": 1})
    with pytest.raises(InputError, match=r"--objective: kv_anchor trains a PSA adapter's user text edit; not "
                                         r"supported with trainable lora"):
        load_training_config(None, {**lora, "objective": "kv_anchor"})


# ---------------------------------------------------------------------------------------------- init_adapter


def _save_adapter(unet_path: Path, folder: Path, text_edit_layers: int = 0) -> PSAAdapter:
    adapter = randomize(PSAAdapter.for_unet(load_unet(unet_path), USER_DIM, text_edit_layers=text_edit_layers))
    adapter.save_pretrained(folder)
    return adapter


def test_init_adapter_without_an_edit_starts_a_fresh_edit(tiny_sd15_path, sage_set, tmp_path):
    data, embeds = sage_set
    start = _save_adapter(tiny_sd15_path, tmp_path / "start")
    trainer = PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", objective="kv_anchor",
                                     text_edit_layers=2, init_adapter=str(tmp_path / "start")))
    adapter = trainer.adapter
    assert adapter.text_edit is not None and len(adapter.text_edit.blocks) == 2
    for name, param in start.named_parameters():
        assert torch.equal(adapter.get_parameter(name), param), name
    assert any(name.startswith("to_v.") for name, _ in start.named_parameters())
    text = torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.equal(adapter.edit_text(text, adapter(torch.randn(2, USER_DIM))), text)  # the identity


@pytest.mark.parametrize("layers", [0, 1])
def test_init_adapter_with_another_edit_depth_is_refused_before_loading(layers, tiny_sd15_path, sage_set, tmp_path,
                                                                        monkeypatch):
    from diffusers import UNet2DConditionModel

    data, embeds = sage_set
    _save_adapter(tiny_sd15_path, tmp_path / "deep", text_edit_layers=2)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_loading)
    with pytest.raises(InputError, match=rf"init_adapter: the adapter has a text edit of 2 layer\(s\), but "
                                         rf"text_edit_layers is {layers}"):
        PSATrainer(tiny_config(tiny_sd15_path, data, embeds, tmp_path / "run", text_edit_layers=layers,
                               init_adapter=str(tmp_path / "deep")))


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["kv_anchor", "dpo"])
def test_two_process_runs_with_a_text_edit_stay_in_sync(objective, tiny_sd15_path, tmp_path):
    """A real two-process ``accelerate launch`` (gloo on CPU, as in test_training's DDP test). Under
    kv_anchor the additive branch gets no gradient, which DDP accepts only when told to look for
    unused weights; under dpo the edit runs in the UNet's pre-hook, outside the DDP forward, and
    every weight trains. Either way the replicas end equal."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    data, embeds = write_sage_training_set(tmp_path / "pairs", n_units=8)
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(repo / "train_psa.py"),
        "--pretrained_model", str(tiny_sd15_path), "--train_data", str(data / "metadata.jsonl"),
        "--embeds_folder", str(embeds), "--output_dir", str(out), "--resolution", "16", "--train_batch_size", "2",
        "--max_train_steps", "2", "--checkpointing_steps", "2", "--report_to", "none", "--learning_rate", "1e-2",
        "--objective", objective, "--text_edit_layers", "1", "--num_user_tokens", "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert result.stdout.count("equal weight sums on all 2 processes") == 1
    adapter = PSAAdapter.from_pretrained(out)
    assert adapter.config.text_edit_layers == 1 and adapter.text_edit.proj_out.weight.abs().sum() > 0
    additive_moved = [bool(layer.weight.abs().sum() > 0) for layer in adapter.to_v]
    assert additive_moved == [objective == "dpo"] * len(adapter.to_v)  # kv_anchor never trains the branch


@pytest.mark.parametrize("objective", ["kv_anchor", "dpo"])
def test_bf16_runs_train_the_fp32_edit_through_gradient_checkpointing(objective, tiny_sd15_path, sage_set, tmp_path):
    """Frozen bf16 models, fp32 edit weights. Under dpo the edited text enters the UNet's recomputed
    (checkpointed) blocks, and the gradient must still reach the edit."""
    from safetensors.torch import load_file

    data, embeds = sage_set
    out = tmp_path / "run"
    trainer = PSATrainer(tiny_config(tiny_sd15_path, data, embeds, out, objective=objective, text_edit_layers=1,
                                     mixed_precision="bf16", gradient_checkpointing=True, learning_rate=1e-4,
                                     max_train_steps=3, checkpointing_steps=1))
    assert trainer.unet.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.adapter.text_edit.parameters())
    trainer.train()
    # step 1 moves the zero-initialised output projection; from then on every edit weight has gradients
    before = load_file(str(out / "checkpoint-1" / "model.safetensors"))
    after = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    for name in (k for k in after if k.startswith("text_edit.")):
        assert after[name].dtype == torch.float32
        moved = (after[name] != before[name]).float().mean().item()
        assert moved > 0.9, f"{name}: only {moved:.0%} of the weights moved"
