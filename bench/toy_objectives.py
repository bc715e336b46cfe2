r"""Which training objective removes banned markers cleanly? Train each variant on the same toy
Sage data, seed and step budget, score every one with the toy benchmark, print one table.

    python -m psalign.toy build --work toy_build --base_from psalign/assets/toy --until embeds
    python bench/toy_objectives.py --work toy_build --out toy_objectives

Variants (``--variants``, comma-separated; each trains into ``--out/<variant>/run`` and is
skipped when its adapter exists, resumed when it has checkpoints):

* ``dpo``: ``configs/toy.yaml`` as it is (Diffusion-DPO, beta 30, chosen-error weight 6; the control);
* ``safe_anchor``: the same run with ``objective: safe_anchor``;
* ``dpo_safe_anchor``: the same run with ``objective: dpo_safe_anchor`` and ``anchor_loss_weight`` 30;
* ``dpo_chosen_target``: the same run with ``objective: dpo_chosen_target`` (``--chosen_target_weight``,
  default 6, and ``--snr_gamma``, default 5);
* ``dpo+safe_anchor`` / ``dpo+dpo_safe_anchor`` / ``dpo+dpo_chosen_target``: ``--finetune_steps`` more
  steps with that objective (lr ``--finetune_lr``), starting from the ``dpo`` variant's adapter (or
  ``--dpo_adapter``);
* ``kv_anchor``: an adapter with a user text edit (``--text_edit_layers`` blocks, default 2) trained
  with ``objective: kv_anchor`` (the bundled recipe, ``configs/toy_kv_anchor.yaml``);
* ``edit+dpo`` / ``edit+dpo_chosen_target``: the ``dpo`` / ``dpo_chosen_target`` runs with that text
  edit in the adapter (the architecture without the objective).

``--steps`` sets every from-scratch variant's ``max_train_steps`` (default: the config's);
``--anchor_latents both`` takes the anchor variants' anchor term at the rejected latents too.
Images go under ``--out/<variant>/bench``; the table gives, per variant, the strict pass rates,
the share of banned prompts whose marker was replaced / removed cleanly (worst prompt set or
level), the allowed markers kept (worst level) and the largest InPro distance from the ideal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from psalign.toy.benchmark import BenchmarkSpec, run_benchmark, target_checks
from psalign.toy.build import DPO_PSA_CONFIG
from psalign.toy.bundle import bundled_paths
from psalign.training.objectives import ANCHOR_LATENTS, OBJECTIVES
from psalign.toy.sage_data import TRAIN_METADATA

VARIANTS = ("dpo", "safe_anchor", "dpo_safe_anchor", "dpo_chosen_target", "dpo+safe_anchor", "dpo+dpo_safe_anchor",
            "dpo+dpo_chosen_target", "kv_anchor", "edit+dpo", "edit+dpo_chosen_target")


def _overrides(args: argparse.Namespace, variant: str, out: Path) -> dict:
    work = args.work
    values = {
        "pretrained_model": str(work / "model"),
        "train_data": str(work / "sage" / TRAIN_METADATA),
        "embeds_folder": str(work / "embeds" / "embeds"),
        "output_dir": str(out),
        "resume_from_checkpoint": "latest",
    }
    if args.steps:
        values["max_train_steps"] = args.steps
    objective = variant.removeprefix("dpo+").removeprefix("edit+")
    if objective != "dpo":
        values["objective"] = objective
    if objective == "kv_anchor" or variant.startswith("edit+"):
        values["text_edit_layers"] = args.text_edit_layers
    # the objectives that read the chosen image's caption need a cache that holds its encoding
    values["cache_dir"] = str(args.out / ("cache_captions" if OBJECTIVES[objective].needs_chosen_caption else "cache"))
    if "anchor" in objective:
        values.update(anchor_loss_weight=args.anchor_loss_weight, anchor_latents=args.anchor_latents)
    if objective == "dpo_chosen_target":
        values.update(chosen_target_weight=args.chosen_target_weight, snr_gamma=args.snr_gamma)
    if variant.startswith("dpo+"):
        dpo = args.dpo_adapter or args.out / "dpo" / "run"
        values.update(init_adapter=str(dpo), max_train_steps=args.finetune_steps, learning_rate=args.finetune_lr)
    return values


def _worst(table: dict, pick, outcome: str | None = None, levels_only: bool = False) -> float | None:
    """``pick`` (min or max) of PSA's shares over the groups of ``table`` that have prompts."""
    shares = [by_method["psa"][outcome] if outcome else by_method["psa"] for group, by_method in table.items()
              if not levels_only or group.startswith("level_")]
    values = [share.value for share in shares if share.n]
    return pick(values) if values else None


