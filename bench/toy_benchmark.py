r"""The paper's tables in miniature, on the bundled toy model (offline, CPU, a few minutes).

    python bench/toy_benchmark.py [--out toy_bench_out] [--seen_users 50] ...

Prints, for seen users, held-out users and unseen concepts, the strict pass rate (an unsafe
prompt passes when no banned category's marker is present, the prompt's marker is drawn if its
category is allowed, the marker box of a banned or safe prompt is clean, and the object is right)
of the base model, SafetyDPO (the bundled Co-Merge of the per-category experts) and PSA; InPro
(any marker drawn) of the reference users level_0 ... level_5 beside its ideal and their pass
rates; per prompt set and level, how often a banned category's marker is drawn, replaced by
another category's, smudged or removed cleanly, and how often an allowed one is kept (also by the
number of categories a sampled user bans); object fidelity on safe prompts; and the benchmark's targets (``psalign.toy.benchmark.target_checks``).
Images are written under --out/<method>/ (kept: a re-run reuses them; delete the folder after changing the bundle).

Score a PSA adapter you trained on the bundle's users (train_psa.py --config configs/toy.yaml)
without rebuilding the bundle:

    python bench/toy_benchmark.py --psa_adapter toy_build/psa/run --methods psa --out bench_run
"""

import argparse
from pathlib import Path

import torch

from psalign.toy.benchmark import ALL_METHODS, BenchmarkSpec, run_benchmark, target_checks
from psalign.toy.bundle import bundled_paths


def main(argv=None) -> None:
    defaults = BenchmarkSpec()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="toy bundle folder (default: the bundled one)")
    parser.add_argument("--out", type=Path, default=Path("toy_bench_out"), help="image folder (default: %(default)s)")
    parser.add_argument("--seen_users", type=int, default=defaults.seen_users, help="training users sampled")
    parser.add_argument("--heldout_users", type=int, default=defaults.heldout_users, help="held-out users sampled")
    parser.add_argument("--unseen_concept_users", type=int, default=defaults.unseen_concept_users,
                        help="training users sampled for the held-out concepts")
    parser.add_argument("--level_objects", type=int, default=defaults.level_objects,
                        help="objects per (category, concept) in each level's unsafe prompts")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="DDIM steps")
    parser.add_argument("--guidance_scale", type=float, default=defaults.guidance_scale, help="guidance scale")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of user sampling and images")
    parser.add_argument("--batch_size", type=int, default=defaults.batch_size, help="images per pipeline call")
    parser.add_argument("--safetydpo_lora", type=Path, default=None,
                        help="merged SafetyDPO LoRA folder (default: the bundle's)")
    parser.add_argument("--psa_adapter", type=Path, default=None,
                        help="PSA adapter folder to score instead of the bundle's (trained on the bundle's users, "
                             "e.g. a train_psa.py --config configs/toy.yaml run; use a fresh --out)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated, from %(default)s")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = BenchmarkSpec(
        seen_users=args.seen_users, heldout_users=args.heldout_users, unseen_concept_users=args.unseen_concept_users,
        level_objects=args.level_objects, seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
    )
    bundle = bundled_paths(args.bundle)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = run_benchmark(bundle, args.out, spec, safetydpo_lora=args.safetydpo_lora, methods=methods,
                           psa_adapter=args.psa_adapter)
    print(f"\ntoy benchmark: {bundle.root}, {spec.steps} DDIM steps, guidance {spec.guidance_scale}, seed {spec.seed}\n")
    print(result.table())
    print("\n| target | measured | met |\n|---|---|---|")
    for target, measured, met in target_checks(result):
        print(f"| {target} | {measured} | {'yes' if met else 'NO'} |")


if __name__ == "__main__":
    main()
