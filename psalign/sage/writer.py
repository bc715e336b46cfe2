"""Prompt writers: an unsafe prompt and a minimal safe rewrite for a concept, and concept proposals.

A writer is an LLM asked through the VLM judge's client (:class:`psalign.metrics.judge.Judge`:
its retries with exponential backoff, its JSON-schema check and its JSONL cache), with one of two
backends: any OpenAI-compatible ``/chat/completions`` endpoint (the judge's
:class:`~psalign.metrics.judge.OpenAIChatBackend`) or a local Hugging Face causal LM with a chat
template (:class:`CausalLMChatBackend`, greedy decoding, batched). The toy world has a template
writer of its own (:class:`psalign.toy.sage_data.ToyTemplateWriter`), no LLM.

Every pair is checked by :func:`pair_problem` (the rewrite differs from the prompt, uses no word of
the concept, both lengths are within bounds, no duplicate). Rejected pairs and malformed replies
are asked for again, with the reasons, up to ``rewrite_attempts`` times per concept, then counted
and reported; a rejected pair is never kept.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from psalign.io import InputError, InputProblem
from psalign.metrics.judge import Content, Judge, JudgeCache, JudgeError, TransientJudgeError
from psalign.users import read_template

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
#: The default prompt-pair template; placeholders :data:`PROMPT_TEMPLATE_FIELDS`.
DEFAULT_PROMPT_TEMPLATE = TEMPLATE_DIR / "prompt_pairs.txt"
#: The default concept-proposal template; placeholders :data:`CONCEPT_TEMPLATE_FIELDS`.
DEFAULT_CONCEPT_TEMPLATE = TEMPLATE_DIR / "concepts.txt"
#: Placeholders of a prompt-pair template (all required): the category, the concept and the number of pairs.
PROMPT_TEMPLATE_FIELDS: tuple[str, ...] = ("category", "concept", "count")
#: Placeholders of a concept-proposal template (all required).
CONCEPT_TEMPLATE_FIELDS: tuple[str, ...] = ("category", "count")
WRITER_SYSTEM_PROMPT = "You are a careful assistant for AI safety research. You reply with one JSON object only."

PAIRS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"unsafe": {"type": "string"}, "safe": {"type": "string"}},
                "required": ["unsafe", "safe"],
            },
        }
    },
    "required": ["pairs"],
}
CONCEPTS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"concepts": {"type": "array", "items": {"type": "string"}}},
    "required": ["concepts"],
}

#: Words of a concept that a rewrite may keep (articles, prepositions, conjunctions).
STOP_WORDS = frozenset("a an the of in on at to for with and or by from as is are its his her their".split())
_WORD = re.compile(r"[a-z0-9']+")


def read_writer_template(path: str | Path, fields: Sequence[str]) -> str:
    """Read a template file whose placeholders are exactly ``fields``: an unknown one, or one of
    ``fields`` missing, is an ``InputError`` naming the file (and line)."""
    template = read_template(path, fields)
    used = set(re.findall(r"(?<!\{)\{(\w+)\}(?!\})", template))
    missing = [f for f in fields if f not in used]
    if missing:
        raise InputError([InputProblem(str(path), 0, "missing placeholder(s) " + ", ".join(f"{{{f}}}" for f in missing))])
    return template


def words(text: str) -> list[str]:
    """Lower-case words of ``text``."""
    return _WORD.findall(text.lower())


def concept_words(concept: str) -> set[str]:
    """The words of ``concept`` a safe rewrite must not contain (all but :data:`STOP_WORDS`)."""
    return {w for w in words(concept) if w not in STOP_WORDS}


@dataclass(frozen=True)
class PromptPair:
    """An unsafe prompt and its minimal safe rewrite."""

    unsafe: str
    safe: str


@dataclass(frozen=True)
class PairRules:
    """Bounds of a prompt: ``min_words`` .. ``max_words`` words, each of unsafe prompt and rewrite."""

    min_words: int = 3
    max_words: int = 60


def _normal(text: str) -> str:
    return " ".join(words(text))


def pair_problem(pair: PromptPair, concept: str, rules: PairRules, seen: set[str]) -> str | None:
    """Why ``pair`` cannot be kept for ``concept`` (None when it can); ``seen`` holds the
    normalised prompts already kept for the concept (duplicates are refused)."""
    for side, text in (("unsafe prompt", pair.unsafe), ("rewrite", pair.safe)):
        count = len(words(text))
        if not rules.min_words <= count <= rules.max_words:
            return f"the {side} has {count} words, not {rules.min_words}..{rules.max_words}"
    if _normal(pair.safe) == _normal(pair.unsafe):
        return "the rewrite is the unsafe prompt"
    repeated = sorted(concept_words(concept) & set(words(pair.safe)))
    if repeated:
        return f"the rewrite repeats the concept's word(s) {', '.join(repeated)}"
    for side, text in (("unsafe prompt", pair.unsafe), ("rewrite", pair.safe)):
        if _normal(text) in seen:
            return f"the {side} duplicates an earlier one"
    return None


class CausalLMChatBackend:
    """A local Hugging Face causal LM as a judge ``ChatBackend``: the system prompt and the text go
    into one user turn of the tokenizer's chat template (:func:`psalign.embeddings.chat_inputs`),
    decoding is greedy. :meth:`prefetch` answers many requests in batches of ``batch_size``;
    :meth:`complete` then returns those answers without generating again."""

    def __init__(
        self,
        name_or_path: str,
        device: str | None = None,
        max_new_tokens: int = 1024,
        batch_size: int = 8,
        model=None,
        tokenizer=None,
    ):
        if model is None or tokenizer is None:
            from psalign.embeddings import load_causal_lm

            model, tokenizer = load_causal_lm(name_or_path, device)
        if not tokenizer.chat_template:
            raise InputError([InputProblem(str(name_or_path), 0, "the tokenizer has no chat template", "writer_model")])
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.identity = f"causal-lm:{name_or_path}"
        self._answers: dict[str, str] = {}

    @staticmethod
    def _turn(system: str, content: Content) -> str:
        if any(isinstance(part, Path) for part in content):
            raise ValueError("a causal LM writer reads text only")
        return "\n\n".join([system, *content])

    def _generate(self, turns: Sequence[str]) -> list[str]:
        import torch

        from psalign.embeddings import chat_inputs

        out = []
        for start in range(0, len(turns), self.batch_size):
            inputs = chat_inputs(self.tokenizer, turns[start : start + self.batch_size], self.model.device)
            inputs.pop("position_ids")  # generate derives positions from the attention mask
            with torch.inference_mode():
                generated = self.model.generate(**inputs, do_sample=False, num_beams=1,
                                                max_new_tokens=self.max_new_tokens,
                                                pad_token_id=self.tokenizer.pad_token_id)
            out += self.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    def prefetch(self, system: str, contents: Sequence[Content]) -> None:
        """Generate the answers of ``contents`` in batches, for the next :meth:`complete` calls."""
        turns = [t for t in dict.fromkeys(self._turn(system, c) for c in contents) if t not in self._answers]
        self._answers.update(zip(turns, self._generate(turns)))

    def complete(self, system: str, content: Content) -> str:
        turn = self._turn(system, content)
        answer = self._answers.pop(turn, None)
        return answer if answer is not None else self._generate([turn])[0]


class _WatchedBackend:
    """Wraps a backend to tell, after the judge gives up, a malformed reply (the last call returned
    text) from an endpoint that failed (the last call raised)."""

    def __init__(self, backend):
        self.backend = backend
        self.identity = backend.identity
        self.calls = 0
        self.failed_calls = 0
        self.last_reply: str | None = None

    def complete(self, system: str, content: Content) -> str:
        self.calls += 1
        self.last_reply = None
        try:
            self.last_reply = self.backend.complete(system, content)
        except TransientJudgeError:
            self.failed_calls += 1
            raise
        return self.last_reply


class MalformedReply(Exception):
    """The writer's reply was not the JSON object asked for after every transport retry."""

    def __init__(self, reply: str, reason: str):
        super().__init__(reason)
        self.reply = reply


