"""Merging SafetyDPO experts: Co-Merge, averaging, TIES, SVD re-factoring, diffusers LoRA round trip."""

import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

from psalign.io import InputError
from psalign.safetydpo.lora import DEFAULT_TARGET_MODULES, read_lora_deltas, save_lora_factors
from psalign.safetydpo.merge import (
    MAX_TRUNCATION_ERROR,
    average_merge,
    co_merge,
    fuse_into_unet,
    record_input_activations,
    refactor_to_lora,
    ties_merge,
    truncation_rank,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def block_experts(num_experts=3, rows=9, cols=6, seed=0):
    """Expert k is large on rows [3k, 3k+3) and small elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    experts = []
    for k in range(num_experts):
        delta = 0.01 * torch.randn(rows, cols, generator=gen)
        delta[3 * k : 3 * k + 3] = torch.randn(3, cols, generator=gen).sign() * (1 + torch.rand(3, cols, generator=gen))
        experts.append({"layer": delta})
    return experts


def test_co_merge_takes_each_block_from_the_expert_that_dominates_it():
    experts = block_experts()
    activations = [{"layer": torch.ones(6)} for _ in experts]
    merged = co_merge(experts, activations)["layer"]
    for k, expert in enumerate(experts):
        assert torch.equal(merged[3 * k : 3 * k + 3], expert["layer"][3 * k : 3 * k + 3])


def test_co_merge_scores_weights_by_input_activity():
    # equal |dW| everywhere; expert 0 sees large inputs on column 0, expert 1 on column 1
    e0 = {"m": torch.tensor([[1.0, -1.0], [1.0, -1.0]])}
    e1 = {"m": torch.tensor([[-1.0, 1.0], [-1.0, 1.0]])}
    acts = [{"m": torch.tensor([5.0, 0.1])}, {"m": torch.tensor([0.1, 5.0])}]
    merged = co_merge([e0, e1], acts)["m"]
    assert merged.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # hand computation of the score rule: |dW| * mean|x|
    e1_big = {"m": torch.tensor([[-3.0, 1.0], [-1.0, 1.0]])}
    merged = co_merge([e0, e1_big], acts)["m"]
    assert merged.tolist() == [[1.0, 1.0], [1.0, 1.0]]  # 3 * 0.1 = 0.3 < 1 * 5 = 5: expert 0 keeps (0, 0)
    with pytest.raises(ValueError, match="no calibration activations recorded for module m"):
        co_merge([e0, e1], [{"m": torch.ones(2)}, {}])


def test_average_and_ties_against_hand_computations():
    e0 = {"m": torch.tensor([[4.0, -1.0, 0.5]])}
    e1 = {"m": torch.tensor([[2.0, 3.0, -0.2]])}
    assert average_merge([e0, e1])["m"][0].tolist() == pytest.approx([3.0, 1.0, 0.15])
    # density 2/3 keeps e0: [4, -1, 0], e1: [2, 3, 0]; signs of sums: +, +, 0
    # entry 0: mean(4, 2) = 3; entry 1: only e1 agrees -> 3; entry 2: nothing kept -> 0
    assert ties_merge([e0, e1], density=2 / 3)["m"][0].tolist() == pytest.approx([3.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="adapts different modules"):
        average_merge([e0, {"n": torch.zeros(1, 3)}])


def test_refactor_is_exact_at_full_rank_and_reports_truncation_error():
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(8, 3, generator=gen) @ torch.randn(3, 10, generator=gen)
    factors, errors = refactor_to_lora({"m": low_rank}, rank=3)
    a, b = factors["m"]
    assert a.shape == (3, 10) and b.shape == (8, 3) and errors["m"] < 1e-6
    torch.testing.assert_close(b @ a, low_rank, rtol=1e-5, atol=1e-5)
    _, errors = refactor_to_lora({"m": low_rank}, rank=1)
    s = torch.linalg.svdvals(low_rank.double())
    assert errors["m"] == pytest.approx((s[1:].square().sum().sqrt() / s.square().sum().sqrt()).item(), rel=1e-5)


def test_merged_lora_round_trips_through_load_lora_weights(tiny_sd15_path, tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    names = [n for n, m in pipe.unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v", "attn2.to_out.0"))]
    gen = torch.Generator().manual_seed(0)
    experts = []
    for _ in range(3):
        experts.append({n: 0.05 * torch.randn(pipe.unet.get_submodule(n).weight.shape, generator=gen) for n in names})
    acts = [{n: torch.rand(pipe.unet.get_submodule(n).weight.shape[1], generator=gen) for n in names} for _ in experts]
    merged = co_merge(experts, acts)
    rank = max(min(d.shape) for d in merged.values())  # full rank for every module: exact
    factors, errors = refactor_to_lora(merged, rank=rank)
    assert max(errors.values()) < 1e-5
    save_lora_factors(tmp_path / "merged", factors, rank=rank)
    for name, delta in read_lora_deltas(tmp_path / "merged").items():
        torch.testing.assert_close(delta, merged[name], rtol=1e-4, atol=1e-5)

    inputs = dict(sample=torch.randn(1, 4, 16, 16, generator=gen), timestep=torch.tensor([50]),
                  encoder_hidden_states=torch.randn(1, 77, 32, generator=gen))
    with torch.no_grad():
        base = pipe.unet(**inputs).sample
    pipe.load_lora_weights(str(tmp_path / "merged"))
    with torch.no_grad():
        loaded = pipe.unet(**inputs).sample
    fused_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    fuse_into_unet(fused_pipe.unet, merged)
    with torch.no_grad():
        fused = fused_pipe.unet(**inputs).sample
    torch.testing.assert_close(loaded, fused, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(loaded, base, atol=1e-4)


def _sdxl_unet_inputs(gen: torch.Generator, batch: int = 1) -> dict:
    """Random inputs of the tiny SDXL UNet: 16x16 latents, a 64-d context, 32-d pooled text, time ids."""
    return dict(
        sample=torch.randn(batch, 4, 16, 16, generator=gen), timestep=torch.tensor([50] * batch),
        encoder_hidden_states=torch.randn(batch, 77, 64, generator=gen),
        added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=gen),
                           "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * batch)},
    )


def test_merged_sdxl_lora_round_trips_through_load_lora_weights(tiny_sdxl_path, tmp_path):
    """Co-Merge of three experts on every SDXL attention projection (the calibration activations
    recorded from the SDXL UNet), re-factored, saved and loaded by a stock SDXL pipeline: exactly the
    merged model at full rank; at rank 2 exactly the re-factored model, which then differs from it."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    targets = tuple(f".{t}" for t in DEFAULT_TARGET_MODULES)
    names = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(targets)]
    assert len(names) == 64 and any(".transformer_blocks.1." in n for n in names)  # SDXL's depth-2 blocks
    gen = torch.Generator().manual_seed(0)
    experts = [{n: 0.05 * torch.randn(unet.get_submodule(n).weight.shape, generator=gen) for n in names}
               for _ in range(3)]
    acts = []
    for _ in experts:
        inputs = _sdxl_unet_inputs(gen, batch=2)
        acts.append(record_input_activations(unet, names, lambda inputs=inputs: unet(**inputs)))
    merged = co_merge(experts, acts)
    inputs = _sdxl_unet_inputs(gen)

    def outputs_with(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        model = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
        fuse_into_unet(model, deltas)
        with torch.no_grad():
            return model(**inputs).sample

    with torch.no_grad():
        base = unet(**inputs).sample
    merged_out = outputs_with(merged)
    full_rank = max(min(d.shape) for d in merged.values())
    for rank in (full_rank, 2):
        factors, errors = refactor_to_lora(merged, rank=rank)
        save_lora_factors(tmp_path / f"rank{rank}", factors, rank=rank)
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
        pipe.load_lora_weights(str(tmp_path / f"rank{rank}"))
        assert sum("lora_A" in n for n, _ in pipe.unet.named_parameters()) == len(names)
        with torch.no_grad():
            loaded = pipe.unet(**inputs).sample
        refactored_out = outputs_with({n: b @ a for n, (a, b) in factors.items()})
        torch.testing.assert_close(loaded, refactored_out, rtol=1e-4, atol=1e-5)
        if rank == full_rank:
            assert max(errors.values()) < 1e-5
            torch.testing.assert_close(loaded, merged_out, rtol=1e-4, atol=1e-5)
        else:
            assert min(errors.values()) > 0.1  # rank 2 of 16- to 32-dimensional random deltas
            assert not torch.allclose(loaded, merged_out, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(merged_out, base, atol=1e-4)


def test_record_input_activations_is_the_mean_absolute_input(tiny_sd15_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    context = torch.randn(2, 77, 32)

    def run():
        pipe.unet(torch.randn(2, 4, 16, 16), torch.tensor([10, 20]), encoder_hidden_states=context)

    acts = record_input_activations(pipe.unet, [name], run)
    torch.testing.assert_close(acts[name], context.abs().reshape(-1, 32).mean(dim=0))


def test_record_input_activations_can_keep_the_conditional_half_only(tiny_sd15_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    unconditional, conditional = torch.zeros(1, 77, 32), torch.randn(1, 77, 32)

    def run(batch=torch.cat([unconditional, conditional])):
        pipe.unet(torch.randn(len(batch), 4, 16, 16), torch.tensor([10] * len(batch)), encoder_hidden_states=batch)

    both = record_input_activations(pipe.unet, [name], run)[name]
    torch.testing.assert_close(both, conditional.abs()[0].mean(dim=0) / 2)  # the empty half halves it here
    kept = record_input_activations(pipe.unet, [name], run, conditional_only=True)[name]
    torch.testing.assert_close(kept, conditional.abs()[0].mean(dim=0))
    with pytest.raises(RuntimeError, match="batch of 1 has no conditional half"):
        record_input_activations(pipe.unet, [name], lambda: run(conditional), conditional_only=True)


def test_truncation_rank_is_the_smallest_rank_within_the_error():
    # singular values 3, 2, 1, 0.1: relative errors sqrt(tail energy / 14.01) at ranks 1..4 are 0.598, 0.268, 0.0267, 0
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=torch.float64))  # orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(5, 4, generator=gen, dtype=torch.float64))
    delta = (u @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.1], dtype=torch.float64)) @ v.T).float()
    deltas = {"m": delta, "zero": torch.zeros(3, 3)}
    assert [truncation_rank(deltas, e) for e in (0.6, 0.3, 0.05, 0.01)] == [1, 2, 3, 4]
    _, errors = refactor_to_lora({"m": delta}, rank=3)
    assert errors["m"] == pytest.approx(math.sqrt(0.01 / 14.01), rel=1e-4)
    assert truncation_rank({"zero": torch.zeros(3, 3)}) == 1
    assert MAX_TRUNCATION_ERROR == 0.05