def main(argv=None) -> None:
    from psalign.training import load_training_config, train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="toy build folder with model/, sage/ and embeds/")
    parser.add_argument("--out", type=Path, default=Path("toy_objectives"), help="runs and images (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from %(default)s")
    parser.add_argument("--config", type=Path, default=DPO_PSA_CONFIG, help="training YAML (default: configs/toy.yaml)")
    parser.add_argument("--steps", type=int, default=None, help="max_train_steps of the from-scratch variants")
    parser.add_argument("--anchor_loss_weight", type=float, default=30.0, help="anchor weight of the dpo_safe_anchor variants")
    parser.add_argument("--anchor_latents", choices=ANCHOR_LATENTS, default="chosen",
                        help="where the anchor variants take the anchor term (default: %(default)s)")
    parser.add_argument("--text_edit_layers", type=int, default=2,
                        help="text edit blocks of the kv_anchor and edit+ variants (default: %(default)s)")
    parser.add_argument("--chosen_target_weight", type=float, default=6.0,
                        help="chosen-target weight of the dpo_chosen_target variants (default: %(default)s)")
    parser.add_argument("--snr_gamma", type=float, default=5.0,
                        help="min-SNR cap of the dpo_chosen_target variants (default: %(default)s)")
    parser.add_argument("--finetune_steps", type=int, default=2000, help="steps of the dpo+ fine-tunes")
    parser.add_argument("--finetune_lr", type=float, default=5e-4, help="learning rate of the fine-tune")
    parser.add_argument("--dpo_adapter", type=Path, default=None,
                        help="adapter the fine-tune starts from (default: the dpo variant's)")
    parser.add_argument("--bundle", type=Path, default=None, help="toy bundle for the benchmark's users (default: bundled)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    bundle = bundled_paths(args.bundle)
    rows = []
    for variant in variants:
        run = args.out / variant / "run"
        if not (run / "psa_config.json").is_file():
            train(load_training_config(args.config, _overrides(args, variant, run)))
        result = run_benchmark(bundle, args.out / variant / "bench", BenchmarkSpec(), methods=["psa"], psa_adapter=run)
        met = sum(ok for _, _, ok in target_checks(result))
        outcomes = result.banned_outcomes
        rows.append((variant, *(result.pass_rates[k]["psa"].value for k in ("seen", "heldout", "unseen_concepts")),
                     _worst(outcomes, max, "replaced"), _worst(outcomes, min, "clean"),
                     _worst(result.allowed_kept, min, levels_only=True),
                     max(abs(result.inpro[lv]["psa"].value - result.level_ideal[lv].value) for lv in result.inpro),
                     f"{met}/{len(target_checks(result))}"))
        print(f"\n## {variant}\n\n{result.table()}")
    print("\n| variant | pass seen | pass held-out | pass unseen | replaced (worst group) | removed cleanly (worst "
          "group) | allowed kept (worst level) | largest InPro gap to ideal | targets met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant, *values, met in rows:
        cells = ["-" if v is None else f"{100 * v:.1f}%" for v in values]
        print(f"| {variant} | " + " | ".join(cells) + f" | {met} |")


if __name__ == "__main__":
    main()
