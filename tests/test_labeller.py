"""The LLM labeller: prompt, template files, parsing messy answers, a tiny causal LM end to end."""

import pytest
import torch

from psalign.categories import CATEGORIES
from psalign.embeddings import chat_inputs
from psalign.io import InputError
from psalign.labeller import LLMLabeller, labeller_prompt, parse_category_list, read_labeller_template
from psalign.testing import build_tiny_causal_lm
from psalign.users import BAN_RULES, generate_users


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('["Violence", "Self-Harm"]', ["Violence", "Self-Harm"]),
        ("[]", []),
        ("Sure! Here is the list:\n```json\n[\"Sexuality\", \"Hate\"]\n```\nHope it helps.", ["Hate", "Sexuality"]),
        ("['Propaganda', 'Shocking']", ["Shocking", "Propaganda"]),
        ("[Hate, harrasment , self-harm]", ["Hate", "Harassment", "Self-Harm"]),
        ('["Hate", "Violence",]', ["Hate", "Violence"]),
        ('["sexual", "SEXUALITY", "Self Harm"]', ["Self-Harm", "Sexuality"]),
        ("<think>maybe [\"Gore\"]? no.</think> Final: [\"Violence\"]", ["Violence"]),
        ('Options were ["Hate", "Violence", "Shocking"]; forbidden: ["Shocking"]', ["Shocking"]),
    ],
)
def test_parse_messy_answers(answer, expected):
    assert parse_category_list(answer) == expected


@pytest.mark.parametrize(
    "answer, message",
    [
        ("Nothing should be banned.", "no list in the answer"),
        ('["Violence", "Gore"]', "'Gore', which is not a Sage category"),
        ('["Illegal Activity"]', "'Illegal Activity', which is not a Sage category"),
        ("[1, 2]", "does not hold category names"),
    ],
)
def test_parse_rejects_bad_answers(answer, message):
    with pytest.raises(ValueError, match=message):
        parse_category_list(answer)


def test_default_prompt_has_profile_categories_and_rules():
    user = generate_users(1, seed=3)[0]
    prompt = labeller_prompt(user)
    assert f"age: {user.age} ({user.age_group})" in prompt and f"religion: {user.religion}" in prompt
    assert f"mental condition: {user.mental_condition}" in prompt
    assert ", ".join(CATEGORIES) in prompt
    for rule in BAN_RULES:
        assert f"{rule.description}: {', '.join(rule.categories)}." in prompt


def test_template_file(tmp_path):
    user = generate_users(1, seed=3)[0]
    good = tmp_path / "good.txt"
    good.write_text("Person aged {age}, {religion}. Pick from {categories}. Reply as a JSON list.")
    template = read_labeller_template(good)
    assert labeller_prompt(user, template) == (
        f"Person aged {user.age}, {user.religion}. Pick from {', '.join(CATEGORIES)}. Reply as a JSON list."
    )
    bad = tmp_path / "bad.txt"
    bad.write_text("Person aged {age}\n{banned}\n")
    with pytest.raises(InputError, match=r"bad.txt:2: unknown placeholder \{banned\}"):
        read_labeller_template(bad)
    with pytest.raises(InputError):  # checked before the (missing) model is loaded
        LLMLabeller(str(tmp_path / "no-model"), template="{nope}")


#: A short prompt keeps the tiny model's generation and fitting fast; the default one is tested above.
COMPACT_TEMPLATE = "{age} {gender} {religion} {physical_condition} {mental_condition}. Banned of {categories}?"


@pytest.fixture(scope="module")
def tiny_labeller(tmp_path_factory):
    path = build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_labeller"), hidden_size=64)
    return LLMLabeller(str(path), template=COMPACT_TEMPLATE, max_new_tokens=24, batch_size=4)


def test_greedy_answers_do_not_depend_on_batching(tiny_labeller):
    users = generate_users(2, seed=4)
    prompts = [labeller_prompt(u, COMPACT_TEMPLATE) for u in users]
    lengths = chat_inputs(tiny_labeller.tokenizer, prompts, "cpu")["attention_mask"].sum(1)
    assert lengths[0] != lengths[1]  # the batch is really padded
    answers = tiny_labeller.answers(users)
    assert answers == [tiny_labeller.answers([u])[0] for u in users]  # same alone as in a left-padded batch
    prompt_start = labeller_prompt(users[0], COMPACT_TEMPLATE)[:12]
    assert all(prompt_start not in a for a in answers)  # only generated text, never the prompt


def _teach(labeller, users, answers, steps=80):
    """Fit the tiny model to answer each user's prompt (as the labeller builds it) with the given text."""
    tokenizer, model = labeller.tokenizer, labeller.model
    examples = []
    for user, answer in zip(users, answers):
        prompt = chat_inputs(tokenizer, [labeller_prompt(user, labeller.template)], model.device)["input_ids"][0]
        target = torch.tensor(tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])
        ids = torch.cat([prompt, target])[None]
        labels = ids.clone()
        labels[0, : len(prompt)] = -100
        examples.append((ids, labels))
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in examples)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_labeller_end_to_end_with_a_tiny_model(tiny_labeller):
    users = generate_users(3, seed=6)
    _teach(tiny_labeller, users, ['Sure: ["violence", "Hate"]', "```json\n['Sexuality']\n```", '["Gore"]'])
    first, second = tiny_labeller.label(users[:2])  # one left-padded batch
    assert first.banned_categories == ("Hate", "Violence")
    assert first.allowed_categories == ("Harassment", "Self-Harm", "Sexuality", "Shocking", "Propaganda")
    assert second.banned_categories == ("Sexuality",)
    assert (first.user_id, first.age, second.religion) == (users[0].user_id, users[0].age, users[1].religion)
    with pytest.raises(ValueError, match=rf"user {users[2].user_id}: the answer names 'Gore'"):
        tiny_labeller.label(users)