def _tiny_experts(pipe, folder, rank: int = 2, count: int = 2) -> list:
    """``count`` random rank-``rank`` diffusers LoRAs on the tiny UNet's attn2 projections."""
    names = [n for n, _ in pipe.unet.named_modules() if n.endswith(("attn2.to_q", "attn2.to_v"))]
    gen = torch.Generator().manual_seed(0)
    experts = []
    for k in range(count):
        factors = {}
        for n in names:
            out_features, in_features = pipe.unet.get_submodule(n).weight.shape
            factors[n] = (0.1 * torch.randn(rank, in_features, generator=gen),
                          0.1 * torch.randn(out_features, rank, generator=gen))
        experts.append(save_lora_factors(folder / f"expert_{k}", factors, rank=rank))
    return experts


def test_calibration_on_all_experts_prompts(tmp_path):
    from psalign.safetydpo.merge_experts import check_merge_inputs

    experts = [tmp_path / "hate", tmp_path / "violence"]
    for folder in experts:
        folder.mkdir()
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")  # only its presence is checked here
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("Hate\ta slur\nViolence\ta fight\nViolence\ta brawl\nHate\ta slur\n", encoding="utf-8")
    own = check_merge_inputs(experts, ["Hate", "Violence"], "co_merge", calibration)
    assert own.prompts == [["a slur", "a slur"], ["a fight", "a brawl"]]
    everyone = check_merge_inputs(experts, ["Hate", "Violence"], "co_merge", calibration, calibration_scope="all")
    assert everyone.prompts == [["a slur", "a fight", "a brawl"]] * 2
    with pytest.raises(InputError, match="--calibration_scope: 'some' is not one of own, all"):
        check_merge_inputs(experts, ["Hate", "Violence"], "co_merge", calibration, calibration_scope="some")


