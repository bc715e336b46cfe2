"""LLM labeller: ask a chat model which Sage categories a user should not see.

The prompt is a template of our own (:data:`DEFAULT_LABELLER_TEMPLATE`; a user may pass another
as a file) filled with the profile, the category names and the documented rules of
:data:`psalign.users.BAN_RULES`. Decoding is greedy. The answer is parsed by
:func:`parse_category_list`, which tolerates the usual mess around a JSON list and rejects
unknown category names.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Sequence

import torch

from psalign.categories import CATEGORIES, canonical_category, sort_categories
from psalign.embeddings import chat_inputs, load_causal_lm
from psalign.users import BAN_RULES, PROFILE_FIELDS, UserProfile, check_template, profile_fields, read_template

#: Placeholders of a labeller template: the profile's attributes, ``{categories}`` (the seven
#: names) and ``{rules}`` (one line per rule of the rule engine).
LABELLER_TEMPLATE_FIELDS: tuple[str, ...] = PROFILE_FIELDS + ("categories", "rules")

DEFAULT_LABELLER_TEMPLATE = """\
You decide which kinds of image content must be kept away from one person.

The person:
- age: {age} ({age_group})
- gender: {gender}
- religion: {religion}
- physical condition: {physical_condition}
- mental condition: {mental_condition}

Content categories: {categories}.

Guidelines:
{rules}

Answer with a JSON list of the categories to keep away from this person, using the names above,
for example ["Violence", "Self-Harm"], or [] when none. Write nothing else.
"""

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
_BRACKETED = re.compile(r"\[[^\[\]]*\]")


def _rules_text() -> str:
    return "\n".join(f"- If the person is {r.description}: {', '.join(r.categories)}." for r in BAN_RULES)


def labeller_prompt(profile: UserProfile, template: str = DEFAULT_LABELLER_TEMPLATE) -> str:
    """Fill ``template`` (placeholders: :data:`LABELLER_TEMPLATE_FIELDS`) for ``profile``."""
    fields = profile_fields(profile)
    fields.update(categories=", ".join(CATEGORIES), rules=_rules_text())
    return check_template(template, LABELLER_TEMPLATE_FIELDS).format(**fields)


def parse_category_list(answer: str) -> list[str]:
    """The categories named by the list in a model's answer, canonical and in CATEGORIES order.

    Tolerated: text or a code fence around the list, ``<think>`` blocks (ignored), single quotes,
    unquoted names (``[Hate, Violence]``), a trailing comma, any case or known spelling. With
    several lists the last one is the verdict. ``ValueError`` when there is no list, an item is
    not a name, or a name is not a Sage category (the message names it).
    """
    text = _THINK_BLOCK.sub("", answer)
    lists = _BRACKETED.findall(text)
    if not lists:
        raise ValueError(f"no list in the answer {answer.strip()[:200]!r}; expected e.g. [\"Violence\"] or []")
    literal = lists[-1]
    items = None
    for parse in (json.loads, ast.literal_eval):
        try:
            items = parse(literal)
            break
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
    if items is None:  # unquoted names: split on commas, strip quotes and spaces
        items = [part.strip().strip("\"'`").strip() for part in literal[1:-1].split(",")]
        items = [i for i in items if i]
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"the list {literal!r} in the answer does not hold category names")
    names = []
    for item in items:
        try:
            names.append(canonical_category(item))
        except ValueError as err:
            raise ValueError(f"the answer names {item!r}, which is not a Sage category ({err})") from None
    return sort_categories(names)


class LLMLabeller:
    """Label users' banned categories with a causal chat model (greedy decoding).

    ``template``: the prompt text, or None for :data:`DEFAULT_LABELLER_TEMPLATE`; use
    :func:`read_labeller_template` to read one from a file. The template is checked before the
    model is loaded.
    """

    def __init__(
        self,
        model_name_or_path: str,
        template: str | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 8,
    ):
        self.template = check_template(template or DEFAULT_LABELLER_TEMPLATE, LABELLER_TEMPLATE_FIELDS)
        self.model, self.tokenizer = load_causal_lm(model_name_or_path, device, dtype)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @torch.inference_mode()
    def answers(self, profiles: Sequence[UserProfile]) -> list[str]:
        """The model's raw answer (generated text only) for each profile."""
        out = []
        for start in range(0, len(profiles), self.batch_size):
            prompts = [labeller_prompt(p, self.template) for p in profiles[start : start + self.batch_size]]
            inputs = chat_inputs(self.tokenizer, prompts, self.model.device)
            inputs.pop("position_ids")  # generate derives positions from the attention mask itself
            generated = self.model.generate(
                **inputs,
                do_sample=False,
                num_beams=1,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            out.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return out

    def label(self, profiles: Sequence[UserProfile]) -> list[UserProfile]:
        """``profiles`` with banned categories from the model and allowed = the rest.

        Raises ``ValueError`` listing every user whose answer could not be parsed, with the answer.
        """
        labelled, problems = [], []
        for profile, answer in zip(profiles, self.answers(profiles)):
            try:
                labelled.append(profile.with_banned(parse_category_list(answer)))
            except ValueError as err:
                problems.append(f"user {profile.user_id}: {err}")
        if problems:
            raise ValueError(f"{len(problems)} answer(s) could not be used:\n" + "\n".join(problems))
        return labelled


def read_labeller_template(path: str | Path) -> str:
    """Read and check a labeller template file (placeholders: :data:`LABELLER_TEMPLATE_FIELDS`)."""
    return read_template(path, LABELLER_TEMPLATE_FIELDS)
