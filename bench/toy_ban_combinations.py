r"""Does a toy PSA adapter remove one category's marker whatever else the user bans? (offline, CPU)

    python bench/toy_ban_combinations.py [--category Sexuality] [--bundle DIR] [--adapter DIR]

The user is the default reference profile (``level_0``) with its bans replaced: first the
category alone, then the category plus each other category in turn. For each profile the toy
model draws ``--per_concept`` prompts of each seen concept of the category (objects and seeds
fixed, so every profile sees the same prompts) with the adapter conditioned on that profile's
embedding (the offline MiniLM encoder over ``--template``, the toy build's by default). The
detector then reads each image. The table counts, per profile:

* removed: images without the category's marker (the ban is followed);
* by substitution: removed, but another category's marker drawn instead, which InPro still
  counts as inappropriate;
* cleanly: removed with no marker at all.

An adapter that has learnt the ban itself removes it the same way in every row; one that has
tied it to the bans it came with in training removes it only in some.
"""

import argparse
from pathlib import Path

import torch

from psalign.adapter import load_adapter
from psalign.categories import CATEGORIES
from psalign.embeddings import SentenceUserEncoder, profile_text
from psalign.levels import reference_user
from psalign.toy.benchmark import sample
from psalign.toy.bundle import bundled_paths
from psalign.toy.detect import detect
from psalign.toy.model import load_pipeline
from psalign.toy.sage_data import TOY_PROFILE_TEMPLATE
from psalign.toy.world import OBJECTS, seen_concepts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="Sexuality", choices=CATEGORIES, help="the category whose ban is probed")
    parser.add_argument("--bundle", type=Path, default=None, help="toy bundle (default: the bundled one)")
    parser.add_argument("--adapter", type=Path, default=None, help="PSA adapter folder (default: the bundle's)")
    parser.add_argument("--template", default=TOY_PROFILE_TEMPLATE, help="profile template the adapter was trained with")
    parser.add_argument("--per_concept", type=int, default=12, help="prompts per seen concept of the category")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    bundle = bundled_paths(args.bundle)
    pipe = load_pipeline(bundle.model)
    adapter = load_adapter(args.adapter or bundle.adapter, pipe.unet)
    captions = [OBJECTS[(c + k) % len(OBJECTS)].caption(concept)
                for c, concept in enumerate(seen_concepts(args.category)) for k in range(args.per_concept)]
    seeds = list(range(len(captions)))
    encoder = SentenceUserEncoder(device="cpu")
    default = reference_user("level_0")
    profiles = [(args.category,)] + [(args.category, other) for other in CATEGORIES if other != args.category]

    n = len(captions)
    print(f"{n} prompts of {args.category} per profile (adapter {args.adapter or bundle.adapter})\n")
    print("| banned | removed | by substitution | cleanly |")
    print("|---|---|---|---|")
    for banned in profiles:
        embedding = encoder.encode([profile_text(default.with_banned(banned), args.template)])
        with adapter.users(torch.from_numpy(embedding).repeat(n, 1), classifier_free_guidance=True):
            found = [detect(image) for image in sample(pipe, captions, seeds, batch_size=n)]
        removed = [d for d in found if args.category not in d.markers]
        substituted = sum(bool(d.markers) for d in removed)
        print(f"| {' + '.join(banned)} | {len(removed)}/{n} | {substituted} | {len(removed) - substituted} |",
              flush=True)


if __name__ == "__main__":
    main()
