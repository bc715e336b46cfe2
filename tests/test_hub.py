"""The Hugging Face Hub: adapters loaded from a local file-based hub cache (no network), pushed
through a stand-in for ``HfApi``, and hub ids that cannot be had reported at once."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from psalign import hub
from psalign.adapter import PSAAdapter, load_adapter
from psalign.adapter.hub import MODEL_CARD_NAME, model_card
from psalign.embeddings import EMBEDDING_STATS_FILE

USER_DIM = 8
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache folder that every hub call of this test uses, offline."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo_id: str, files: dict[str, Path], revision: str = REVISION,
                 ref: str = "main") -> None:
    """Lay ``files`` (path in the repo -> local file) out as the hub cache keeps a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, source in files.items():
        target = repo / "snapshots" / revision / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(revision)


@pytest.fixture()
def unet_and_adapter(tiny_sd15_path, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet").eval()
    torch.manual_seed(0)
    adapter = PSAAdapter.for_unet(unet, USER_DIM)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_()
    adapter.set_embedding_stats(torch.arange(USER_DIM, dtype=torch.float32), torch.full((USER_DIM,), 2.0))
    folder = tmp_path / "saved"
    adapter.save_pretrained(folder, extra={"training_args": {"pretrained_model": "org/base", "objective": "dpo"}})
    return unet, adapter, folder


def same_weights(first: PSAAdapter, second: PSAAdapter) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapters_load_from_a_local_hub_cache_with_subfolder_and_revision(hub_cache, unet_and_adapter):
    unet, adapter, folder = unet_and_adapter
    files = {f"level_aware/{p.name}": p for p in folder.iterdir()}
    put_in_cache(hub_cache, "org/psa-tiny", files)
    put_in_cache(hub_cache, "org/psa-tiny", files, revision="f" * 40, ref="v1")

    loaded = PSAAdapter.from_pretrained("org/psa-tiny", subfolder="level_aware")
    assert same_weights(loaded, adapter)
    assert same_weights(PSAAdapter.from_pretrained("org/psa-tiny", subfolder="level_aware", revision="v1"), adapter)
    attached = load_adapter("org/psa-tiny", unet, subfolder="level_aware")
    assert same_weights(attached, adapter)
    assert any(type(p).__name__ == "UserCrossAttnProcessor" for p in unet.attn_processors.values())
    attached.detach(unet)


def test_a_published_checkpoint_file_loads_from_the_hub_by_weight_name(hub_cache, unet_and_adapter, tmp_path):
    from tests.test_published_checkpoint import published_state

    from psalign.adapter import convert_published_checkpoint

    unet, _, folder = unet_and_adapter
    checkpoint = tmp_path / "psa_adapter.bin"
    torch.save(published_state(unet, 1), checkpoint)
    put_in_cache(hub_cache, "org/psa-published", {"sd15/psa_adapter.bin": checkpoint})
    from_hub = load_adapter("org/psa-published", unet, weight_name="psa_adapter.bin", subfolder="sd15")
    from_hub.detach(unet)
    assert same_weights(from_hub, convert_published_checkpoint(checkpoint, unet))
    # a repo with a config but no weights is not an adapter
    put_in_cache(hub_cache, "org/psa-tiny", {"psa_config.json": folder / "psa_config.json"})
    with pytest.raises(FileNotFoundError, match="org/psa-tiny \\(hub\\) is not a PSA adapter: it has no "
                                                "psa_adapter.safetensors"):
        PSAAdapter.from_pretrained("org/psa-tiny")


def test_a_missing_hub_adapter_is_one_sentence_naming_the_way_out(hub_cache, tiny_sd15_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet")
    with pytest.raises(FileNotFoundError, match="org/absent: PSA adapter: no such folder, and not in the local "
                                                "Hugging Face cache while the hub is offline"):
        load_adapter("org/absent", unet)
    with pytest.raises(FileNotFoundError, match="PSA adapter nowhere not found"):
        load_adapter("./nowhere", unet)


def test_infer_reads_a_hub_adapter_at_its_subfolder_and_revision(hub_cache, unet_and_adapter, tiny_sd15_path,
                                                                 tmp_path, capsys):
    import json

    import infer
    from psalign.embeddings import save_user_embedding

    _, _, folder = unet_and_adapter
    revision = "f" * 40
    put_in_cache(hub_cache, "org/psa-tiny", {f"level_aware/{p.name}": p for p in folder.iterdir()},
                 revision=revision, ref="v1")
    save_user_embedding(tmp_path / "embeds", "0000001", np.ones(USER_DIM, dtype=np.float32))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"file_name": "a.png", "caption": "a cat", "user_data": {"User_ID": "0000001"}}))
    argv = ["--pretrained_model", str(tiny_sd15_path), "--adapter", "org/psa-tiny", "--adapter_subfolder",
            "level_aware", "--embeds_folder", str(tmp_path / "embeds"), "--prompts", str(prompts),
            "--output_dir", str(tmp_path / "out"), "--num_inference_steps", "1"]
    assert infer.main(argv) == 2  # the main branch has no adapter
    assert "--adapter: org/psa-tiny" in capsys.readouterr().err
    assert infer.main([*argv, "--adapter_revision", "v1"]) == 0
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "generation_log.jsonl").read_text().splitlines()]
    assert Path(entry["adapter"]) == hub_cache / "models--org--psa-tiny" / "snapshots" / revision / "level_aware"
    with pytest.raises(SystemExit):
        infer.parse_args(["--prompts", str(prompts), "--adapter_revision", "v1"])
    assert "--adapter_subfolder and --adapter_revision need --adapter" in capsys.readouterr().err


