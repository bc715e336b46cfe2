"""``python evaluate.py --metrics inpro``: evaluate generated images (see :mod:`psalign.cli.evaluate`,
also installed as ``psalign-eval``)."""

import sys

from psalign.cli.evaluate import build_parser, evaluation_config, main

__all__ = ["build_parser", "evaluation_config", "main"]

if __name__ == "__main__":
    sys.exit(main())
