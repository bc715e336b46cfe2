"""Embed every user of a users file: ``python -m psalign.embed --users users.csv --llm_model NAME --embeds_folder embeds/``.

Writes ``<embeds_folder>/<User_ID>.npy`` (float32 (D,)) per user and ``embedding_stats.npz``
(population mean and std) beside them. A rerun skips users already embedded, so an interrupted run
resumes; ``embedding_info.json`` records the encoder, model and template (``infer.py`` embeds profile
users with the same template), and a rerun with other ones is refused instead of mixing
embeddings of different models in one folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psalign.cli.common import HelpFormatter, declared_default, given, program_name, run_program
from psalign.embeddings import (
    DEFAULT_SENTENCE_MODEL_NAME,
    DEFAULT_PROFILE_TEMPLATE,
    PROFILE_TEMPLATE_FIELDS,
    CausalLMUserEncoder,
    SentenceUserEncoder,
    claim_embedding_folder,
    default_sentence_model_path,
    embedding_info,
    embed_users,
    pending_users,
    write_embedding_stats,
)
from psalign.hub import pretrained_problem
from psalign.io import InputError, InputProblem, writable_folder_problem
from psalign.users import UserProfile, read_template, read_users


#: The user encoder of each ``--encoder``.
ENCODERS = {"llm": CausalLMUserEncoder, "sentence": SentenceUserEncoder}


def _batch_size_help() -> str:
    """``--batch_size``'s help, with each encoder's own default."""
    defaults = ", ".join(f"{declared_default(kind, 'batch_size')} for {name}" for name, kind in ENCODERS.items())
    return f"users per forward pass (default: {defaults})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--batch_size`` and ``--device`` are absent unless given (the encoders'
    defaults apply)."""
    parser = argparse.ArgumentParser(
        prog=program_name("psalign.embed"), formatter_class=HelpFormatter,
        description="Embed user profiles with a causal LM (masked mean of its last hidden layer) or a "
        "sentence encoder; one <User_ID>.npy per user plus embedding_stats.npz. Reruns resume.",
    )
    parser.add_argument("--users", required=True, type=Path, help="users CSV (published or explicit layout)")
    parser.add_argument("--embeds_folder", "--out", dest="embeds_folder", required=True, type=Path,
                        help="folder for the .npy files and statistics")
    parser.add_argument(
        "--encoder", choices=tuple(ENCODERS), default="llm", help="llm: --llm_model; sentence: --sentence_model"
    )
    parser.add_argument("--llm_model", help="causal LM (hub id or local folder), e.g. Qwen/Qwen2.5-7B-Instruct")
    parser.add_argument(
        "--sentence_model", type=Path, help="sentence encoder folder (default: the offline all-MiniLM-L6-v2 package)"
    )
    parser.add_argument(
        "--template",
        type=Path,
        help="profile text template file; placeholders: " + ", ".join("{%s}" % f for f in PROFILE_TEMPLATE_FIELDS),
    )
    parser.add_argument("--batch_size", type=int, default=argparse.SUPPRESS, help=_batch_size_help())
    parser.add_argument("--device", default=argparse.SUPPRESS, help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    if args.encoder == "llm" and not args.llm_model:
        parser.error("--encoder llm needs --llm_model")
    if args.encoder == "sentence" and args.llm_model:
        parser.error("--llm_model is only used with --encoder llm")
    if args.encoder == "llm" and args.sentence_model:
        parser.error("--sentence_model is only used with --encoder sentence")
    if vars(args).get("batch_size", 1) < 1:
        parser.error("--batch_size must be >= 1")
    return args


def _encoder_problem(args: argparse.Namespace) -> InputProblem | None:
    """Why the encoder's model cannot be loaded (a missing folder, an unreachable hub id, the
    offline sentence-encoder package not installed), found without loading it."""
    if args.encoder == "llm":
        return pretrained_problem(args.llm_model, "--llm_model")
    if args.sentence_model is None:
        try:
            default_sentence_model_path()
        except ImportError as error:
            return InputProblem("--sentence_model", 0, str(error))
        return None
    if not args.sentence_model.is_dir():
        return InputProblem(str(args.sentence_model), 0, "--sentence_model: no such model folder")
    return pretrained_problem(str(args.sentence_model), "--sentence_model")


def check_inputs(args: argparse.Namespace) -> tuple[list[UserProfile], str]:
    """The users and the profile template, once every input is known to be usable: the users file,
    the template, the model and the embeddings folder. :class:`InputError` lists every problem;
    nothing is loaded or written before this returns."""
    problems: list[InputProblem] = []
    users, template = [], DEFAULT_PROFILE_TEMPLATE
    try:
        users = read_users(args.users)
    except InputError as error:
        problems += error.problems
    if args.template is not None:
        try:
            template = read_template(args.template, PROFILE_TEMPLATE_FIELDS)
        except InputError as error:
            problems += error.problems
    if (problem := _encoder_problem(args)) is not None:
        problems.append(problem)
    if (reason := writable_folder_problem(args.embeds_folder)) is not None:
        problems.append(InputProblem(str(args.embeds_folder), 0, reason, "--embeds_folder"))
    if problems:
        raise InputError(problems, header=f"{len(problems)} problem(s) found before loading any model")
    return users, template


def embed(args: argparse.Namespace) -> None:
    """Embed the users of ``args.users`` not yet in ``args.embeds_folder``, then write the statistics."""
    users, template = check_inputs(args)
    model = args.llm_model if args.encoder == "llm" else str(args.sentence_model or DEFAULT_SENTENCE_MODEL_NAME)
    try:
        claim_embedding_folder(args.embeds_folder, embedding_info(args.encoder, model, template))
    except ValueError as error:
        raise InputError([InputProblem(str(args.embeds_folder), 0, str(error))]) from None
    todo = pending_users(users, args.embeds_folder)
    print(f"{len(users)} users, {len(users) - len(todo)} already embedded in {args.embeds_folder}, {len(todo)} to do")
    if todo:
        kind = ENCODERS[args.encoder]
        encoder = kind(args.llm_model if args.encoder == "llm" else args.sentence_model, **given(args, kind))
        embed_users(encoder, todo, args.embeds_folder, template)
    stats = write_embedding_stats(args.embeds_folder, [u.user_id for u in users])
    print(f"wrote {stats}")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 refused inputs, 130 interrupted (rerun to resume)."""
    args = parse_args(argv)
    return run_program(lambda: embed(args), "interrupted: the users embedded so far are kept; rerun to resume")


if __name__ == "__main__":
    sys.exit(main())
