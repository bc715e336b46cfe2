r"""Personalized generation from a prompts JSONL file (SD1.5 or SDXL, optionally with a PSA adapter).

    python infer.py --prompts prompts.jsonl                  # the bundled toy model, into outputs/images/
    python infer.py --pretrained_model PATH_OR_ID --adapter ADAPTER --prompts prompts.jsonl \
        --output_dir out/ --embeds_folder embeds/ [--llm_model NAME] [--batch_size 4]
    accelerate launch infer.py ...        # shards the records over processes

Each line of the prompts file: {"file_name": "img_0001.png", "caption": "...", "user_data": {...}}
with User_ID (embedding read from --embeds_folder), a profile (embedding computed with --llm_model),
or safety_level (level_0 ... level_5, permissive / moderate / strict).

Who is personalized for: with an adapter (--adapter, or --load_psa for the bundled toy model) every
line is drawn for its user. With the bundled toy model and no --method, prompts that name users are
drawn with the bundled adapter. Otherwise the users are ignored, and a warning says so.

Every problem in the inputs and options is reported as file:line (or --flag: reason) before any
model is loaded, and nothing is written then. Existing images are skipped (resume) unless
--overwrite; each image is written together with its generation_log.jsonl line, so Ctrl-C or a
crash leaves a folder that resumes. Exit status: 0 done, 2 refused inputs, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

from psalign.cli.common import HelpFormatter, default_text, given, run_program
from psalign.inference import GenerationSettings, InferenceConfig, read_prompt_records, run_inference, with_toy_defaults
from psalign.inference.records import MAX_CAPTION_CHARS, MAX_FILE_NAME_BYTES, USER_RULE
from psalign.inference.run import method_name
from psalign.io import MAX_JSON_DEPTH, MAX_JSON_INT_DIGITS, MAX_LINE_BYTES
from psalign.methods import method_names
from psalign.methods.prompt import PROMPT_MODES
from psalign.methods.sld import SLD_PRESETS
from psalign.toy.bundle import IncompleteBundleError
from psalign.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

EPILOG = f"""users: {textwrap.fill(USER_RULE, 100, subsequent_indent="  ")}

