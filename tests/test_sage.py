"""Sage pairs: the preference rule, file names, metadata.jsonl, validation, the pair dataset."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from psalign.embeddings import save_user_embedding
from psalign.io import InputError
from psalign.sage import (
    PreferencePairDataset,
    SageImageName,
    SageUnit,
    build_preference_pairs,
    load_preference_dataset,
    paired_crop_flip,
    parse_sage_image_name,
    read_preference_pairs,
    sage_image_name,
    sage_preference,
    sage_record_name,
    write_preference_pairs,
)
from psalign.users import UserProfile


@pytest.mark.parametrize(
    "banned, caption, expected",
    [
        (True, "unsafe", ("s", "u")),
        (True, "safe", ("s", "u")),
        (False, "unsafe", ("u", "s")),
        (False, "safe", ("s", "u")),
    ],
)
def test_pair_rule(banned, caption, expected):
    assert sage_preference(banned, caption) == expected


def test_pair_rule_rejects_other_captions():
    with pytest.raises(ValueError, match="'safe' or 'unsafe'"):
        sage_preference(True, "neutral")


def test_file_names():
    name = sage_image_name("0000033", "Self-Harm", "cutting scars", 12, "u")
    assert name == "user_0000033_self-harm_cutting_scars_00012_u.jpg"
    assert sage_record_name("0000030", "Propaganda", "ideological pamphlet", 1, "unsafe") == (
        "user_0000030_propaganda_ideological_pamphlet_00001.jpg_u.jpg"
    )
    assert sage_record_name("0000030", "propaganda", "ideological pamphlet", 1, "safe").endswith("00001.jpg_s.jpg")
    parsed = parse_sage_image_name("images/user_0000030_harassment_guilt-tripping_00004_s.jpg")
    assert parsed == SageImageName("0000030", "Harassment", "guilt-tripping", 4, "s")
    assert parse_sage_image_name(sage_image_name("0000001", "Self-Harm", "a b c", 99999, "s")) == SageImageName(
        "0000001", "Self-Harm", "a b c", 99999, "s"
    )
    for bad in ("user_33_hate_x_00001_s.jpg", "user_0000033_gore_x_00001_s.jpg", "user_0000033_hate_x_00001_x.jpg"):
        with pytest.raises(ValueError, match="not a Sage image name"):
            parse_sage_image_name(bad)
    with pytest.raises(ValueError, match="path separator"):
        sage_image_name("0000001", "Hate", "a/b", 1, "s")


def _user(user_id, banned):
    return UserProfile(
        user_id=user_id,
        cluster_id="13",
        age=85,
        age_group="elderly",
        gender="female",
        religion="Christianity",
        physical_condition="healthy",
        mental_condition="healthy",
    ).with_banned(banned)


def _unit(user_id, category, concept, index):
    stem_s = sage_image_name(user_id, category, concept, index, "s")
    stem_u = sage_image_name(user_id, category, concept, index, "u")
    return SageUnit(user_id, category, concept, index, f"safe {concept}", f"unsafe {concept}", stem_s, stem_u)


def test_build_preference_pairs():
    users = [_user("0000030", ["Hate", "Propaganda"])]
    records = build_preference_pairs(
        [_unit("0000030", "Propaganda", "ideological pamphlet", 1), _unit("0000030", "harassment", "spamming", 9)],
        users,
    )
    stem = "user_0000030_propaganda_ideological_pamphlet_00001"
    s, u = f"{stem}_s.jpg", f"{stem}_u.jpg"
    assert records[0] == {
        "file_name": "user_0000030_propaganda_ideological_pamphlet_00001.jpg_u.jpg",
        "chosen": s,
        "rejected": u,
        "caption": "unsafe ideological pamphlet",
        "user_data": {
            "User_ID": "0000030",
            "Cluster_ID": "13",
            "Age": 85,
            "Age_Group": "elderly",
            "Gender": "female",
            "Religion": "Christianity",
            "Physical_Condition": "healthy",
            "Mental_Condition": "healthy",
        },
    }
    assert (records[1]["file_name"], records[1]["chosen"], records[1]["caption"]) == (
        "user_0000030_propaganda_ideological_pamphlet_00001.jpg_s.jpg",
        s,
        "safe ideological pamphlet",
    )
    # Harassment is allowed: the unsafe caption prefers the unsafe image, the safe caption the safe one
    assert records[2]["chosen"].endswith("_u.jpg") and records[2]["rejected"].endswith("_s.jpg")
    assert records[3]["chosen"].endswith("_s.jpg") and records[3]["rejected"].endswith("_u.jpg")
    with pytest.raises(ValueError, match="user 0000031 is not in the users file"):
        build_preference_pairs([_unit("0000031", "Hate", "x", 1)], users)


def _write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path, format="PNG")  # lossless, whatever the suffix says


def _pair_folder(tmp_path, size=(32, 48), n_units=2):
    """Images where rejected = 255 - chosen, users, embeddings and a metadata.jsonl."""
    rng = np.random.default_rng(0)
    users = [_user("0000001", ["Hate"]), _user("0000002", [])]
    units = [_unit(users[i % 2].user_id, "Hate", f"concept {i}", i) for i in range(n_units)]
    root = tmp_path / "images"
    for unit in units:
        pattern = rng.integers(0, 256, size=(*size, 3))
        _write_image(root / unit.safe_image, pattern)
        _write_image(root / unit.unsafe_image, 255 - pattern)
    embeds = tmp_path / "embeds"
    for i, user in enumerate(users):
        save_user_embedding(embeds, user.user_id, np.arange(6, dtype=np.float32) + 10 * i)
    metadata = write_preference_pairs(tmp_path / "metadata.jsonl", build_preference_pairs(units, users))
    return metadata, root, embeds, users


def test_metadata_round_trip(tmp_path):
    metadata, root, _, users = _pair_folder(tmp_path)
    records = read_preference_pairs(metadata, root, users=users)
    assert records == [json.loads(line) for line in metadata.read_text().splitlines()]
    assert len(records) == 4


def test_reader_reports_every_bad_record(tmp_path):
    metadata, root, _, users = _pair_folder(tmp_path)
    good = [json.loads(line) for line in metadata.read_text().splitlines()]
    no_caption = {k: v for k, v in good[0].items() if k != "caption"}
    missing_image = {**good[1], "rejected": "nowhere.jpg"}
    unknown_user = {**good[2], "user_data": {**good[2]["user_data"], "User_ID": "0000099"}}
    same = {**good[3], "rejected": good[3]["chosen"]}
    lines = [json.dumps(good[0]), "{not json", json.dumps(no_caption), "", json.dumps(missing_image)]
    lines += [json.dumps(unknown_user), json.dumps(same), json.dumps(good[1])]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as info:
        read_preference_pairs(bad, root, users=users)
    message = str(info.value)
    assert f"{bad}:2: bad JSON" in message
    assert f"{bad}:3: caption: missing key" in message
    assert f"{bad}:5: rejected: missing image" in message and "nowhere.jpg" in message
    assert f"{bad}:6: user_data.User_ID: unknown user '0000099'" in message
    assert f"{bad}:7: chosen and rejected are the same image" in message
    assert {p.line for p in info.value.problems} == {2, 3, 5, 6, 7}
    with pytest.warns(UserWarning, match=r"bad.jsonl:2: bad JSON"):
        kept = read_preference_pairs(bad, root, users=users, skip_invalid=True)
    assert kept == [good[0], good[1]]
    # without a users file, user ids are not checked
    with pytest.warns(UserWarning):
        assert len(read_preference_pairs(bad, root, skip_invalid=True)) == 3


def test_hf_dataset_decodes_images_lazily(tmp_path):
    import datasets

    metadata, root, _, users = _pair_folder(tmp_path)
    dataset = load_preference_dataset(metadata, root, users=users)
    assert len(dataset) == 4 and isinstance(dataset.features["chosen"], datasets.Image)
    first = json.loads(metadata.read_text().splitlines()[0])
    # decoded on access: an image changed after loading is seen as it is now
    _write_image(root / first["chosen"], np.full((32, 48, 3), 7))
    assert np.asarray(dataset[0]["chosen"]).max() == 7
    assert dataset[0]["caption"] == first["caption"] and dataset[0]["user_data"]["User_ID"] == "0000001"


def _distinct_pixels(height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 with every pixel different, so any crop or mirroring is recognisable."""
    values = np.arange(height * width * 3).reshape(height, width, 3) * 7 % 256
    return values.astype(np.uint8)


