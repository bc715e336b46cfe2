"""Train one SafetyDPO safety expert (see :mod:`psalign.cli.train_safetydpo`, also installed as ``psalign-train-safetydpo``)."""

import sys

from psalign.cli.train_safetydpo import build_parser, main, parse_args

__all__ = ["build_parser", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
