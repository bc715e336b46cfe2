"""The VLM judge against a fake OpenAI-compatible server on 127.0.0.1: good, malformed and
inconsistent answers, retries with backoff, blind two-order pairs, the reply cache."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from psalign.io import InputError
from psalign.metrics.judge import (
    PASS_SCHEMA,
    WIN_SCHEMA,
    Judge,
    JudgeCache,
    JudgeError,
    JudgeItem,
    JudgeUser,
    OpenAIChatBackend,
    TransformersChatBackend,
    TransientJudgeError,
    image_data_url,
    parse_reply,
    pass_rate,
    schema_errors,
    win_rates,
)
from tests.metrics_support import FakeChatServer, chat_completion, request_images, request_text, write_images

USER = JudgeUser(banned=("Violence", "Sexuality"), allowed=("Hate",), profile={"Age": 15, "Gender": "female"})


def reply(obj) -> tuple[int, dict]:
    return 200, chat_completion(json.dumps(obj) if not isinstance(obj, str) else obj)


@pytest.fixture
def images(tmp_path):
    good, bad = write_images(tmp_path / "psa_method", 1, seed=1, prefix="good") + write_images(
        tmp_path / "baseline_method", 1, seed=2, prefix="bad"
    )
    return good, bad


def judge_for(server, tmp_path, **kwargs) -> Judge:
    backend = OpenAIChatBackend(server.base_url, "fake-vlm", api_key="sk-test", timeout_s=10)
    sleeps = []
    judge = Judge(backend, JudgeCache(tmp_path / "cache.jsonl"), backoff_s=0.5, sleep=sleeps.append, **kwargs)
    judge.sleeps = sleeps
    return judge


def test_schema_validator():
    assert schema_errors({"verdict": "PASS", "reason": "fine"}, PASS_SCHEMA) == []
    assert schema_errors({"verdict": "MAYBE", "reason": "x"}, PASS_SCHEMA) == [
        "$.verdict: 'MAYBE' is not one of ['PASS', 'FAIL']"
    ]
    assert schema_errors({"better": "A"}, WIN_SCHEMA) == ["$: missing required key 'reason'"]
    assert schema_errors(["A"], WIN_SCHEMA) == ["$: expected object, got list"]
    assert schema_errors({"better": "A", "reason": 3}, WIN_SCHEMA) == ["$.reason: expected string, got int"]
    strict = {"type": "object", "additionalProperties": False, "properties": {"n": {"type": "integer"}},
              "required": []}
    assert schema_errors({"n": True, "x": 1}, strict) == ["$.n: expected integer, got bool", "$: unexpected key 'x'"]
    listing = {"type": "array", "items": {"type": "string", "minLength": 2}}
    assert schema_errors(["ab", "c"], listing) == ["$[1]: shorter than 2 characters"]


def test_reply_parsing_accepts_a_fenced_object_and_rejects_prose():
    assert parse_reply('```json\n{"better": "tie", "reason": "same"}\n```', WIN_SCHEMA)["better"] == "tie"
    with pytest.raises(TransientJudgeError, match="not JSON"):
        parse_reply("Image A is better.", WIN_SCHEMA)
    with pytest.raises(TransientJudgeError, match="schema"):
        parse_reply('{"better": "C", "reason": ""}', WIN_SCHEMA)


def test_pass_verdicts_and_what_the_request_contains(images, tmp_path):
    good, bad = images
    good_url = image_data_url(good)

    def respond(body):
        (url,) = request_images(body)
        return reply({"verdict": "PASS" if url == good_url else "FAIL", "reason": "checked"})

    with FakeChatServer(respond) as server:
        judge = judge_for(server, tmp_path)
        items = [JudgeItem(good, USER, "a girl at a rally"), JudgeItem(bad, USER, "a girl at a rally")]
        result = pass_rate(items, judge)
    assert (result.count, result.n) == (1, 2) and judge.requests == 2
    request = server.requests[0]
    assert request["headers"]["Authorization"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "fake-vlm" and body["temperature"] == 0
    url = request_images(body)[0]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == good.read_bytes()
    text = request_text(body)
    assert "Banned categories (must not be visible): Violence, Sexuality" in text
    assert "Allowed categories (may be shown when the prompt asks): Hate" in text
    assert "- Age: 15" in text and "a girl at a rally" in text
    assert "psa_method" not in text and "good_000" not in text  # no paths or method names


def test_malformed_and_failing_answers_are_retried_with_backoff(images, tmp_path):
    good, _ = images
    script = [
        (200, chat_completion("Sure! The image is fine.")),
        reply({"verdict": "MAYBE", "reason": "unsure"}),
        (500, {"error": "overloaded"}),
        (200, {"unexpected": "envelope"}),
        reply({"verdict": "PASS", "reason": "ok"}),
    ]
    with FakeChatServer(lambda body: script.pop(0)) as server:
        judge = judge_for(server, tmp_path, max_attempts=5)
        assert judge.judge_pass(good, USER, "a cat") is True
    assert judge.requests == 5 and len(server.requests) == 5
    assert judge.sleeps == [0.5, 1.0, 2.0, 4.0]


def test_a_judge_that_only_returns_garbage_gives_a_clear_error(images, tmp_path):
    good, _ = images
    with FakeChatServer(lambda body: (200, chat_completion("I cannot help with that."))) as server:
        judge = judge_for(server, tmp_path, max_attempts=3)
        with pytest.raises(JudgeError) as caught:
            judge.judge_pass(good, USER, "a cat")
    message = str(caught.value)
    assert "no valid pass answer from openai-chat:fake-vlm in 3 attempts" in message
    assert str(good) in message and "I cannot help with that." in message
    assert len(server.requests) == 3
    assert JudgeCache(tmp_path / "cache.jsonl").entries == {}  # nothing invalid was cached


def test_client_errors_are_not_retried(images, tmp_path):
    good, _ = images
    with FakeChatServer(lambda body: (401, {"error": "invalid api key"})) as server:
        judge = judge_for(server, tmp_path)
        with pytest.raises(JudgeError, match="HTTP 401.*invalid api key"):
            judge.judge_pass(good, USER, "a cat")
    assert len(server.requests) == 1


def test_an_unreachable_endpoint_is_retried_then_reported(images, tmp_path):
    good, _ = images
    with FakeChatServer(lambda body: reply({})) as server:
        url = server.base_url
    judge = Judge(OpenAIChatBackend(url, "m", timeout_s=2), max_attempts=2, backoff_s=0.0, sleep=lambda s: None)
    with pytest.raises(JudgeError, match="unreachable"):
        judge.judge_pass(good, USER, "a cat")
    assert judge.requests == 2


def preferring(url: str):
    """A judge that always prefers the image with data URL ``url``, wherever it is shown."""

    def respond(body):
        shown = request_images(body)
        return reply({"better": "A" if shown[0] == url else "B", "reason": "preferred"})

    return respond


def test_pairs_are_judged_blind_in_both_orders(images, tmp_path):
    target, baseline = images
    with FakeChatServer(preferring(image_data_url(target))) as server:
        verdict = judge_for(server, tmp_path).judge_pair(target, baseline, USER, "a cat")
    assert (verdict.first, verdict.second, verdict.outcome) == ("target", "target", "target")
    first, second = (request_images(r["body"]) for r in server.requests)
    assert first == [image_data_url(target), image_data_url(baseline)]
    assert second == [image_data_url(baseline), image_data_url(target)]
    for request in server.requests:
        text = request_text(request["body"])
        assert "psa_method" not in text and "baseline_method" not in text
        assert "Image A:" in text and "Image B:" in text


def test_inconsistent_verdicts_count_as_a_tie(images, tmp_path):
    target, baseline = images
    with FakeChatServer(lambda body: reply({"better": "A", "reason": "first one"})) as server:  # position bias
        verdict = judge_for(server, tmp_path).judge_pair(target, baseline, USER, "a cat")
    assert (verdict.first, verdict.second, verdict.outcome) == ("target", "baseline", "tie")


def test_win_rates_and_the_cache_make_a_rerun_free(tmp_path):
    targets = write_images(tmp_path / "t", 3, seed=10)
    baselines = write_images(tmp_path / "b", 3, seed=20)
    favourite = {image_data_url(targets[0]), image_data_url(baselines[1])}  # target wins 0, loses 1; 2 is biased

    def respond(body):
        shown = request_images(body)
        if shown[0] in favourite or shown[1] in favourite:
            return reply({"better": "A" if shown[0] in favourite else "B", "reason": "x"})
        return reply({"better": "B", "reason": "always the second"})

    items = [JudgeItem(t, USER, f"prompt {i}", baseline=b) for i, (t, b) in enumerate(zip(targets, baselines))]
    with FakeChatServer(respond) as server:
        judge = judge_for(server, tmp_path)
        rates = win_rates(items, judge)
        assert len(server.requests) == 6
        assert {k: (v.count, v.n) for k, v in rates.items()} == {"target": (1, 3), "tie": (1, 3), "baseline": (1, 3)}

        rerun = judge_for(server, tmp_path)
        assert win_rates(items, rerun) == rates
        assert rerun.requests == 0 and len(server.requests) == 6

        changed = [JudgeItem(items[0].image, USER, "another prompt", baseline=items[0].baseline)]
        win_rates(changed, rerun)
        assert rerun.requests == 2  # a different caption is a different question


def test_cache_survives_a_cut_last_line_and_rejects_corruption(tmp_path):
    path = tmp_path / "cache.jsonl"
    good = json.dumps({"key": "k1", "kind": "pass", "reply": {"verdict": "PASS", "reason": "r"}})
    path.write_text(good + "\n" + '{"key": "k2", "ki')
    cache = JudgeCache(path)
    assert set(cache.entries) == {"k1"}
    assert path.read_text() == good + "\n"
    cache.put("k3", "pass", {"verdict": "FAIL", "reason": "r"})
    assert set(JudgeCache(path).entries) == {"k1", "k3"}
    path.write_text("garbage\n" + good + "\n")
    with pytest.raises(InputError, match="cache.jsonl:1: bad cache line"):
        JudgeCache(path)


def test_backend_options_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("PSALIGN_JUDGE_BASE_URL", "http://127.0.0.1:9/v1/")
    monkeypatch.setenv("PSALIGN_JUDGE_MODEL", "env-model")
    monkeypatch.delenv("PSALIGN_JUDGE_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    backend = OpenAIChatBackend.from_options(None, None, None)
    assert backend.url == "http://127.0.0.1:9/v1/chat/completions"
    assert (backend.model, backend.api_key) == ("env-model", "sk-env")
    assert OpenAIChatBackend.from_options(None, "flag-model", None).model == "flag-model"
    monkeypatch.delenv("PSALIGN_JUDGE_MODEL")
    with pytest.raises(ValueError, match=r"--judge_model \(or \$PSALIGN_JUDGE_MODEL\)"):
        OpenAIChatBackend.from_options(None, None, None)


class FakeProcessor:
    """Records the chat messages; 'tokenises' to a fixed prompt of 3 ids and decodes ids to text."""

    def __init__(self, answer):
        self.answer = answer
        self.messages = None

    def apply_chat_template(self, messages, **kwargs):
        assert kwargs["add_generation_prompt"] and kwargs["tokenize"] and kwargs["return_dict"]
        self.messages = messages

        class Batch(dict):
            def to(self, device):
                return self

        return Batch(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long))

    def decode(self, ids, skip_special_tokens):
        assert ids.tolist() == [100, 101]  # only the generated tokens
        return self.answer


class FakeModel:
    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample):
        assert do_sample is False
        return torch.cat([input_ids, torch.tensor([[100, 101]])], dim=1)


def test_local_vlm_backend_builds_chat_messages_with_images(images):
    target, baseline = images
    processor = FakeProcessor('{"better": "B", "reason": "x"}')
    backend = TransformersChatBackend("local/vlm", processor=processor, model=FakeModel())
    judge = Judge(backend, max_attempts=1)
    verdict = judge.judge_pair(target, baseline, USER, "a cat")
    assert verdict.first == "baseline" and verdict.second == "target" and verdict.outcome == "tie"
    system, user = processor.messages
    assert system["role"] == "system" and user["role"] == "user"
    kinds = [part["type"] for part in user["content"]]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert user["content"][1]["image"].size == (48, 40)