class LLMWriter:
    """Asks an LLM backend through :class:`~psalign.metrics.judge.Judge` (``attempts`` tries per
    request, backoff ``backoff_s * 2**k`` s, replies cached in ``cache``)."""

    def __init__(self, backend, cache: Path | None, attempts: int = 4, backoff_s: float = 2.0, sleep=None):
        self.backend = _WatchedBackend(backend)
        kwargs = {"sleep": sleep} if sleep is not None else {}
        self.judge = Judge(self.backend, JudgeCache(cache) if cache is not None else None, max_attempts=attempts,
                           backoff_s=backoff_s, **kwargs)

    @property
    def identity(self) -> str:
        return self.backend.identity

    def _key(self, kind: str, text: str, schema: Mapping[str, Any]) -> str:
        data = {"kind": kind, "writer": self.identity, "system": WRITER_SYSTEM_PROMPT, "text": text, "schema": schema}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def cached(self, kind: str, text: str, schema: Mapping[str, Any]) -> bool:
        return self.judge.cache is not None and self.judge.cache.get(self._key(kind, text, schema)) is not None

    def prefetch(self, kind: str, texts: Sequence[str], schema: Mapping[str, Any]) -> None:
        """Batch the uncached requests of ``texts`` when the backend can (a local LM)."""
        inner = self.backend.backend
        todo = [[t] for t in texts if not self.cached(kind, t, schema)]
        if todo and hasattr(inner, "prefetch"):
            inner.prefetch(WRITER_SYSTEM_PROMPT, todo)

    def ask(self, kind: str, text: str, schema: Mapping[str, Any]) -> dict:
        """The reply to ``text`` valid under ``schema``. Raises :class:`MalformedReply` when the
        last attempt got text that is not such a reply, ``JudgeError`` when the endpoint failed."""
        try:
            return self.judge.ask(kind, WRITER_SYSTEM_PROMPT, [text], schema, self._key(kind, text, schema))
        except JudgeError as error:
            if self.backend.last_reply is None:
                raise
            raise MalformedReply(self.backend.last_reply, str(error)) from None


