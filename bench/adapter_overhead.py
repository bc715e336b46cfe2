"""Cost of the PSA adapter in one UNet forward: base vs the N = 1 fast path vs decoupled attention.

Builds the real SD1.5 (or SDXL) UNet architecture from its config with random weights (nothing is
downloaded), then times, alternating the variants A B C A B C ... and reporting medians:

* ``base``: the stock UNet;
* ``psa fast (N=1)``: the adapter with one user token, as psalign runs it (one broadcast add per
  cross-attention layer; the per-user vectors are computed once per user set, outside the loop);
* ``psa decoupled``: the same adapter forced through real attention over the user token, i.e. an
  extra attention call per layer per step, as the published code runs every adapter.

Whole-UNet CPU timings are noisy, so the same three variants are also timed on one cross-attention
layer (the first, highest-resolution one), where the difference is resolvable.

    python bench/adapter_overhead.py                       # SD1.5, 32x32 latents, batch 2
    python bench/adapter_overhead.py --model sdxl --latent 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from psalign.adapter import PSAAdapter, cross_attention_layers

SD15_UNET = dict(
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
)
SDXL_UNET = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
USER_DIM = 3584  # Qwen2.5-7B hidden size, as in the published embeddings


def median_times(variants: dict, repeats: int) -> dict[str, float]:
    """Run each variant once to warm up, then ``repeats`` rounds alternating them; medians in seconds."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, medians: dict[str, float]) -> None:
    base = medians["base"]
    print(f"\n{title}")
    print("| variant | median time | ratio to base |\n|---|---:|---:|")
    for name, value in medians.items():
        unit = f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.3f} s"
        print(f"| {name} | {unit} | {value / base:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15", help="UNet architecture")
    parser.add_argument("--latent", type=int, default=32, help="latent height/width (64 = 512 px for SD1.5)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with guidance)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per variant (whole UNet)")
    parser.add_argument("--layer_repeats", type=int, default=200, help="timed rounds per variant (one layer)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="UNet dtype (default: float16 on GPU, float32 on CPU)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device != "cpu" else torch.float32)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(SD15_UNET if args.model == "sd15" else SDXL_UNET)).to(args.device, dtype).eval()
    b, size, d_c = args.batch, args.latent, unet.config.cross_attention_dim
    inputs = dict(
        sample=torch.randn(b, 4, size, size, device=args.device, dtype=dtype),
        timestep=torch.full((b,), 500, device=args.device),
        encoder_hidden_states=torch.randn(b, 77, d_c, device=args.device, dtype=dtype),
    )
    if args.model == "sdxl":
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(b, 1280, device=args.device, dtype=dtype),
            time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=args.device, dtype=dtype).repeat(b, 1),
        )
    adapter = PSAAdapter.for_unet(unet, USER_DIM).to(args.device).attach(unet)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.02)

    def conditionings(users: torch.Tensor) -> tuple:
        """The fast-path and decoupled-attention conditionings for the same users (computed once, as per user set)."""
        with torch.no_grad():
            adapter.fast_path = True
            fast = adapter(users)
            adapter.fast_path = False
            general = adapter(users)
            adapter.fast_path = True
        return fast, general

    def timed(fn, cond):
        def call():
            with torch.no_grad():
                if cond is None:
                    with adapter.disabled():
                        fn()
                else:
                    adapter.activate(cond)
                    fn()
            sync()

        return call

    # One layer: the first cross-attention layer, on hidden states of its real shape.
    name, attn = next(iter(cross_attention_layers(unet).items()))
    width = attn.to_q.in_features
    tokens = (size // (2 if args.model == "sdxl" else 1)) ** 2
    hidden = torch.randn(b, tokens, width, device=args.device, dtype=dtype)
    context = inputs["encoder_hidden_states"]
    fast_cond, general_cond = conditionings(torch.randn(b, USER_DIM, device=args.device))

    print(f"# {args.model} UNet, latents {size}x{size}, batch {b}, {args.device}, {dtype}, "
          f"{len(adapter.config.layer_names)} cross-attention layers, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    def layer_fn():
        attn.processor(attn, hidden, context)

    layer = median_times(
        {"base": timed(layer_fn, None), "psa fast (N=1)": timed(layer_fn, fast_cond),
         "psa decoupled": timed(layer_fn, general_cond)},
        args.layer_repeats,
    )
    print_table(f"One cross-attention layer ({name}, {tokens} tokens x {width}), {args.layer_repeats} rounds", layer)

    def unet_fn():
        unet(**inputs)

    whole = median_times(
        {"base": timed(unet_fn, None), "psa fast (N=1)": timed(unet_fn, fast_cond),
         "psa decoupled": timed(unet_fn, general_cond)},
        args.repeats,
    )
    print_table(f"Whole UNet forward, {args.repeats} rounds", whole)


if __name__ == "__main__":
    main()
