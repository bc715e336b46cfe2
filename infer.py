"""``python infer.py --prompts prompts.jsonl``: personalized generation (see :mod:`psalign.cli.infer`,
also installed as ``psalign-infer``)."""

import sys

from psalign.cli.infer import build_parser, main, parse_args

__all__ = ["build_parser", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
