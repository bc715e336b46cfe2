"""The PSA user cross-attention adapter on tiny SD1.5- and SDXL-shaped UNets."""

import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from psalign.adapter import PSAAdapter, UserCrossAttnProcessor, cross_attention_layers, load_adapter
from psalign.loss import diffusion_dpo_loss

USER_DIM = 24


def load_unet(path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()


def unet_inputs(unet: UNet2DConditionModel, batch: int, seed: int = 0) -> dict:
    """Random UNet inputs of the right shapes (with SDXL's text_time added conditioning when needed)."""
    gen = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    inputs = {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=gen),
        "timestep": torch.tensor([10.0 * (i + 1) for i in range(batch)]),
        "encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=gen),
    }
    if unet.config.addition_embed_type == "text_time":
        text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim, generator=gen),
            "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]).repeat(batch, 1),
        }
    return inputs


def randomize(adapter: PSAAdapter, seed: int = 1) -> PSAAdapter:
    """Give every adapter weight a random, non-trivial value (a 'trained' adapter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return adapter


def run(unet, adapter, inputs, users=None, null=None, scale=1.0):
    with torch.no_grad():
        if adapter is not None and users is not None:
            adapter.activate(adapter(users, null, scale=scale))
        return unet(**inputs).sample


@pytest.fixture(params=["sd15", "sdxl"])
def unet(request, tiny_sd15_path, tiny_sdxl_path):
    return load_unet(tiny_sd15_path if request.param == "sd15" else tiny_sdxl_path)


def test_processors_on_every_cross_attention_layer_only(unet):
    adapter = PSAAdapter.for_unet(unet, USER_DIM).attach(unet)
    cross = cross_attention_layers(unet)
    assert len(cross) == len(adapter.config.layer_names) > 0
    for name, proc in unet.attn_processors.items():
        assert isinstance(proc, UserCrossAttnProcessor) == (name in cross)
        assert name.endswith("attn2.processor") == (name in cross)
    assert adapter.to_k is None  # one user token: no key projection is stored
    assert not any(k.startswith("to_k") for k in adapter.state_dict())


def test_fresh_adapter_and_scale_zero_leave_the_unet_output_exactly_unchanged(unet):
    inputs = unet_inputs(unet, batch=2)
    base = run(unet, None, inputs)
    adapter = PSAAdapter.for_unet(unet, USER_DIM).attach(unet)
    users = torch.randn(2, USER_DIM)
    assert torch.equal(run(unet, adapter, inputs, users), base)  # zero-initialised value projections
    randomize(adapter)
    assert not torch.allclose(run(unet, adapter, inputs, users), base, atol=1e-4)
    assert torch.equal(run(unet, adapter, inputs, users, scale=0.0), base)
    with adapter.disabled():
        assert torch.equal(run(unet, adapter, inputs), base)
    adapter.detach(unet)
    assert torch.equal(run(unet, None, inputs), base)


def test_fast_path_equals_general_attention_path(unet):
    adapter = randomize(PSAAdapter.for_unet(unet, USER_DIM).attach(unet))
    inputs = unet_inputs(unet, batch=3)
    users = torch.randn(3, USER_DIM)
    fast = run(unet, adapter, inputs, users, scale=0.7)
    adapter.fast_path = False
    general = run(unet, adapter, inputs, users, scale=0.7)
    torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)


def test_mixed_user_batch_equals_per_user_runs(unet):
    adapter = randomize(PSAAdapter.for_unet(unet, USER_DIM).attach(unet))
    inputs = unet_inputs(unet, batch=3)
    users = torch.randn(3, USER_DIM)
    null = torch.tensor([False, True, False])
    together = run(unet, adapter, inputs, users, null)
    for i in range(3):
        single = {k: v[i : i + 1] for k, v in inputs.items() if torch.is_tensor(v)}
        if "added_cond_kwargs" in inputs:
            single["added_cond_kwargs"] = {k: v[i : i + 1] for k, v in inputs["added_cond_kwargs"].items()}
        alone = run(unet, adapter, single, users[i : i + 1], null[i : i + 1])
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    # the null user is one fixed user, whatever embedding sits in its row
    other = users.clone()
    other[1] = torch.randn(USER_DIM)
    torch.testing.assert_close(run(unet, adapter, inputs, other, null)[1], together[1])


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_one_optimizer_step_changes_all_adapter_parameters_and_nothing_else(tiny_sd15_path, num_tokens):
    unet = load_unet(tiny_sd15_path).requires_grad_(False)
    # Random values: from the zero init the value projections block every other gradient at step 0.
    adapter = randomize(PSAAdapter.for_unet(unet, USER_DIM, num_user_tokens=num_tokens).attach(unet))
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.named_parameters()}
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-3)

    inputs = unet_inputs(unet, batch=4)
    users = torch.randn(2, USER_DIM).repeat(2, 1)  # [chosen; rejected] share users
    adapter.activate(adapter(users))
    pred = unet(**inputs).sample
    with adapter.disabled(), torch.no_grad():
        ref = unet(**inputs).sample
    target = torch.randn_like(pred)
    diffusion_dpo_loss(pred, ref, target, beta=50.0).loss.backward()
    optimizer.step()

    for key, value in unet.state_dict().items():
        assert torch.equal(value, unet_before[key]), f"frozen UNet tensor {key} changed"
    for name, param in adapter.named_parameters():
        assert not torch.equal(param, adapter_before[name]), f"adapter parameter {name} did not change"
    expected = {"user_proj.proj.weight", "user_proj.proj.bias", "user_proj.norm.weight", "user_proj.norm.bias"}
    assert expected <= set(adapter_before)
    assert any(n.startswith("to_k.") for n in adapter_before) == (num_tokens > 1)


def test_step_zero_dpo_loss_is_ln2_with_a_fresh_adapter(tiny_sd15_path):
    unet = load_unet(tiny_sd15_path)
    adapter = PSAAdapter.for_unet(unet, USER_DIM).attach(unet)
    inputs = unet_inputs(unet, batch=4)
    adapter.activate(adapter(torch.randn(4, USER_DIM)))
    pred = unet(**inputs).sample
    with adapter.disabled(), torch.no_grad():
        ref = unet(**inputs).sample
    out = diffusion_dpo_loss(pred, ref, torch.randn_like(pred))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_save_load_round_trip_is_bit_exact(tiny_sd15_path, tmp_path):
    unet = load_unet(tiny_sd15_path)
    adapter = randomize(PSAAdapter.for_unet(unet, USER_DIM, num_user_tokens=2))
    adapter.set_embedding_stats(torch.randn(USER_DIM), torch.rand(USER_DIM) + 0.5)
    adapter.save_pretrained(tmp_path / "adapter", extra={"note": "test"})
    loaded = load_adapter(tmp_path / "adapter", unet)
    for (k1, v1), (k2, v2) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert loaded.config.layer_names == adapter.config.layer_names
    assert loaded.config.num_user_tokens == 2 and loaded.config.extra == {"note": "test"}
    inputs = unet_inputs(unet, batch=2)
    users = torch.randn(2, USER_DIM)
    out_loaded = run(unet, loaded, inputs, users)
    loaded.detach(unet)
    adapter.attach(unet)
    assert torch.equal(run(unet, adapter, inputs, users), out_loaded)


def test_embedding_standardisation_is_applied(tiny_sd15_path):
    unet = load_unet(tiny_sd15_path)
    adapter = randomize(PSAAdapter.for_unet(unet, USER_DIM))
    mean, std = torch.randn(USER_DIM), torch.rand(USER_DIM) + 0.5
    users = torch.randn(3, USER_DIM)
    plain = adapter.user_proj((users - mean) / std)
    adapter.set_embedding_stats(mean, std)
    torch.testing.assert_close(adapter.user_proj(users), plain)
    null = adapter.user_proj(users, torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(null, adapter.user_proj.norm(adapter.user_proj.proj.bias)[None, None].expand(3, 1, -1))


def test_sd15_adapter_into_sdxl_unet_says_so(tiny_sd15_path, tiny_sdxl_path, tmp_path):
    sd15, sdxl = load_unet(tiny_sd15_path), load_unet(tiny_sdxl_path)
    PSAAdapter.for_unet(sd15, USER_DIM).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"made for a UNet with cross_attention_dim 32, 7 cross-attention layers.*"
                       r"this UNet has cross_attention_dim 64, 8 cross-attention layers"):
        load_adapter(tmp_path / "a", sdxl)


def test_tampered_weights_file_names_the_tensor(tiny_sd15_path, tmp_path):
    from safetensors.torch import load_file, save_file

    unet = load_unet(tiny_sd15_path)
    PSAAdapter.for_unet(unet, USER_DIM).save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "psa_adapter.safetensors"
    state = load_file(str(weights))
    state["to_v.0.weight"] = torch.zeros(5, 5)
    del state["to_v.1.weight"]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"missing tensor to_v\.1\.weight(.|\n)*shape mismatch to_v\.0\.weight"):
        load_adapter(tmp_path / "a", unet)


def test_wrong_embedding_width_and_missing_users_are_clear_errors(tiny_sd15_path):
    unet = load_unet(tiny_sd15_path)
    adapter = PSAAdapter.for_unet(unet, USER_DIM).attach(unet)
    with pytest.raises(ValueError, match=rf"shape \(batch, {USER_DIM}\), got \(2, 7\)"):
        adapter(torch.randn(2, 7))
    with pytest.raises(RuntimeError, match="no users are set"):
        run(unet, adapter, unet_inputs(unet, batch=1))
    adapter.activate(adapter(torch.randn(3, USER_DIM)))
    with pytest.raises(ValueError, match="3 rows but the UNet batch has 2"):
        run(unet, adapter, unet_inputs(unet, batch=2))


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_stock_pipeline_generates_per_user_images(kind, tiny_sd15_path, tiny_sdxl_path):
    pipeline_cls = StableDiffusionPipeline if kind == "sd15" else StableDiffusionXLPipeline
    pipe = pipeline_cls.from_pretrained(tiny_sd15_path if kind == "sd15" else tiny_sdxl_path)
    pipe.set_progress_bar_config(disable=True)
    adapter = randomize(PSAAdapter.for_unet(pipe.unet, USER_DIM)).attach(pipe.unet)
    users = torch.randn(2, USER_DIM)

    def generate(embeds, **kwargs):
        with adapter.users(embeds, classifier_free_guidance=True, num_images_per_prompt=2, **kwargs):
            return pipe(
                ["a cat", "a dog"],
                num_inference_steps=2,
                guidance_scale=5.0,
                num_images_per_prompt=2,
                output_type="np",
                generator=torch.Generator().manual_seed(0),
            ).images

    images = generate(users)
    assert images.shape == (4, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()
    swapped = generate(users.flip(0))
    assert not torch.allclose(torch.from_numpy(images), torch.from_numpy(swapped), atol=1e-4)
    off = generate(users, scale=0.0)
    with adapter.disabled():
        base = pipe(["a cat", "a dog"], num_inference_steps=2, guidance_scale=5.0, num_images_per_prompt=2,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert (off == base).all()
