r"""Start a training script on N GPUs after checking that they exist and that its inputs are good.

    python -m psalign.cli.launch --num_gpus 4 train_psa.py --config configs/sdxl.yaml ...
    psalign-launch --num_gpus 0 train_psa.py ...        # one process on the CPU (small runs)

What the launchers in ``launchers/`` run. Before any process starts, and so within seconds:

1. ``--num_gpus`` is checked against the GPUs torch sees; asking for more is refused;
2. the script's options are parsed and, for ``train_psa.py``, every input is checked as the
   training run would (data, embeddings, the model folder or hub id, the resume point).

Then ``accelerate launch`` starts the processes (``--multi_gpu`` for more than one GPU, ``--cpu``
for none), with ``--accelerate_args`` passed on. A refused input or a failed process ends the
launcher with the script's exit status and its own one-line message, never a traceback of the
launcher. Exit status: the script's (0 done, 2 refused, 130 interrupted).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from psalign.cli.common import EXIT_INTERRUPTED, EXIT_REFUSED, HelpFormatter, program_name



def gpu_count() -> int:
    """GPUs torch can use here (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_problem(requested: int, available: int) -> str | None:
    """Why ``requested`` GPUs cannot be used when ``available`` are present (None when they can)."""
    if requested < 0:
        return f"NUM_GPUS={requested}: must be 0 (the CPU) or more"
    if requested <= available:
        return None
    found = "no GPU" if available == 0 else f"{available} GPU(s)"
    return (f"NUM_GPUS={requested} asks for {requested} GPU(s), but torch finds {found} here "
            f"(torch.cuda.device_count() = {available}).\n"
            f"  Set NUM_GPUS={available} to use {'the CPU (slow: for small runs)' if available == 0 else 'them all'}"
            + (", or NUM_GPUS=0 for the CPU" if available else "")
            + ", and raise ACCUM (gradient accumulation) to keep the effective batch.")


def check_script_inputs(script: str, script_args: list[str]) -> None:
    """Parse ``script_args`` as ``script`` would and check its inputs without loading a model;
    raises :class:`~psalign.io.InputError` (or exits 2 through argparse) when they are refused."""
    name = Path(script).name
    if name == "train_psa.py":
        from psalign.cli.train_psa import parse_args
        from psalign.training import config_from_args
        from psalign.training.trainer import check_inputs

        check_inputs(config_from_args(parse_args(script_args)))
    elif name == "train_safetydpo.py":
        from psalign.cli.train_safetydpo import parse_args

        parse_args(script_args)


def accelerate_argv(num_gpus: int, accelerate_args: str, script: str, script_args: list[str]) -> list[str]:
    """The ``accelerate launch`` arguments for ``script`` on ``num_gpus`` GPUs (0: the CPU)."""
    devices = ["--cpu", "--num_processes", "1"] if num_gpus == 0 else ["--num_processes", str(num_gpus)]
    if num_gpus > 1:
        devices.append("--multi_gpu")
    return [*shlex.split(accelerate_args), *devices, script, *script_args]


def run_accelerate(argv: list[str]) -> int:
    """Run ``accelerate launch argv`` in this process; the exit status of the processes it started."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    try:
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    except ImportError:  # a torch built without distributed support
        ChildFailedError = subprocess.CalledProcessError
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except subprocess.CalledProcessError as error:
        return error.returncode if error.returncode > 0 else EXIT_INTERRUPTED
    except ChildFailedError as error:
        codes = [failure.exitcode for failure in error.failures.values()]
        return next((code for code in codes if code > 0), EXIT_REFUSED)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("psalign.cli.launch"), description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--num_gpus", type=int, required=True, help="training processes, one per GPU; 0: the CPU")
    parser.add_argument("--accelerate_args", default="",
                        help="more `accelerate launch` arguments, one string (e.g. \"--config_file multi_node.yaml\")")
    parser.add_argument("script", help="the training script (train_psa.py or train_safetydpo.py)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit status: 2 when the GPUs or the inputs are refused, else the training processes'."""
    from psalign.io import InputError

    args = build_parser().parse_args(argv)
    if problem := gpu_problem(args.num_gpus, gpu_count()):
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        check_script_inputs(args.script, args.script_args)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    where = "the CPU" if args.num_gpus == 0 else f"{args.num_gpus} GPU(s)"
    print(f"inputs checked; starting {Path(args.script).name} on {where}", file=sys.stderr)
    try:
        return run_accelerate(accelerate_argv(args.num_gpus, args.accelerate_args, args.script, args.script_args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