def test_merge_report_states_the_truncation_error_and_the_default_rank_keeps_it_small(tiny_sd15_path, tmp_path,
                                                                                     capsys):
    from psalign.safetydpo import merge_experts as cli

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    experts = _tiny_experts(pipe, tmp_path)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("Hate\ta slur\nViolence\ta fight\n", encoding="utf-8")
    common = ["--experts", *map(str, experts), "--categories", "Hate", "Violence", "--pretrained_model",
              str(tiny_sd15_path), "--calibration_prompts", str(calibration), "--calibration_steps", "1",
              "--resolution", "16", "--device", "cpu", "--calibration_scope", "all", "--calibration_half", "conditional"]
    cli.main([*common, "--output", str(tmp_path / "auto")])
    report = json.loads((tmp_path / "auto" / "merge_report.json").read_text())
    assert report["calibration_prompts"] == [["a slur", "a fight"]] * 2 and report["calibration_half"] == "conditional"
    assert report["rank_chosen"] == "smallest within max_truncation_error"
    assert report["max_relative_error"] <= MAX_TRUNCATION_ERROR and report["within_max_truncation_error"]
    assert report["rank"] > 2  # an element-wise merge of rank-2 experts is of higher rank
    saved = read_lora_deltas(tmp_path / "auto")
    assert max(int(torch.linalg.matrix_rank(d)) for d in saved.values()) <= report["rank"]
    assert "SVD relative error" in capsys.readouterr().out

    cli.main([*common, "--rank", "1", "--output", str(tmp_path / "rank1")])
    small = json.loads((tmp_path / "rank1" / "merge_report.json").read_text())
    assert small["rank"] == 1 and small["rank_chosen"] == "given" and not small["within_max_truncation_error"]
    assert small["max_relative_error"] == pytest.approx(max(small["relative_error"].values()))
    assert small["max_relative_error"] > MAX_TRUNCATION_ERROR
    assert "warning: the rank-1 LoRA loses more than 0.05" in capsys.readouterr().err


