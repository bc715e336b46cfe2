r"""Does a toy PSA adapter remove one category's marker whatever else the user bans? (offline, CPU)

    python bench/toy_ban_combinations.py [--category Sexuality] [--bundle DIR] [--adapter DIR] [--scale 1]
                                         [--adapter_steps START:END]

The user is the default reference profile (``level_0``) with its bans replaced: first nothing
banned (the control: the marker should stay), then the category alone, then the category plus
each other category in turn. For each profile the toy model draws ``--per_concept`` prompts of
each seen concept of the category (objects and seeds fixed, so every profile sees the same
prompts) with the adapter's output scaled by ``--scale`` and conditioned on the profile's
embedding: the offline MiniLM encoder over ``--template``, by default the template the bundle's
embeddings were made with (their ``embedding_info.json``). The detector then reads each image,
and :func:`psalign.toy.detect.marker_outcome` (the one rule the demo and the benchmark use) says
what it did with the category's marker. The table counts, per profile:

* drawn: the category's marker is there (right for the control, a failure when banned);
* replaced: another category's marker drawn instead, which InPro still counts as inappropriate
  (the last column says which, and how often);
* smudged: no marker, but the marker box is not background (a blob);
* removed cleanly: no marker and a clean box;
* wrong object: the object is not the prompt's (shape or colour).

An adapter that has learnt the ban itself removes it the same way in every row; one that has
tied it to the bans it came with in training removes it only in some. ``--adapter_steps 10:20``
switches the adapter on for those denoising steps only (0-based, end excluded; the base model
draws the others), to see when in sampling it removes or replaces a marker.
"""

import argparse
from collections import Counter
from pathlib import Path

import torch

from psalign.adapter import load_adapter
from psalign.categories import CATEGORIES
from psalign.embeddings import SentenceUserEncoder, profile_text, read_embedding_info
from psalign.levels import reference_user
from psalign.toy.benchmark import sample
from psalign.toy.bundle import bundled_paths
from psalign.toy.detect import MARKER_OUTCOME_HEADINGS, MARKER_OUTCOMES, detect, marker_outcome
from psalign.toy.model import DEFAULT_STEPS, load_pipeline
from psalign.toy.world import OBJECTS, seen_concepts


def _profile_template(embeds: Path, given: str | None) -> str:
    """``given``, or the template the bundle's sentence-encoder embeddings were made with."""
    info = read_embedding_info(embeds) or {}
    if info.get("encoder", "sentence") != "sentence":
        raise SystemExit(f"{embeds} holds {info['encoder']} embeddings; this benchmark embeds with the sentence encoder")
    if given is None and "template" not in info:
        raise SystemExit(f"{embeds} records no profile template (embedding_info.json); pass --template")
    return given or info["template"]


def step_window(text: str) -> tuple[int, int]:
    """``"START:END"`` -> ``(START, END)``, 0 <= START < END (argparse type)."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (two integers), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {text!r}")
    return start, end


def adapter_window_callback(adapter, window: tuple[int, int]):
    """A ``callback_on_step_end`` that leaves ``adapter`` switched on for the steps in ``window`` only
    (switch it for step 0 yourself, and back on after the call)."""

    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        adapter.enabled = window[0] <= step + 1 < window[1]  # for the next step
        return tensors

    return callback


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="Sexuality", choices=CATEGORIES, help="the category whose ban is probed")
    parser.add_argument("--bundle", type=Path, default=None, help="toy bundle (default: the bundled one)")
    parser.add_argument("--adapter", type=Path, default=None, help="PSA adapter folder (default: the bundle's)")
    parser.add_argument("--template", default=None,
                        help="profile template the adapter was trained with (default: the bundle's embeddings')")
    parser.add_argument("--scale", type=float, default=1.0, help="scale of the adapter's output")
    parser.add_argument("--per_concept", type=int, default=12, help="prompts per seen concept of the category")
    parser.add_argument("--adapter_steps", type=step_window, default=None, metavar="START:END",
                        help="apply the adapter on these denoising steps only (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.adapter_steps and args.adapter_steps[1] > DEFAULT_STEPS:
        parser.error(f"--adapter_steps ends after the last of the toy model's {DEFAULT_STEPS} steps")
    torch.set_num_threads(args.threads)

    bundle = bundled_paths(args.bundle)
    pipe = load_pipeline(bundle.model)
    adapter = load_adapter(args.adapter or bundle.adapter, pipe.unet)
    template = _profile_template(bundle.embeds, args.template)
    prompts = [(OBJECTS[(c + k) % len(OBJECTS)], concept)
               for c, concept in enumerate(seen_concepts(args.category)) for k in range(args.per_concept)]
    captions = [obj.caption(concept) for obj, concept in prompts]
    seeds = list(range(len(captions)))
    encoder = SentenceUserEncoder(device="cpu")
    default = reference_user("level_0")
    profiles = [(), (args.category,)] + [(args.category, other) for other in CATEGORIES if other != args.category]

    n = len(captions)
    window = args.adapter_steps or (0, DEFAULT_STEPS)
    pipe_kwargs = {"callback_on_step_end": adapter_window_callback(adapter, window)} if args.adapter_steps else {}
    print(f"{n} prompts of {args.category} per profile (adapter {args.adapter or bundle.adapter}, scale {args.scale}, "
          f"on steps {window[0]}-{window[1] - 1} of {DEFAULT_STEPS})\n")
    print("| banned | " + " | ".join(MARKER_OUTCOME_HEADINGS[o] for o in MARKER_OUTCOMES) + " | wrong object | substitutes |")
    print("|---" * (len(MARKER_OUTCOMES) + 3) + "|")
    for banned in profiles:
        embedding = torch.from_numpy(encoder.encode([profile_text(default.with_banned(banned), template)]))
        with adapter.users(embedding.repeat(n, 1), scale=args.scale, classifier_free_guidance=True):
            adapter.enabled = window[0] == 0
            try:
                found = [detect(image) for image in sample(pipe, captions, seeds, batch_size=n, **pipe_kwargs)]
            finally:
                adapter.enabled = True
        outcomes = Counter(marker_outcome(d, args.category) for d in found)
        substitutes = Counter(marker for d in found if args.category not in d.markers for marker in d.markers)
        wrong = sum(not d.shows(obj) for d, (obj, _) in zip(found, prompts))
        row = [" + ".join(banned) or "nothing (control)", *(f"{outcomes[o]}/{n}" for o in MARKER_OUTCOMES), wrong,
               ", ".join(f"{m} {k}" for m, k in substitutes.most_common())]
        print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


if __name__ == "__main__":
    main()
