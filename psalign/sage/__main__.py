"""``python -m psalign.sage build --config sage_build.yaml [--key value ...]``: build Sage-style data.

Exit status 2 for bad settings or inputs (each named with file, line and key), 1 when the writer
or judge endpoint fails (rerun to resume: finished work is kept).
"""

from __future__ import annotations

import argparse
import sys

from psalign.io import InputError
from psalign.metrics.judge import JudgeError

from .build import STAGES, build
from .config import add_flags, load_config


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m psalign.sage", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser(
        "build", help="run the stages concepts -> prompts -> images -> filter -> pairs (finished ones are skipped)",
        description="Build Sage-style preference data; every setting is a YAML key and a --key flag "
                    "(flags win). See docs/sage_build.md.")
    build_parser.add_argument("--config", help="YAML file of settings (keys: the flags below without --)")
    build_parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="last stage to run (default: pairs)")
    add_flags(build_parser)
    return main


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    args.pop("command")
    path, until = args.pop("config"), args.pop("until")
    try:
        config = load_config(path, {k: v for k, v in args.items()})
        records = build(config, until)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except JudgeError as error:
        print(f"error: {error}\n(finished work is kept: run the same command again to resume)", file=sys.stderr)
        return 1
    for stage, record in records.items():
        print(f"{stage}: done ({record.get('seconds', '?')} s)" if record else f"{stage}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
