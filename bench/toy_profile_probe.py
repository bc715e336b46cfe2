r"""How readable are a profile template's bans from its sentence embeddings? (offline, CPU, ~1 min)

    python bench/toy_profile_probe.py [--templates "T1" "T2" ...] [--steps 1000]

For each template, every toy training user's profile text is embedded with the offline MiniLM
encoder and standardised with the training users' mean and std (as the adapter's user projection
does), and a linear probe (one logistic regression per category, full-batch Adam from zero) is
fitted to read the user's banned categories from it. The table shows how well that probe reads
users it was not fitted on: the held-out toy users (share of (user, category) bans right), every
single-category ban and every two-category ban of an otherwise default profile, and the reference
users level_0 ... level_5 (shares of profiles whose seven bans are all read right), and the
probe's probability that level_1, who bans only Sexuality, bans Sexuality.

The PSA adapter reads the user through a linear projection of the same embedding, so a ban the
probe cannot read is one the adapter is unlikely to follow (not the converse: training can
still tie a readable ban to other bans it always came with). Templates use the placeholders of
``psalign.embeddings.profile_text``; the default compares the toy template with the same lists
as labelled fields (``LABEL_TEMPLATE``, the first bundle's wording).
"""

import argparse
import itertools
from pathlib import Path

import torch

from psalign.categories import CATEGORIES
from psalign.embeddings import BanProbe, SentenceUserEncoder, profile_text
from psalign.levels import LEVEL_BANS, reference_user
from psalign.toy.bundle import bundled_paths
from psalign.toy.sage_data import TOY_PROFILE_TEMPLATE
from psalign.users import read_users

#: The same two lists as labelled fields, without verbs (the first toy bundle's wording).
LABEL_TEMPLATE = "Banned image content: {banned}. Allowed image content: {allowed}."


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", nargs="+", default=[LABEL_TEMPLATE, TOY_PROFILE_TEMPLATE],
                        help="profile templates to compare (default: the first bundle's labelled lists and the toy template)")
    parser.add_argument("--bundle", type=Path, default=None, help="toy bundle whose users are read (default: bundled)")
    parser.add_argument("--steps", type=int, default=1000, help="probe optimisation steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    bundle = bundled_paths(args.bundle)
    train, heldout = read_users(bundle.users_train), read_users(bundle.users_heldout)
    default = reference_user("level_0")
    probes = {
        "single bans": [default.with_banned([category]) for category in CATEGORIES],
        "two-category bans": [default.with_banned(pair) for pair in itertools.combinations(CATEGORIES, 2)],
        "reference users": [reference_user(level) for level in LEVEL_BANS],
    }
    encoder = SentenceUserEncoder(device="cpu")

    def embed(users, template):
        return encoder.encode([profile_text(u, template) for u in users])

    sexuality = CATEGORIES.index("Sexuality")
    print(f"probe fitted on {len(train)} training users' embeddings ({args.steps} steps); read on:\n")
    print("| template | held-out users, bans right | " + " | ".join(f"{k}, all 7 right" for k in probes)
          + " | P(level_1 bans Sexuality) |")
    print("|---" * (len(probes) + 3) + "|")
    for template in args.templates:
        probe = BanProbe.fit(embed(train, template), [u.banned_categories for u in train], steps=args.steps)

        def right(users):
            return probe.read_right(embed(users, template), [u.banned_categories for u in users])

        cells = [f"{right(heldout).mean():.1%} (n={len(heldout)})"]
        cells += [f"{right(users).all(axis=1).mean():.0%} (n={len(users)})" for users in probes.values()]
        level_1 = probe.probabilities(embed([reference_user("level_1")], template))[0, sexuality]
        print(f"| `{template}` | " + " | ".join(cells) + f" | {level_1:.2f} |")


if __name__ == "__main__":
    main()
