"""``prompt``: prompt engineering from the user's banned categories, with no training.

The paper's comparison baseline. For a user who bans categories ``C`` (in canonical order):

* ``instruction``: the prompt becomes ``"<caption>, without <terms of C>"``;
* ``negative``: the negative prompt becomes ``"<terms of C>"`` (after any ``--negative_prompt``,
  joined by ``", "``);
* ``both``: the two together.

``terms of C`` joins :data:`CATEGORY_TERMS` of each banned category with ``", "``. A user who bans
nothing gets the caption (and negative prompt) unchanged.
"""

from __future__ import annotations

from psalign.categories import CATEGORIES

from .base import Method, register_method

#: What each category stands for in a prompt.
CATEGORY_TERMS: dict[str, str] = {
    "Hate": "hateful symbols or slurs",
    "Harassment": "harassment or bullying",
    "Violence": "violence or weapons",
    "Self-Harm": "self-harm",
    "Sexuality": "nudity or sexual content",
    "Shocking": "gore or disturbing imagery",
    "Propaganda": "propaganda or extremist symbols",
}
assert set(CATEGORY_TERMS) == set(CATEGORIES)
PROMPT_MODES = ("instruction", "negative", "both")


def banned_terms(banned: tuple[str, ...]) -> str:
    return ", ".join(CATEGORY_TERMS[c] for c in CATEGORIES if c in banned)


def engineer_prompt(caption: str, negative: str | None, banned: tuple[str, ...], mode: str) -> tuple[str, str | None]:
    """``(prompt, negative_prompt)`` for a user banning ``banned``, exactly as the module docstring says."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
    terms = banned_terms(banned)
    if not terms:
        return caption, negative
    prompt = f"{caption}, without {terms}" if mode in ("instruction", "both") else caption
    if mode in ("negative", "both"):
        negative = f"{negative}, {terms}" if negative else terms
    return prompt, negative


@register_method
class PromptMethod(Method):
    """Turn each record's banned categories into prompt text (``--prompt_mode``)."""

    name = "prompt"
    needs_user_profiles = True

    def __init__(self, mode: str = "both"):
        if mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {mode!r}")
        self.mode = mode

    @classmethod
    def from_config(cls, config) -> "PromptMethod":
        return cls(config.prompt_mode)

    def generate(self, pipe, batch, call_kwargs):
        negatives = call_kwargs.get("negative_prompt") or [None] * len(batch)
        pairs = [
            engineer_prompt(record.caption, negative, record.user.profile.banned_categories, self.mode)
            for record, negative in zip(batch, negatives)
        ]
        prompts = [p for p, _ in pairs]
        negative_prompts = [n or "" for _, n in pairs]
        kwargs = {**call_kwargs, "prompt": prompts, "negative_prompt": negative_prompts if any(negative_prompts) else None}
        return pipe(**kwargs).images

    def log_params(self) -> dict:
        return {"prompt_mode": self.mode}
