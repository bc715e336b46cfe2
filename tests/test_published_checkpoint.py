"""Import of the published PSA checkpoint layout, checked against that layout's own semantics.

The reference below implements the published semantics independently: user tokens are appended
after the 77 text tokens, split off inside each cross-attention processor, and every token group
``j`` is its own attention (the layer's query over the single user token ``j``) added, times
``scale``, before the output projection.
"""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from psalign.adapter import cross_attention_layers, inspect_adapter, load_adapter

from .test_adapter import load_unet, unet_inputs

USER_DIM = 20


class PublishedSemantics(torch.nn.Module):
    """Reference processor for one cross-attention layer in the published layout."""

    def __init__(self, k_user, v_user, num_user_tokens: int, scale: float):
        super().__init__()
        self.k_user, self.v_user = k_user, v_user  # lists of [h, d_c] weights, one per token group
        self.num_user_tokens = num_user_tokens
        self.scale = scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        text, user = encoder_hidden_states[:, :-self.num_user_tokens], encoder_hidden_states[:, -self.num_user_tokens:]
        batch = hidden_states.shape[0]

        def heads(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query = heads(attn.to_q(hidden_states))
        out = F.scaled_dot_product_attention(query, heads(attn.to_k(text)), heads(attn.to_v(text)))
        for j, (wk, wv) in enumerate(zip(self.k_user, self.v_user)):
            token = user[:, j : j + 1]
            out = out + self.scale * F.scaled_dot_product_attention(
                query, heads(token @ wk.T), heads(token @ wv.T)
            )
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[3])
        return attn.to_out[1](attn.to_out[0](out))


def published_state(unet, num_user_tokens: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    d_c = unet.config.cross_attention_dim
    adapter = {}
    for i, module in enumerate(cross_attention_layers(unet).values()):
        h = module.to_out[0].in_features
        adapter[f"{i}.to_k_user.0.weight"] = torch.randn(h, d_c, generator=gen) * 0.2
        adapter[f"{i}.to_v_user.0.weight"] = torch.randn(h, d_c, generator=gen) * 0.2
    proj = {
        "proj.weight": torch.randn(num_user_tokens * d_c, USER_DIM, generator=gen) * 0.2,
        "proj.bias": torch.randn(num_user_tokens * d_c, generator=gen) * 0.2,
        "norm.weight": 1 + 0.1 * torch.randn(d_c, generator=gen),
        "norm.bias": 0.1 * torch.randn(d_c, generator=gen),
    }
    return {"psa_adapter": adapter, "user_proj": proj}


def published_user_tokens(state, embeds, num_user_tokens):
    proj = state["user_proj"]
    d_c = proj["norm.weight"].shape[0]
    tokens = (embeds @ proj["proj.weight"].T + proj["proj.bias"]).reshape(-1, num_user_tokens, d_c)
    return F.layer_norm(tokens, (d_c,), proj["norm.weight"], proj["norm.bias"])


@pytest.mark.parametrize("file_format", ["bin", "safetensors"])
@pytest.mark.parametrize("num_user_tokens", [1, 2])
def test_converted_published_checkpoint_matches_published_semantics(
    tiny_sd15_path, tmp_path, file_format, num_user_tokens
):
    state = published_state(load_unet(tiny_sd15_path), num_user_tokens)
    if file_format == "bin":
        path = tmp_path / "psa_adapter.bin"
        torch.save(state, path)
    else:
        path = tmp_path / "psa_adapter.safetensors"
        save_file({f"{g}.{k}": v for g, group in state.items() for k, v in group.items()}, str(path))

    scale = 0.8
    embeds = torch.randn(2, USER_DIM)
    reference_unet = load_unet(tiny_sd15_path)
    layers = cross_attention_layers(reference_unet)
    procs = dict(reference_unet.attn_processors)
    for i, name in enumerate(layers):
        procs[name] = PublishedSemantics(
            [state["psa_adapter"][f"{i}.to_k_user.0.weight"]],
            [state["psa_adapter"][f"{i}.to_v_user.0.weight"]],
            num_user_tokens,
            scale,
        )
    reference_unet.set_attn_processor(procs)
    inputs = unet_inputs(reference_unet, batch=2)
    user_tokens = published_user_tokens(state, embeds, num_user_tokens)
    with torch.no_grad():
        expected = reference_unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=torch.cat([inputs["encoder_hidden_states"], user_tokens], dim=1),
        ).sample

    unet = load_unet(tiny_sd15_path)
    adapter = load_adapter(path, unet)
    with torch.no_grad():
        adapter.activate(adapter(embeds, scale=scale))
        ours = unet(**inputs).sample
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    with adapter.disabled(), torch.no_grad():
        assert not torch.allclose(unet(**inputs).sample, expected, atol=1e-3)  # the user branch matters


