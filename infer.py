r"""Personalized generation from a prompts JSONL file (SD1.5 or SDXL, optionally with a PSA adapter).

    python infer.py --meta_data prompts.jsonl --save_path out/ --load_psa    # the bundled toy model
    python infer.py --sd_model PATH_OR_ID --psa_path ADAPTER --load_psa --meta_data prompts.jsonl \
        --save_path out/ --embeds_folder embeds/ [--llm_model NAME] [--batch_size 4]
    accelerate launch infer.py ...        # shards the records over processes

Each line of the prompts file: {"file_name": "img_0001.png", "caption": "...", "user_data": {...}}
with User_ID (embedding read from --embeds_folder), a profile (embedding computed with --llm_model),
or safety_level (level_0 ... level_5, permissive / moderate / strict). Every problem in the inputs
and options is reported as file:line (or --flag: reason) before any model is loaded, and nothing
is written then. Existing images are skipped (resume) unless --overwrite; each image is written
together with its generation_log.jsonl line, so Ctrl-C or a crash leaves a folder that resumes.
Without --load_psa the base model generates with the same per-image seeds.
"""

import argparse
import sys
import textwrap
from pathlib import Path

from psalign.inference import GenerationSettings, InferenceConfig, run_inference, with_toy_defaults
from psalign.inference.records import MAX_CAPTION_CHARS, MAX_FILE_NAME_BYTES, USER_RULE
from psalign.io import MAX_JSON_DEPTH, MAX_JSON_INT_DIGITS, MAX_LINE_BYTES, InputError
from psalign.methods import method_names
from psalign.methods.prompt import PROMPT_MODES
from psalign.methods.sld import SLD_PRESETS
from psalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS


EPILOG = f"""users: {textwrap.fill(USER_RULE, 100, subsequent_indent="  ")}

bounds per prompts line: {MAX_LINE_BYTES} bytes, a caption of {MAX_CAPTION_CHARS} characters, a file_name
of {MAX_FILE_NAME_BYTES} bytes (each part short enough for the file system with its temporary name),
JSON nested at most {MAX_JSON_DEPTH} deep and integers of at most {MAX_JSON_INT_DIGITS} digits. user_data keys other than User_ID,
safety_level, Cluster_ID and the profile fields are errors; other top-level keys are warned about.
"""


def parse_args(argv=None) -> InferenceConfig:
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--meta_data", type=Path, required=True, help="prompts JSONL file")
    io.add_argument("--save_path", type=Path, required=True, help="output folder for images and generation_log.jsonl")
    io.add_argument("--sd_model", help="diffusers pipeline folder or hub id (SD1.5 or SDXL); default: the bundled "
                    "toy model, with its adapter and user embeddings for --load_psa (python -m psalign.toy build)")
    io.add_argument("--sdxl", action="store_true", help="insist on SDXL (it is detected from the model anyway)")
    io.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    io.add_argument("--skip_invalid", action="store_true", help="generate the valid lines and report the rest")
    io.add_argument("--grid", choices=["user", "prompt"], help="also write a contact sheet per user or per prompt")
    methods = parser.add_argument_group("alignment method")
    methods.add_argument("--method", help=f"one of: {', '.join(method_names())}; or package.module:NAME for a plug-in "
                         "(default: psa with --load_psa, safetydpo with --lora_path, else base)")
    methods.add_argument("--lora_path", type=Path, help="safetydpo: LoRA weights in diffusers format")
    methods.add_argument("--lora_scale", type=float, default=1.0, help="safetydpo: LoRA strength")
    methods.add_argument("--prompt_mode", choices=PROMPT_MODES, default="both",
                         help="prompt: append an instruction, build a negative prompt, or both")
    methods.add_argument("--unet_weights", type=Path, help="erased_unet: safetensors UNet state dict (ESD-u, UCE, ...)")
    methods.add_argument("--sld_preset", choices=SLD_PRESETS, default="medium", help="sld: Safe Latent Diffusion preset")
    psa = parser.add_argument_group("personalization (psa)")
    psa.add_argument("--load_psa", action="store_true", help="shorthand for --method psa")
    psa.add_argument("--psa_path", type=Path, help="adapter folder (psalign format) or published psa_adapter.bin")
    psa.add_argument("--psa_scale", type=float, default=1.0, help="strength of the user branch (0 = base model)")
    psa.add_argument("--embeds_folder", type=Path, help="folder of <User_ID>.npy user embeddings (read and written)")
    psa.add_argument("--encoder", choices=["llm", "sentence"], default="llm",
                     help="how profile users are embedded (as `python -m psalign.embed` does): llm = masked mean "
                          "of --llm_model's last layer; sentence = mean-pooled --sentence_model")
    psa.add_argument("--llm_model", help="causal LM (hub id or folder) for --encoder llm")
    psa.add_argument("--sentence_model", help="sentence encoder folder (default: the offline MiniLM package)")
    gen = parser.add_argument_group("sampling")
    gen.add_argument("--batch_size", type=int, default=1, help="images per pipeline call (a batch may mix users)")
    gen.add_argument("--num_inference_steps", type=int, default=None,
                     help=f"denoising steps (default: {GenerationSettings.num_inference_steps}; {DEFAULT_STEPS} for the toy model)")
    gen.add_argument("--guidance_scale", type=float, default=None,
                     help=f"classifier-free guidance (default: {GenerationSettings.guidance_scale}; {DEFAULT_GUIDANCE} for the toy model)")
    gen.add_argument("--negative_prompt", default=None, help="negative prompt for every image (none by default)")
    gen.add_argument("--height", type=int, default=None, help="image height in px (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width in px (default: the model's)")
    gen.add_argument("--seed", type=int, default=0, help="run seed; each image's seed derives from it and file_name")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: Accelerate's choice)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                     help="pipeline dtype (default: float16 on GPU, float32 on CPU)")
    args = parser.parse_args(argv)
    sampling = {k: getattr(args, k) for k in ("num_inference_steps", "guidance_scale") if getattr(args, k) is not None}
    settings = GenerationSettings(
        seed=args.seed,
        **sampling,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
    )
    fields = {k: v for k, v in vars(args).items() if k in InferenceConfig.__dataclass_fields__}
    config = InferenceConfig(**fields, settings=settings)
    if config.sd_model is None:
        config = with_toy_defaults(config, chosen_settings=sampling)
        print(f"no --sd_model: using the bundled toy model {config.sd_model}", file=sys.stderr)
    return config


def main(argv=None) -> int:
    """Exit status: 0 done, 2 a problem in the inputs (nothing written), 130 interrupted (resumable)."""
    config = parse_args(argv)
    try:
        written = run_inference(config)
    except InputError as error:
        print(error, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the images in {config.save_path} are kept with their log lines; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    print(f"wrote {len(written)} image(s) to {config.save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
