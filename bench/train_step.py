"""Seconds per PSA training step and peak memory: psalign's step vs the published structure.

Both variants train the same PSA adapter (one user token) with Diffusion-DPO on the real SD1.5
UNet architecture (random weights, nothing downloaded), with the same batch, latents and text:

* ``psalign``: cached latents (no VAE in memory); the reference prediction is the same UNet
  with the adapter switched off (``psalign.training.objectives.dpo_step_loss``, the trainer's code);
* ``published``: the published structure: a second full UNet copy as the reference, the SD1.5
  VAE encoding the chosen and rejected images and the SD1.5 CLIP text encoder encoding the
  captions at every step, and the published adapter processor
  (an extra attention call over the user token in every cross-attention layer, forward and
  backward, instead of psalign's exact one-token fast path);
* ``kv_anchor``: an adapter with a two-block user text edit trained with the ``kv_anchor`` objective
  (``psalign.training.objectives.kv_anchor_step_loss``): the cached caption and its safe rewrite
  through the edit and the cross-attention layers' key/value projections, no UNet pass.

Each measurement runs in its own process (so peak memory is that variant's alone: peak RSS from
``getrusage`` on CPU, ``max_memory_allocated`` on CUDA); the variants alternate (A B A B ...).
The table shows medians over the runs; its ratios are medians of the ratios within each run
(the run's two measurements ran back to back, under the same load).

At 16x16 latents the UNet passes are bound by reading the UNet's weights rather than by
computation, which shrinks the VAE's share of a step: 16x16 understates what the published
structure costs at training resolutions.

    python bench/train_step.py                            # CPU: 32x32 latents (256 px), 1 pair
    python bench/train_step.py --latent 64 --steps 2      # CPU at SD1.5's 512 px (about 20 min)
    python bench/train_step.py --device cuda --dtype bfloat16 --latent 64 --pairs 4
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from adapter_overhead import SD15_UNET, USER_DIM

#: The SD1.5 VAE architecture (``AutoencoderKL``, 8x downsampling, 4 latent channels).
SD15_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
#: The SD1.5 text encoder architecture (CLIP ViT-L/14 text tower).
SD15_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu",
)
VARIANTS = ("psalign", "published", "kv_anchor")


def measure(variant: str, args: argparse.Namespace) -> dict:
    """Build one variant, run ``warmup`` + ``steps`` training steps; median seconds and peak memory."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from psalign.adapter import PSAAdapter
    from psalign.loss import diffusion_dpo_loss, regression_target
    from psalign.training.conditioning import TextConditioning, vae_latents
    from psalign.training.objectives import dpo_step_loss, kv_anchor_step_loss

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).requires_grad_(False).eval()
    reference_unet = copy.deepcopy(unet).to(device, dtype) if variant == "published" else None
    unet.to(device, dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    published = variant == "published"
    vae = AutoencoderKL(**SD15_VAE).requires_grad_(False).eval().to(device, dtype) if published else None
    text_encoder = None
    if published:
        from transformers import CLIPTextConfig, CLIPTextModel

        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)).requires_grad_(False).eval().to(device, dtype)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    adapter = PSAAdapter.for_unet(unet, USER_DIM, text_edit_layers=2 if variant == "kv_anchor" else 0)
    adapter = adapter.attach(unet).to(device)
    adapter.fast_path = variant == "psalign"
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=5e-6)

    pairs, size = args.pairs, args.latent
    pixels = torch.rand(2 * pairs, 3, 8 * size, 8 * size, device=device) * 2 - 1
    cached_latents = torch.randn(2 * pairs, 4, size, size, device=device)
    text = torch.randn(pairs, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    safe_text = torch.randn(pairs, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    token_ids = torch.randint(0, SD15_TEXT_ENCODER["vocab_size"], (pairs, 77), device=device)
    users = torch.randn(pairs, USER_DIM, device=device)
    null_user = torch.zeros(pairs, dtype=torch.bool, device=device)

    def psalign_step():
        return dpo_step_loss(
            unet, adapter, adapter, scheduler, cached_latents, TextConditioning(text), None, users, null_user, 5000.0
        )

    def published_step():
        latents = vae_latents(vae, pixels).float()
        noise = torch.randn(latents[:pairs].shape, device=device).repeat(2, 1, 1, 1)
        timesteps = torch.randint(0, 1000, (pairs,), device=device).repeat(2)
        noisy = scheduler.add_noise(latents, noise, timesteps).to(dtype)
        with torch.no_grad():
            context = text_encoder(token_ids).last_hidden_state.repeat(2, 1, 1)
        adapter.activate(adapter(users.repeat(2, 1), null_user.repeat(2)))
        model_pred = unet(noisy, timesteps, context).sample
        with torch.no_grad():
            reference_pred = reference_unet(noisy, timesteps, context).sample
        target = regression_target(scheduler, latents, noise, timesteps)
        return diffusion_dpo_loss(model_pred.float(), reference_pred.float(), target.float(), beta=5000.0)

    def kv_anchor_step():
        return kv_anchor_step_loss(adapter, adapter, TextConditioning(text), TextConditioning(safe_text), users,
                                   null_user)

    step = {"psalign": psalign_step, "published": published_step, "kv_anchor": kv_anchor_step}[variant]
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        step().loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"variant": variant, "seconds": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32, help="latent height/width (64 = 512 px, SD1.5's training size)")
    parser.add_argument("--pairs", type=int, default=1, help="preference pairs per step (UNet batch: 2x)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--runs", type=int, default=3, help="runs (processes) per variant, alternating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="dtype of the frozen UNet(s) and VAE (the adapter stays float32)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute UNet activations")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for run in range(args.runs):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--child", variant, *sys.argv[1:]],
                capture_output=True,
                text=True,
                check=True,
            )
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"run {run + 1}/{args.runs} {variant}: {results[variant][-1]['seconds']:.3f} s/step", file=sys.stderr)

    seconds = {v: statistics.median(r["seconds"] for r in results[v]) for v in VARIANTS}
    peak = {v: statistics.median(r["peak_bytes"] for r in results[v]) for v in VARIANTS}
    # Ratios are taken within a run (its two measurements ran back to back), then the median over runs.
    speedups = {v: [p["seconds"] / r["seconds"] for p, r in zip(results["published"], results[v])] for v in VARIANTS}
    memory_ratios = {v: [r["peak_bytes"] / p["peak_bytes"] for p, r in zip(results["published"], results[v])]
                     for v in VARIANTS}
    memory = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"# SD1.5 UNet architecture (random weights), latents {args.latent}x{args.latent} "
          f"({8 * args.latent} px), {args.pairs} pair(s)/step, {args.device}, {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"medians of {args.runs} runs x {args.steps} steps")
    print(f"| variant | s/step | {memory} | speed-up | memory ratio |\n|---|---:|---:|---:|---:|")
    for v in VARIANTS:
        print(f"| {v} | {seconds[v]:.3f} | {peak[v] / 2**30:.2f} GiB | {statistics.median(speedups[v]):.2f}x "
              f"| {statistics.median(memory_ratios[v]):.2f} |")
    print("per-run speed-ups of psalign: " + ", ".join(f"{ratio:.2f}x" for ratio in speedups["psalign"]))


if __name__ == "__main__":
    main()