def _matches(image: torch.Tensor, pixels: np.ndarray) -> bool:
    """Whether a (3, h, w) tensor in [-1, 1] shows the (h, w, 3) uint8 ``pixels``."""
    expected = torch.from_numpy(np.ascontiguousarray(pixels) / 127.5 - 1.0).permute(2, 0, 1).float()
    return torch.allclose(image, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(4, 10), (10, 4)])  # (h, w): wide images crop along x, tall along y
def test_paired_crop_flip_mirrors_both_images_and_reports_the_crop_in_the_mirrored_frame(size):
    original = _distinct_pixels(*size)
    chosen, rejected = Image.fromarray(original), Image.fromarray(255 - original)
    mirrored = original[:, ::-1]
    torch.manual_seed(0)
    origins, flips = set(), set()
    for _ in range(40):
        out = paired_crop_flip(chosen, rejected, resolution=4, random_crop=True, random_flip=True)
        assert out["chosen"].shape == out["rejected"].shape == (3, 4, 4) and out["chosen"].dtype == torch.float32
        assert out["original_size"] == size
        top, left = out["crop_top_left"]
        window = (slice(top, top + 4), slice(left, left + 4))
        flipped = _matches(out["chosen"], mirrored[window])
        assert flipped or _matches(out["chosen"], original[window])
        torch.testing.assert_close(out["rejected"], -out["chosen"], rtol=0, atol=1e-6)  # same crop, same flip
        origins.add((top, left))
        flips.add(flipped)
    assert len(origins) > 3 and flips == {True, False}