def test_merge_report_is_written_with_fuse_too(tiny_sd15_path, tmp_path, capsys):
    from psalign.safetydpo import merge_experts as cli

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None)
    experts = _tiny_experts(pipe, tmp_path)
    assert cli.main(["--experts", *map(str, experts), "--categories", "Hate", "Violence", "--pretrained_model",
                     str(tiny_sd15_path), "--method", "average", "--fuse", "--device", "cpu",
                     "--output", str(tmp_path / "fused")]) == 0
    report = json.loads((tmp_path / "fused" / "merge_report.json").read_text())
    assert report["fused"] is True and report["rank"] is None and report["method"] == "average"
    assert report["experts"] == [str(e) for e in experts] and report["categories"] == ["Hate", "Violence"]
    assert report["mean_relative_error"] == report["max_relative_error"] == 0.0  # nothing truncated
    assert report["within_max_truncation_error"] and report["max_truncation_error"] == MAX_TRUNCATION_ERROR
    assert "SVD relative error" not in capsys.readouterr().out
    # beside the report, the pipeline with the average of the experts added to its UNet
    fused = UNet2DConditionModel.from_pretrained(tmp_path / "fused", subfolder="unet").state_dict()
    base = pipe.unet.state_dict()
    deltas = [read_lora_deltas(e) for e in experts]
    for name in deltas[0]:
        expected = base[f"{name}.weight"] + sum(d[name] for d in deltas) / len(deltas)
        torch.testing.assert_close(fused[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
