"""Train a PSA user adapter (see :mod:`psalign.cli.train_psa`, also installed as ``psalign-train``)."""

import sys

from psalign.cli.train_psa import build_parser, main, parse_args

__all__ = ["build_parser", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