bounds per prompts line: {MAX_LINE_BYTES} bytes, a caption of {MAX_CAPTION_CHARS} characters, a file_name
of {MAX_FILE_NAME_BYTES} bytes (each part short enough for the file system with its temporary name),
JSON nested at most {MAX_JSON_DEPTH} deep and integers of at most {MAX_JSON_INT_DIGITS} digits. user_data keys other than User_ID,
safety_level, Cluster_ID and the profile fields are errors; other top-level keys are warned about.
"""

#: Options that belong to :class:`GenerationSettings` rather than :class:`InferenceConfig`.
_SETTINGS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "height", "width")


def build_parser() -> argparse.ArgumentParser:
    """The ``infer.py`` parser. Options left out are absent from the namespace (their defaults
    live in :class:`InferenceConfig` and :class:`GenerationSettings`)."""
    parser = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    config, sampling = InferenceConfig, GenerationSettings
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--prompts", "--meta_data", dest="meta_data", type=Path, required=True, metavar="JSONL",
                    help="prompts JSONL file")
    io.add_argument("--output_dir", "--save_path", dest="save_path", type=Path, metavar="DIR",
                    help="folder for the images and generation_log.jsonl" + default_text(config, "save_path"))
    io.add_argument("--pretrained_model", "--sd_model", dest="sd_model", metavar="PATH_OR_ID",
                    help="diffusers pipeline folder or hub id (SD1.5 or SDXL); default: the bundled toy model, with "
                         "its adapter and user embeddings (python -m psalign.toy build)")
    io.add_argument("--sdxl", action="store_true", help="insist on SDXL (it is detected from the model anyway)")
    io.add_argument("--overwrite", action="store_true", help="regenerate images that already exist")
    io.add_argument("--skip_invalid", action="store_true", help="generate the valid lines and report the rest")
    io.add_argument("--grid", choices=["user", "prompt"], help="also write a contact sheet per user or per prompt")
    methods = parser.add_argument_group("alignment method")
    methods.add_argument("--method", help=f"one of: {', '.join(method_names())}; or package.module:NAME for a plug-in "
                         "(default: psa with an adapter, safetydpo with --lora_path, else base)")
    methods.add_argument("--lora_path", type=Path, help="safetydpo: LoRA weights in diffusers format")
    methods.add_argument("--lora_scale", type=float, help="safetydpo: LoRA strength" + default_text(config, "lora_scale"))
    methods.add_argument("--prompt_mode", choices=PROMPT_MODES, help="prompt: append an instruction, build a negative "
                         "prompt, or both" + default_text(config, "prompt_mode"))
    methods.add_argument("--unet_weights", type=Path, help="erased_unet: safetensors UNet state dict (ESD-u, UCE, ...)")
    methods.add_argument("--sld_preset", choices=SLD_PRESETS,
                         help="sld: Safe Latent Diffusion preset" + default_text(config, "sld_preset"))
    methods.add_argument("--sld_concept", metavar="TEXT",
                         help="sld: the safety concept text to steer away from (default: diffusers' own)")
    psa = parser.add_argument_group("personalization (psa)")
    psa.add_argument("--adapter", "--psa_path", dest="psa_path", type=Path, metavar="PATH",
                     help="PSA adapter: a folder (psalign format), a published psa_adapter.bin, or a hub repo id; "
                          "implies --method psa")
    psa.add_argument("--adapter_subfolder", metavar="PATH", help="the adapter's folder inside --adapter (a hub repo "
                     "or a local folder)")
    psa.add_argument("--adapter_revision", metavar="REV", help="hub branch, tag or commit of --adapter (default: main)")
    psa.add_argument("--load_psa", action="store_true",
                     help="--method psa (with the bundled toy model: its adapter unless --adapter)")
    psa.add_argument("--psa_scale", type=float, help="strength of the user branch (0 = base model)"
                     + default_text(config, "psa_scale"))
    psa.add_argument("--embeds_folder", type=Path, metavar="DIR",
                     help="folder of <User_ID>.npy user embeddings (read and written)")
    psa.add_argument("--encoder", choices=["llm", "sentence"],
                     help="how profile users are embedded (as `python -m psalign.embed` does): llm = masked mean "
                          "of --llm_model's last layer; sentence = mean-pooled --sentence_model"
                          + default_text(config, "encoder"))
    psa.add_argument("--llm_model", help="causal LM (hub id or folder) for --encoder llm")
    psa.add_argument("--sentence_model", help="sentence encoder folder (default: the offline MiniLM package)")
    gen = parser.add_argument_group("sampling")
    gen.add_argument("--batch_size", type=int, help="images per pipeline call (a batch may mix users)"
                     + default_text(config, "batch_size"))
    gen.add_argument("--num_inference_steps", type=int, help=f"denoising steps (default: "
                     f"{sampling.num_inference_steps}; {DEFAULT_STEPS} for the toy model)")
    gen.add_argument("--guidance_scale", type=float, help=f"classifier-free guidance (default: "
                     f"{sampling.guidance_scale}; {DEFAULT_GUIDANCE} for the toy model)")
    gen.add_argument("--negative_prompt", help="negative prompt for every image (none by default)")
    gen.add_argument("--height", type=int, help="image height in px (default: the model's)")
    gen.add_argument("--width", type=int, help="image width in px (default: the model's)")
    gen.add_argument("--seed", type=int, help="run seed; each image's seed derives from it and file_name"
                     + default_text(sampling, "seed"))
    gen.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: Accelerate's choice)")
    gen.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                     help="pipeline dtype (default: float16 on GPU, float32 on CPU)")
    return parser


def _prompts_name_users(path: Path) -> bool:
    """Whether any valid line of the prompts file names a user (a cheap text read)."""
    records, _ = read_prompt_records(path, need_users=False, warn=lambda problem: None)
    return any(record.user is not None for record in records)


def parse_args(argv: list[str] | None = None) -> InferenceConfig:
    """The :class:`InferenceConfig` of a command line; the bundled toy model (and, for prompts
    that name users, its adapter) fills in a missing ``--pretrained_model``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if "psa_path" not in args and ("adapter_subfolder" in args or "adapter_revision" in args):
        parser.error("--adapter_subfolder and --adapter_revision need --adapter")
    chosen = {k: v for k, v in vars(args).items() if k in _SETTINGS}
    config = InferenceConfig(**given(args, InferenceConfig), settings=GenerationSettings(**chosen))
    if config.sd_model is None:
        if method_name(config) == "base" and config.method is None and _prompts_name_users(config.meta_data):
            config = replace(config, load_psa=True)
            print("the prompts name users: drawing them with the bundled toy adapter (--method base ignores them)",
                  file=sys.stderr)
        config = with_toy_defaults(config, chosen_settings=chosen)
        print(f"no --pretrained_model: using the bundled toy model {config.sd_model}", file=sys.stderr)
    if "save_path" not in vars(args):
        print(f"writing to {config.save_path}/ (--output_dir)", file=sys.stderr)
    return config


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a problem in the inputs or an incomplete toy bundle (nothing written),
    130 interrupted (resumable)."""
    configs: list[InferenceConfig] = []

    def generate() -> None:
        configs.append(parse_args(argv))
        written = run_inference(configs[0])
        print(f"wrote {len(written)} image(s) to {configs[0].save_path}")

    def interrupted() -> str:
        if not configs:
            return "interrupted before any image was drawn"
        return (f"interrupted: the images in {configs[0].save_path} are kept with their log lines; "
                "run the same command again to resume")

    return run_program(generate, interrupted, refused=(IncompleteBundleError,))


if __name__ == "__main__":
    sys.exit(main())