def test_paired_crop_flip_resizes_the_shorter_side_and_centres_the_crop():
    chosen = Image.fromarray(np.zeros((8, 20, 3), dtype=np.uint8))
    out = paired_crop_flip(chosen, chosen.copy(), resolution=4)
    assert out["original_size"] == (8, 20) and out["crop_top_left"] == (0, 3)  # resized to 4x10 px
    assert out["chosen"].shape == (3, 4, 4) and torch.all(out["chosen"] == -1)
    with pytest.raises(ValueError, match="chosen is 20x8 px but rejected is 20x9 px"):
        paired_crop_flip(chosen, Image.new("RGB", (20, 9)), resolution=4)


def test_pair_dataset_shares_one_crop_and_flip(tmp_path):
    metadata, root, embeds, users = _pair_folder(tmp_path, size=(32, 48), n_units=1)
    dataset = PreferencePairDataset(
        metadata, root, embeds, users=users, resolution=32, random_crop=True, random_flip=True
    )
    original = (np.asarray(Image.open(root / read_preference_pairs(metadata, root)[0]["chosen"])) / 127.5 - 1.0)
    torch.manual_seed(0)
    lefts, flips = set(), set()
    for _ in range(40):
        item = dataset[0]
        assert item["chosen"].shape == item["rejected"].shape == (3, 32, 32)
        assert item["chosen"].dtype == torch.float32
        assert torch.allclose(item["rejected"], -item["chosen"], atol=1e-6)  # rejected = 255 - chosen: same crop, flip
        top, left = item["crop_top_left"]
        assert item["original_size"] == (32, 48) and top == 0
        flipped = original[:, ::-1]
        plain_crop = torch.from_numpy(np.ascontiguousarray(original[:, left : left + 32])).permute(2, 0, 1).float()
        flip_crop = torch.from_numpy(np.ascontiguousarray(flipped[:, left : left + 32])).permute(2, 0, 1).float()
        is_plain = torch.allclose(item["chosen"], plain_crop, atol=1e-6)
        is_flip = torch.allclose(item["chosen"], flip_crop, atol=1e-6)
        assert is_plain or is_flip
        lefts.add(left)
        flips.add(is_flip)
    assert len(lefts) > 3 and flips == {True, False}


def test_pair_dataset_item_fields_and_center_crop(tmp_path):
    metadata, root, embeds, users = _pair_folder(tmp_path, size=(64, 96))
    dataset = PreferencePairDataset(metadata, root, embeds, users=users, resolution=32)
    assert len(dataset) == 4
    item = dataset[2]  # second unit, unsafe caption, user 0000002
    assert item["user_id"] == "0000002" and item["caption"] == "unsafe concept 1"
    assert torch.equal(item["user_embed"], torch.arange(6, dtype=torch.float32) + 10)
    assert item["original_size"] == (64, 96)
    assert item["crop_top_left"] == (0, 8)  # resized to 32x48, centred 32x32 crop
    assert torch.equal(dataset[2]["chosen"], item["chosen"])  # no randomness without the options
    # rejected = 255 - chosen up to the resize's rounding
    assert (item["rejected"] + item["chosen"]).abs().max() <= 2 / 127.5 + 1e-6
    assert item["chosen"].min() >= -1 and item["chosen"].max() <= 1


def test_pair_dataset_fails_early_on_a_missing_embedding(tmp_path):
    metadata, root, embeds, users = _pair_folder(tmp_path)
    (embeds / "0000002.npy").unlink()
    with pytest.raises(FileNotFoundError, match="0000002"):
        PreferencePairDataset(metadata, root, embeds, users=users, resolution=32)


def test_pair_dataset_refuses_pairs_of_different_sizes(tmp_path):
    metadata, root, embeds, users = _pair_folder(tmp_path)
    first = read_preference_pairs(metadata, root)[0]
    _write_image(root / first["rejected"], np.zeros((40, 48, 3)))
    dataset = PreferencePairDataset(metadata, root, embeds, users=users, resolution=32)
    with pytest.raises(ValueError, match="same size"):
        dataset[0]
