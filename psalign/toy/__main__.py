"""``python -m psalign.toy build [--work DIR] [--output_dir DIR] [--base_from BUNDLE]``: rebuild the bundled toy model (see :mod:`psalign.toy.build`)."""

from __future__ import annotations

import argparse
import sys

from . import build as build_module
from .build import add_build_arguments, build, config_from_args


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused options."""
    parser = argparse.ArgumentParser(prog="python -m psalign.toy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser(
        "build", help="run the build stages (resumable: finished stages are skipped)",
        description=build_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_build_arguments(build_parser)
    args = parser.parse_args(argv)
    if args.command == "build":
        config = config_from_args(args)
        if args.reuse_safetydpo and args.base_from is None:
            parser.error("--reuse_safetydpo needs --base_from")
        if args.base_from is not None:
            try:
                build_module.reuse_base_model(config, args.base_from, safetydpo=args.reuse_safetydpo)
            except (FileExistsError, FileNotFoundError) as error:
                parser.exit(2, f"error: --base_from: {error}\n")
        records = build(config, until=args.until)
        total = sum(record["seconds"] for record in records.values())
        print(f"build finished: {len(records)} stage(s), {total:.0f} s of stage time in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