def test_published_checkpoint_for_another_unet_is_refused(tiny_sd15_path, tiny_sdxl_path, tmp_path):
    path = tmp_path / "psa_adapter.bin"
    torch.save(published_state(load_unet(tiny_sd15_path), 1), path)
    with pytest.raises(ValueError, match="made for a UNet with cross_attention_dim 32, 7 cross-attention layers"):
        load_adapter(path, load_unet(tiny_sdxl_path))


def test_published_checkpoint_with_unknown_keys_is_refused(tiny_sd15_path, tmp_path):
    state = published_state(load_unet(tiny_sd15_path), 1)
    state["psa_adapter"]["0.something_else"] = torch.zeros(1)
    path = tmp_path / "psa_adapter.bin"
    torch.save(state, path)
    with pytest.raises(ValueError, match="unexpected adapter key '0.something_else'"):
        load_adapter(path, load_unet(tiny_sd15_path))


class _WritesAFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_inspect_adapter_reads_the_published_layout_without_a_model(tiny_sd15_path, tmp_path):
    path = tmp_path / "psa_adapter.bin"
    torch.save(published_state(load_unet(tiny_sd15_path), 2), path)
    summary = inspect_adapter(path)
    assert (summary.layout, summary.user_embed_dim, summary.num_user_tokens) == ("published", USER_DIM, 2)
    assert (summary.cross_attention_dim, summary.num_layers) == (32, 7)


def test_a_crafted_bin_is_refused_before_any_model_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "psa_adapter.bin"
    torch.save({"psa_adapter": {}, "user_proj": _WritesAFileWhenUnpickled(marker)}, path)
    with pytest.raises(ValueError, match=r"psa_adapter\.bin holds more than tensors and plain values"):
        inspect_adapter(path)
    assert not marker.exists()


def test_a_folder_holding_only_a_published_bin_points_at_the_file(tiny_sd15_path, tmp_path):
    torch.save(published_state(load_unet(tiny_sd15_path), 1), tmp_path / "psa_adapter.bin")
    with pytest.raises(FileNotFoundError, match=r"not a psalign PSA adapter folder; to use its psa_adapter\.bin, "
                                                r"pass that file as the adapter path"):
        inspect_adapter(tmp_path)


def test_psa_method_reports_a_bad_adapter_before_loading(tmp_path):
    from psalign.methods.psa import PSAMethod

    (tmp_path / "adapter.bin").write_bytes(b"not a torch file")
    problems = PSAMethod(tmp_path / "adapter.bin").check()
    assert len(problems) == 1 and "adapter.bin is not a weights-only torch file" in str(problems[0])


def test_infer_reads_a_published_bins_user_dimension_before_loading(tiny_sd15_path, tmp_path):
    """infer's pre-load check compares this dimension with the embeddings' (a mismatch is a file:line error)."""
    from psalign.inference.run import _adapter_embed_dim

    path = tmp_path / "psa_adapter.bin"
    torch.save(published_state(load_unet(tiny_sd15_path), 1), path)
    assert _adapter_embed_dim(path) == (USER_DIM, [])
    (tmp_path / "broken.bin").write_bytes(b"not a torch file")
    dim, problems = _adapter_embed_dim(tmp_path / "broken.bin")
    assert dim is None and problems[0].field == "psa_path"