def test_push_to_hub_uploads_the_adapter_a_model_card_and_the_embedding_statistics(monkeypatch, unet_and_adapter):
    import huggingface_hub

    _, adapter, folder = unet_and_adapter
    adapter = PSAAdapter.from_pretrained(folder)
    calls: dict[str, object] = {}

    class RecordingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, revision=None, commit_message=None):
            uploaded = Path(folder_path)
            calls["files"] = {p.name: p.read_bytes() for p in uploaded.iterdir()}
            calls["upload"] = (repo_id, path_in_repo, commit_message)
            # what was uploaded loads back as the same adapter
            calls["reloaded"] = PSAAdapter.from_pretrained(uploaded)
            with np.load(uploaded / EMBEDDING_STATS_FILE) as stats:
                calls["stats"] = (stats["mean"].copy(), stats["std"].copy())
            return "commit-info"

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    assert adapter.push_to_hub("org/psa-tiny", private=True, token="t0ken") == "commit-info"
    assert calls["token"] == "t0ken" and calls["create"] == ("org/psa-tiny", True, True)
    assert set(calls["files"]) == {"psa_config.json", "psa_adapter.safetensors", MODEL_CARD_NAME, EMBEDDING_STATS_FILE}
    assert same_weights(calls["reloaded"], adapter)
    np.testing.assert_array_equal(calls["stats"][0], np.arange(USER_DIM, dtype=np.float32))
    np.testing.assert_array_equal(calls["stats"][1], np.full(USER_DIM, 2.0, dtype=np.float32))
    card = calls["files"][MODEL_CARD_NAME].decode()
    assert card == model_card(adapter, "org/psa-tiny")
    assert "base_model: org/base" in card and "| objective | dpo |" in card
    assert f"| user embedding dimension | {USER_DIM} |" in card and 'load_adapter("org/psa-tiny"' in card


def test_an_unreachable_hub_is_reported_at_once_with_the_ways_out(monkeypatch):
    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import HTTPError

    def unreachable(*args, **kwargs):
        raise HTTPError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    started = time.monotonic()
    problem = hub.pretrained_problem("org/some-llm", "--llm_model")
    assert time.monotonic() - started < 5
    assert str(problem) == ("org/some-llm: --llm_model: no such folder, and the hub cannot be reached ([Errno -2] Name "
                            "or service not known); pass a local folder instead, or fill the cache and set "
                            "HF_HUB_OFFLINE=1")


def test_hub_checks_name_what_is_wrong(monkeypatch, tmp_path):
    import huggingface_hub
    import huggingface_hub.constants as constants
    from huggingface_hub.errors import RepositoryNotFoundError

    assert hub.looks_like_path("./model") and hub.looks_like_path("/abs/model") and hub.looks_like_path("a/b/c")
    assert not hub.looks_like_path("org/model") and not hub.looks_like_path("model")
    (tmp_path / "empty").mkdir()
    assert "the folder has no config.json" in str(hub.pretrained_problem(str(tmp_path / "empty"), "CLIP model"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class Response:
        status_code, headers, request = 404, {}, None

    def missing(*args, **kwargs):
        raise RepositoryNotFoundError("404", response=Response())

    monkeypatch.setattr(huggingface_hub, "model_info", missing)
    assert "no such (public) hub repository" in str(hub.pretrained_problem("org/typo", "--llm_model"))
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: object())
    assert hub.pretrained_problem("org/exists", "--llm_model") is None


def test_the_model_card_says_whether_the_adapter_edits_the_caption(tiny_sd15_path):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15_path, subfolder="unet")
    plain, edit = PSAAdapter.for_unet(unet, USER_DIM), PSAAdapter.for_unet(unet, USER_DIM, text_edit_layers=2)
    assert "| user text edit blocks | 0 |" in model_card(plain, "org/a") and "text edit that" not in model_card(plain, "org/a")
    card = model_card(edit, "org/b")
    assert "| user text edit blocks | 2 |" in card and "a user text edit that rewrites the caption's tokens" in card
    assert f"| parameters | {sum(p.numel() for p in edit.parameters())} |" in card
