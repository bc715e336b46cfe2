"""Small I/O helpers shared by the whole package: atomic writes and located input errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence


def _umask_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (mkstemp's files are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` and move it over ``path`` only when the block succeeds.

    A crash or exception inside the block leaves any previous ``path`` untouched and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, _umask_mode())
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for writers that take a file name (``np.save``,
    ``safetensors.save_file``, ``Image.save``); it replaces ``path`` only when the block succeeds.

    ``suffix`` keeps an extension on the temporary name for writers that infer the format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.fchmod(fd, _umask_mode())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (the content key of caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 naming the weights at ``path``: a weights file's bytes, or for a folder the names
    and bytes of the weight files directly in it (subfolders such as checkpoints are not read)."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no weight file ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()


def model_sha256(path: str | os.PathLike, samples: int = 32, sample_bytes: int = 1 << 15) -> str | None:
    """Hex SHA-256 telling local model folders apart without reading gigabytes, or None for a
    hub id (not a local folder).

    It covers every file under ``path`` (hidden ones excepted): its relative name, its size, and
    its bytes, all of them for a small file, else ``samples`` chunks of ``sample_bytes`` spread
    evenly over it (1 MiB per file by default). A copied or moved folder keeps its digest; a
    changed run of bytes longer than the gap between samples changes it wherever it lies, and so,
    all but surely, do changes spread over a file (retrained weights, a fused LoRA).
    """
    root = Path(path)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted(f for f in root.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(root).parts))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root).as_posix()}:{size}\n".encode())
        with open(file, "rb") as handle:
            if size <= samples * sample_bytes:
                digest.update(handle.read())
                continue
            for index in range(samples):
                handle.seek(index * (size - sample_bytes) // (samples - 1))
                digest.update(handle.read(sample_bytes))
    return digest.hexdigest()


@dataclass(frozen=True)
class InputProblem:
    """One problem in an input file: ``file:line: [field] reason``. ``line`` is 1-based (0: whole file)."""

    file: str
    line: int
    reason: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        what = f"{self.field}: {self.reason}" if self.field else self.reason
        return f"{where}: {what}"


class InputError(ValueError):
    """Raised when an input file has problems; lists every one of them, one per line."""

    def __init__(self, problems: Sequence[InputProblem], header: str | None = None):
        self.problems = list(problems)
        head = header or f"{len(self.problems)} problem(s) in the input"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))