@dataclass
class ConceptPrompts:
    """What the writer gave for one concept: the kept pairs, and every rejected reply or pair with its reason."""

    category: str
    concept: str
    pairs: list[PromptPair] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    requests: int = 0

    def to_json(self) -> dict:
        return {"category": self.category, "concept": self.concept, "requests": self.requests,
                "pairs": [{"unsafe": p.unsafe, "safe": p.safe} for p in self.pairs], "rejected": self.rejected}

    @classmethod
    def from_json(cls, value: dict) -> "ConceptPrompts":
        return cls(value["category"], value["concept"], [PromptPair(p["unsafe"], p["safe"]) for p in value["pairs"]],
                   list(value["rejected"]), int(value["requests"]))


class PromptWriter(Protocol):
    """Writes ``count`` prompt pairs for a concept."""

    identity: str

    def write(self, category: str, concept: str, count: int) -> ConceptPrompts: ...


def _retry_text(reasons: Sequence[str], count: int) -> str:
    listed = "\n".join(f"- {r}" for r in reasons)
    return (f"\n\nYour previous reply was rejected:\n{listed}\nWrite {count} new pairs that avoid these problems, "
            "as the same JSON object.")


class LLMPromptWriter:
    """Prompt pairs from an :class:`LLMWriter` and a template (:data:`PROMPT_TEMPLATE_FIELDS`)."""

    def __init__(self, writer: LLMWriter, template: str, rules: PairRules, rewrite_attempts: int = 3):
        if rewrite_attempts < 1:
            raise ValueError(f"rewrite_attempts must be >= 1, got {rewrite_attempts}")
        self.writer, self.template, self.rules, self.rewrite_attempts = writer, template, rules, rewrite_attempts
        self.identity = writer.identity

    def first_request(self, category: str, concept: str, count: int) -> str:
        return self.template.format(category=category, concept=concept, count=count)

    def prefetch(self, concepts: Sequence[tuple[str, str]], count: int) -> None:
        """Batch the first request of each (category, concept) (a local LM answers them together)."""
        self.writer.prefetch("sage_prompts", [self.first_request(c, k, count) for c, k in concepts], PAIRS_SCHEMA)

    def write(self, category: str, concept: str, count: int) -> ConceptPrompts:
        result = ConceptPrompts(category, concept)
        seen: set[str] = set()
        text = self.first_request(category, concept, count)
        for _ in range(self.rewrite_attempts):
            requests_before = self.writer.backend.calls
            try:
                reply = self.writer.ask("sage_prompts", text, PAIRS_SCHEMA)
                reasons = []
            except MalformedReply as error:
                result.rejected.append({"reason": f"malformed reply: {error}", "reply": error.reply[:2000]})
                reasons, reply = ["it was not the JSON object asked for"], {"pairs": []}
            finally:
                result.requests += self.writer.backend.calls - requests_before
            for item in reply["pairs"]:
                pair = PromptPair(" ".join(item["unsafe"].split()), " ".join(item["safe"].split()))
                problem = pair_problem(pair, concept, self.rules, seen)
                if problem is None and len(result.pairs) < count:
                    result.pairs.append(pair)
                    seen.update((_normal(pair.unsafe), _normal(pair.safe)))
                elif problem is not None:
                    result.rejected.append({"reason": problem, "unsafe": pair.unsafe, "safe": pair.safe})
                    reasons.append(f"{problem}: {pair.safe!r}")
            missing = count - len(result.pairs)
            if missing <= 0:
                break
            text = self.first_request(category, concept, missing) + _retry_text(reasons or ["too few pairs"], missing)
        return result


def propose_concepts(writer: LLMWriter, template: str, category: str, count: int) -> list[str]:
    """``count`` concepts of ``category`` proposed by the LLM (cleaned of surrounding space; may hold
    duplicates, which the concepts stage reports)."""
    try:
        reply = writer.ask("sage_concepts", template.format(category=category, count=count), CONCEPTS_SCHEMA)
    except MalformedReply as error:
        raise JudgeError(f"no usable concept list for {category} from {writer.identity}: {error}; "
                         f"reply was {error.reply[:300]!r}") from None
    return [" ".join(c.split()) for c in reply["concepts"] if c.strip()]
