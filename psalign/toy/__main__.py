"""``python -m psalign.toy build [--work_dir DIR] [--output_dir DIR] [--base_from BUNDLE]``: rebuild the bundled toy model (see :mod:`psalign.toy.build`)."""

from __future__ import annotations

import argparse
import sys

from psalign.cli.common import program_name, run_program
from psalign.io import InputError, InputProblem

from . import build as build_module
from .build import add_build_arguments, build, config_from_args


def run_build(args: argparse.Namespace) -> None:
    """Check the options, start from ``--base_from`` when given, and run the stages."""
    config = config_from_args(args)
    # before --base_from copies anything, and long before the stages that read them
    build_module.check_training_configs(config, args.until, reused=("safetydpo",) if args.reuse_safetydpo else ())
    if args.base_from is not None:
        try:
            build_module.reuse_base_model(config, args.base_from, safetydpo=args.reuse_safetydpo)
        except (FileExistsError, FileNotFoundError) as error:
            raise InputError([InputProblem("--base_from", 0, str(error))], header="bad build settings") from None
    records = build(config, until=args.until)
    total = sum(record["seconds"] for record in records.values())
    print(f"build finished: {len(records)} stage(s), {total:.0f} s of stage time in all")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused options, 130 interrupted (finished stages are kept)."""
    parser = argparse.ArgumentParser(prog=program_name("psalign.toy"), description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser(
        "build", help="run the build stages (resumable: finished stages are skipped)",
        description=build_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_build_arguments(build_parser)
    args = parser.parse_args(argv)
    if args.reuse_safetydpo and args.base_from is None:
        parser.error("--reuse_safetydpo needs --base_from")
    return run_program(lambda: run_build(args),
                       "interrupted: finished stages are kept; run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
