"""Reading torch-pickled files without running code from them.

psalign reads ``.pt`` / ``.bin`` files only through :func:`load_weights_only`: ``torch.load`` with
``weights_only=True``, whose unpickler rebuilds tensors, numbers, strings and plain containers and
refuses any other Python object (the way a crafted pickle runs code). A refused, truncated or
foreign file raises :class:`TensorFileError` with one sentence naming the file.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class TensorFileError(ValueError):
    """A torch file that could not be read safely: refused by the weights-only unpickler, or corrupt."""


_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _refusal(path: Path, error: pickle.UnpicklingError) -> str:
    """One sentence for a weights-only refusal: an object it would have built, or no torch file at all."""
    refused = _REFUSED_GLOBAL.search(str(error))
    if refused:
        return (f"{path} holds more than tensors and plain values (it calls {refused[1]}), so psalign "
                "refuses to unpickle it")
    return (f"{path} is not a weights-only torch file (a plain pickle, or not a torch file at all), so psalign "
            "refuses to unpickle it")


def load_weights_only(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; ``mmap`` maps tensor data instead of reading it
    (zip-format files; others are read normally). Raises :class:`TensorFileError`, never unpickles objects."""
    path = Path(path)
    use_mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as error:
        raise TensorFileError(_refusal(path, error)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise TensorFileError(f"{path} is not a readable torch file (truncated or corrupt: {first_line})") from None
