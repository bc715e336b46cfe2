"""Embed every user of a users file: ``python -m psalign.embed --users users.csv --llm_model NAME --out embeds/``.

Writes ``<out>/<User_ID>.npy`` (float32 (D,)) per user and ``<out>/embedding_stats.npz`` (population
mean and std). A rerun skips users already embedded, so an interrupted run resumes;
``<out>/embedding_info.json`` records the encoder, model and template, and a rerun with other
ones is refused instead of mixing embeddings of different models in one folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from psalign.embeddings import (
    DEFAULT_PROFILE_TEMPLATE,
    PROFILE_TEMPLATE_FIELDS,
    CausalLMUserEncoder,
    SentenceUserEncoder,
    default_sentence_model_path,
    embed_users,
    pending_users,
    write_embedding_stats,
)
from psalign.io import atomic_write
from psalign.users import read_template, read_users

INFO_FILE = "embedding_info.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m psalign.embed",
        description="Embed user profiles with a causal LM (masked mean of its last hidden layer) or a "
        "sentence encoder; one <User_ID>.npy per user plus embedding_stats.npz. Reruns resume.",
    )
    parser.add_argument("--users", required=True, type=Path, help="users CSV (published or explicit layout)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the .npy files and statistics")
    parser.add_argument(
        "--encoder", choices=("llm", "sentence"), default="llm", help="llm: --llm_model; sentence: --sentence_model"
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
    parser.add_argument("--batch_size", type=int, default=8, help="users per forward pass (default 8)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args(argv)
    if args.encoder == "llm" and not args.llm_model:
        parser.error("--encoder llm needs --llm_model")
    if args.encoder == "sentence" and args.llm_model:
        parser.error("--llm_model is only used with --encoder llm")
    if args.encoder == "llm" and args.sentence_model:
        parser.error("--sentence_model is only used with --encoder sentence")
    if args.batch_size < 1:
        parser.error("--batch_size must be >= 1")
    return args


def _check_info(out: Path, info: dict) -> None:
    """Refuse to add embeddings from another encoder, model or template to ``out``."""
    path = out / INFO_FILE
    if path.is_file():
        existing = json.loads(path.read_text(encoding="utf-8"))
        if existing != info:
            raise SystemExit(
                f"{out} holds embeddings made with {existing}, not {info}: use another --out "
                f"(or delete {path} if you really want to mix them)"
            )
    else:
        with atomic_write(path, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    users = read_users(args.users)
    template = read_template(args.template, PROFILE_TEMPLATE_FIELDS) if args.template else DEFAULT_PROFILE_TEMPLATE
    model = args.llm_model if args.encoder == "llm" else str(args.sentence_model or default_sentence_model_path())
    info = {
        "encoder": args.encoder,
        "model": model,
        "template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _check_info(args.out, info)
    todo = pending_users(users, args.out)
    print(f"{len(users)} users, {len(users) - len(todo)} already embedded in {args.out}, {len(todo)} to do")
    if todo:
        if args.encoder == "llm":
            encoder = CausalLMUserEncoder(args.llm_model, device=args.device, batch_size=args.batch_size)
        else:
            encoder = SentenceUserEncoder(model, device=args.device, batch_size=args.batch_size)
        embed_users(encoder, todo, args.out, template)
    stats = write_embedding_stats(args.out, [u.user_id for u in users])
    print(f"wrote {stats}")


if __name__ == "__main__":
    main()
