"""The Hugging Face Hub: whether a model id can be loaded, checked in seconds before any model is.

Every command that takes a model (``--pretrained_model``, ``--llm_model``, the CLIP of Q16 and
CLIPScore, a judge VLM, ``--adapter``) accepts a local folder or a hub id. :func:`hub_problem`
decides up front whether a hub id can work:

* a file of it is in the local cache: yes (``from_pretrained`` reads the cache);
* the hub is offline (``HF_HUB_OFFLINE=1``): no, and the message says so;
* otherwise one metadata request with a short timeout (:data:`HUB_TIMEOUT_S`) says whether the
  repository exists and can be reached. An unreachable hub is reported at once, with the two ways
  out (a local folder, or offline mode with a filled cache), instead of the minutes of retries a
  download would spend before failing.
"""

from __future__ import annotations

from pathlib import Path

from psalign.io import InputProblem

#: Seconds the metadata request may take before the hub counts as unreachable.
HUB_TIMEOUT_S = 10.0

_WAYS_OUT = "pass a local folder instead, or fill the cache and set HF_HUB_OFFLINE=1"


def looks_like_path(name_or_path: str) -> bool:
    """True when ``name_or_path`` can only be a file-system path (not ``name`` or ``org/name``)."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or Path(name_or_path).exists()


def is_cached(repo_id: str, filename: str, subfolder: str | None = None, revision: str | None = None) -> bool:
    """True when ``filename`` (under ``subfolder``) of hub model ``repo_id`` is in the local cache."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    path = f"{subfolder}/{filename}" if subfolder else filename
    try:
        return isinstance(try_to_load_from_cache(repo_id, path, revision=revision), str)
    except HFValidationError:
        return False


def hub_problem(
    repo_id: str, filename: str, what: str, subfolder: str | None = None, revision: str | None = None
) -> InputProblem | None:
    """Why hub model ``repo_id`` cannot be loaded, or ``None`` when it can (see the module docstring).

    ``filename`` is a file every copy of the model has (``model_index.json`` for a pipeline,
    ``config.json`` for a transformers model); ``what`` names the model's role in the message
    (``"--llm_model"``). Takes at most about :data:`HUB_TIMEOUT_S` seconds, and no time when the
    file is cached or the hub is offline."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        HTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if is_cached(repo_id, filename, subfolder, revision):
        return None
    if constants.is_offline_mode():
        return InputProblem(repo_id, 0, f"{what}: no such folder, and not in the local Hugging Face cache while the "
                                        "hub is offline (HF_HUB_OFFLINE=1); pass a local folder instead")
    try:
        model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except HFValidationError as error:
        return InputProblem(repo_id, 0, f"{what}: neither a folder nor a valid hub id ({error})")
    except GatedRepoError:
        return InputProblem(repo_id, 0, f"{what}: a gated hub repository; accept its terms on the hub and log in "
                                        "(hf auth login), or " + _WAYS_OUT)
    except RepositoryNotFoundError:
        return InputProblem(repo_id, 0, f"{what}: no such folder, and no such (public) hub repository")
    except RevisionNotFoundError:
        return InputProblem(repo_id, 0, f"{what}: the hub repository has no revision {revision!r}")
    except (HTTPError, OSError) as error:  # no network, DNS, timeout, proxy, server errors
        reason = str(error).strip() or type(error).__name__
        return InputProblem(repo_id, 0, f"{what}: no such folder, and the hub cannot be reached ({reason}); "
                                        + _WAYS_OUT)
    return None


def pretrained_problem(name_or_path: str, what: str, filename: str = "config.json") -> InputProblem | None:
    """Why ``from_pretrained(name_or_path)`` cannot work, or ``None`` when it may.

    A local folder must hold ``filename``; anything else must be a hub id that
    :func:`hub_problem` accepts. ``what`` names the model's role in the message."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / filename).is_file():
            return InputProblem(str(path), 0, f"{what}: the folder has no {filename}")
        return None
    if looks_like_path(name_or_path):
        return InputProblem(name_or_path, 0, f"{what}: no such model folder")
    return hub_problem(name_or_path, filename, what)
