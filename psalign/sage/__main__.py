"""``python -m psalign.sage build --config sage_build.yaml [--key value ...]``: build Sage-style data.

Exit status 2 for bad settings or inputs (each named with file, line and key) and when the writer
or judge endpoint fails (rerun to resume: finished work is kept), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from psalign.cli.common import HelpFormatter, run_program
from psalign.metrics.judge import JudgeError

from .build import STAGES, build
from .config import add_flags, load_config

#: What a failed endpoint or Ctrl-C leaves behind.
RESUME_HINT = "finished work is kept: run the same command again to resume"


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m psalign.sage", description=__doc__.split("\n\n")[0],
                                   formatter_class=HelpFormatter)
    commands = main.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser(
        "build", help="run the stages concepts -> prompts -> images -> filter -> pairs (finished ones are skipped)",
        formatter_class=HelpFormatter,
        description="Build Sage-style preference data; every setting is a YAML key and a --key flag "
                    "(flags win). See docs/sage_build.md.")
    build_parser.add_argument("--config", help="YAML file of settings (keys: the flags below without --)")
    build_parser.add_argument("--until", choices=STAGES, default=STAGES[-1], help="last stage to run")
    add_flags(build_parser)
    return main


def run_build(path: str | None, until: str, flags: dict[str, Any]) -> None:
    """Load the settings, run the stages up to ``until`` and print what each took."""
    config = load_config(path, flags)
    try:
        records = build(config, until)
    except JudgeError as error:
        raise JudgeError(f"{error} ({RESUME_HINT})") from None
    for stage, record in records.items():
        print(f"{stage}: done ({record.get('seconds', '?')} s)" if record else f"{stage}: done")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 bad settings or a failed endpoint (one message), 130 interrupted."""
    args = vars(parser().parse_args(argv))
    args.pop("command")
    path, until = args.pop("config"), args.pop("until")
    return run_program(lambda: run_build(path, until, args), f"interrupted: {RESUME_HINT}", refused=(JudgeError,))


if __name__ == "__main__":
    sys.exit(main())
