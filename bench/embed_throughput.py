"""Users embedded per second by CausalLMUserEncoder: batched vs one user at a time (the header names the device).

    python bench/embed_throughput.py                      # a tiny random Llama-shaped LM, built on the spot
    python bench/embed_throughput.py --model PATH_OR_ID   # any causal LM
    python bench/embed_throughput.py --hidden_size 256 --layers 4 --users 64 --batch_size 16 --repeats 5

Each repeat times both modes on the same users (order alternating between repeats); the table
shows the median over repeats.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from psalign.embeddings import CausalLMUserEncoder, chat_inputs, profile_text
from psalign.testing import build_tiny_causal_lm
from psalign.users import generate_users


def _users_per_second(encoder: CausalLMUserEncoder, texts: list[str], batch_size: int) -> float:
    encoder.batch_size = batch_size
    start = time.perf_counter()
    encoder.encode(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="causal LM id or folder (default: a tiny random LM built on the spot)")
    parser.add_argument("--hidden_size", type=int, default=128, help="tiny LM width (default 128)")
    parser.add_argument("--layers", type=int, default=4, help="tiny LM depth (default 4)")
    parser.add_argument("--users", type=int, default=32, help="users per timing (default 32)")
    parser.add_argument("--batch_size", type=int, default=16, help="batch size of the batched mode (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per mode (default 5)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(
            build_tiny_causal_lm(tmp, hidden_size=args.hidden_size, num_hidden_layers=args.layers)
        )
        encoder = CausalLMUserEncoder(model, device=args.device)
        texts = [profile_text(u) for u in generate_users(args.users, seed=0)]
        modes = {"one at a time": 1, f"batched ({args.batch_size})": args.batch_size}
        _users_per_second(encoder, texts[: args.batch_size], args.batch_size)  # warm-up
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for repeat in range(args.repeats):
            order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
            for mode in order:
                rates[mode].append(_users_per_second(encoder, texts, modes[mode]))

    tokens = chat_inputs(encoder.tokenizer, texts[:1], encoder.model.device)["input_ids"].shape[1]
    print(
        f"model: {args.model or f'tiny random Llama (hidden {args.hidden_size}, {args.layers} layers)'}; "
        f"device {encoder.model.device}, dtype {encoder.model.dtype}, torch threads {torch.get_num_threads()}; "
        f"{args.users} users, ~{tokens} tokens each, median of {args.repeats} repeats"
    )
    print("| mode | users/s | speed-up |\n|---|---:|---:|")
    base = statistics.median(rates["one at a time"])
    for mode, values in rates.items():
        median = statistics.median(values)
        print(f"| {mode} | {median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
