"""Can an adapter read the bans from these embeddings? ``python -m psalign.probe_bans --embeds DIR --train_users CSV``.

Fits :class:`~psalign.embeddings.BanProbe` (one logistic regression per category on standardised
embeddings, Adam from zero: the way the adapter's user projection meets them) to the training
users' embeddings, then reads the bans of each ``--eval_users`` file (and, with ``--levels``, of
the reference users ``level_0`` ... ``level_5``) from theirs. A ban the probe cannot read is one
the adapter is unlikely to follow, so this is a minute's check of an embedding folder (an LLM's
or the sentence encoder's) before hours of training on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from psalign.categories import CATEGORIES
from psalign.cli.common import program_name, run_program
from psalign.embeddings import BanProbe, load_user_embeddings
from psalign.levels import LEVEL_BANS, reference_user
from psalign.users import UserProfile, read_users


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=program_name("psalign.probe_bans"),
        description="Fit a linear ban probe on the training users' embeddings and report how well it "
        "reads other users' bans (per category and per user).",
    )
    parser.add_argument("--embeds_folder", "--embeds", dest="embeds", required=True, type=Path,
                        help="embedding folder (python -m psalign.embed)")
    parser.add_argument("--train_users", required=True, type=Path, help="users CSV the probe is fitted on")
    parser.add_argument("--eval_users", nargs="*", type=Path, default=[], help="users CSVs the probe reads")
    parser.add_argument("--levels", action="store_true", help="also read the reference users level_0 ... level_5")
    parser.add_argument("--steps", type=int, default=1000, help="probe optimisation steps (default 1000)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if not args.eval_users and not args.levels:
        parser.error("give --eval_users, --levels or both")
    return args


def probe_rows(probe: BanProbe, embeds: Path, groups: dict[str, list[UserProfile]]) -> list[list[str]]:
    """One table row per group: name, bans right, users with all 7 right, then each category's share right."""
    rows = []
    for name, users in groups.items():
        vectors = load_user_embeddings(embeds, [u.user_id for u in users])
        right = probe.read_right(np.stack([vectors[u.user_id] for u in users]), [u.banned_categories for u in users])
        rows.append([f"{name} (n={len(users)})", f"{right.mean():.1%}", f"{right.all(axis=1).mean():.1%}"]
                    + [f"{share:.0%}" for share in right.mean(axis=0)])
    return rows


def probe(args: argparse.Namespace) -> None:
    """Fit the probe on ``args.train_users`` and print how well it reads each group."""
    train = read_users(args.train_users)
    groups = {str(path): read_users(path) for path in args.eval_users}
    if args.levels:
        groups["reference users level_0 ... level_5"] = [reference_user(level) for level in LEVEL_BANS]
    vectors = load_user_embeddings(args.embeds, [u.user_id for u in train])
    probe = BanProbe.fit(np.stack([vectors[u.user_id] for u in train]), [u.banned_categories for u in train],
                         steps=args.steps)
    print(f"probe fitted on the {len(train)} users of {args.train_users} ({args.steps} steps); it reads:\n")
    print("| users | bans right | users with all 7 right | " + " | ".join(CATEGORIES) + " |")
    print("|---" * (len(CATEGORIES) + 3) + "|")
    for row in probe_rows(probe, args.embeds, groups):
        print("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused inputs (a bad users file, a missing embedding)."""
    args = parse_args(argv)
    return run_program(lambda: probe(args), refused=(FileNotFoundError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
