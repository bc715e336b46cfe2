"""Small I/O helpers shared by the whole package: atomic writes, located input errors, and bounded
readers of text and JSON lines that report every problem as ``file:line`` instead of raising."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Sequence


def _umask_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (mkstemp's files are owner-only)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


#: Random characters ``tempfile.mkstemp`` puts between a temporary name's prefix and suffix.
_TEMP_RANDOM_CHARS = 8
#: Longest name of one path component, in bytes, on common file systems (ext4, XFS, APFS, NTFS).
NAME_MAX_BYTES = 255


def _temp_affixes(name: str, suffix: str = "") -> tuple[str, str]:
    """Prefix and suffix of the temporary file that :func:`atomic_write` / :func:`atomic_path` use for ``name``."""
    return f".{name}.", f".tmp{suffix}"


def temporary_name_bytes(name: str, suffix: str = "") -> int:
    """Length in bytes of the temporary name an atomic write of a file called ``name`` uses."""
    prefix, end = _temp_affixes(name, suffix)
    return len(prefix.encode("utf-8")) + _TEMP_RANDOM_CHARS + len(end.encode("utf-8"))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` and move it over ``path`` only when the block succeeds.

    A crash or exception inside the block leaves any previous ``path`` untouched and no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
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
    prefix, end = _temp_affixes(path.name, suffix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=end)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _umask_mode())  # after the writer: some (safetensors) create the file anew, owner-only
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


# --------------------------------------------------------------------------------------------
# Bounded readers: a malformed or oversized input becomes a located problem, never a traceback

#: Longest line of a JSON-lines input file, in bytes (a prompts line is a few hundred).
MAX_LINE_BYTES = 64 * 1024
#: Deepest nesting of arrays and objects in one JSON line (a prompts line needs 3).
MAX_JSON_DEPTH = 8
#: Most digits of a JSON integer (2**63 - 1, the largest seed, has 19).
MAX_JSON_INT_DIGITS = 19


@dataclass(frozen=True)
class TextLine:
    """One line of a text file: its 1-based ``number`` and ``text``, or, when it cannot be read
    (not UTF-8, too long), ``text`` None and the ``problem``."""

    number: int
    text: str | None
    problem: str | None = None


def _utf8_problem(error: UnicodeDecodeError, data: bytes) -> str:
    return f"not valid UTF-8 (byte 0x{data[error.start]:02x} at column {error.start + 1}); save the file as UTF-8"


def read_text_lines(path: str | os.PathLike, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[TextLine]:
    """The lines of a UTF-8 file (a leading byte-order mark is dropped), read ``max_line_bytes`` at
    most at a time: a longer line, or one that is not UTF-8, comes with its problem instead of its text."""
    with open(path, "rb") as handle:
        number = 0
        while chunk := handle.readline(max_line_bytes + 1):
            number += 1
            if len(chunk) > max_line_bytes and not chunk.endswith(b"\n"):
                size = len(chunk)
                while chunk and not chunk.endswith(b"\n"):
                    chunk = handle.readline(1 << 20)
                    size += len(chunk)
                yield TextLine(number, None, f"line is {size} bytes long; at most {max_line_bytes} are allowed")
                continue
            if number == 1 and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            try:
                yield TextLine(number, chunk.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield TextLine(number, None, _utf8_problem(error, chunk))


def unreadable_problem(path: str | os.PathLike, error: OSError, what: str = "file") -> InputProblem:
    """The problem of an input ``path`` that could not be opened or read (``error``), naming
    ``what`` it should have been (e.g. ``"users CSV file"``)."""
    if isinstance(error, FileNotFoundError):
        reason = f"no such {what}"
    elif isinstance(error, IsADirectoryError):
        reason = f"is a folder, not a {what}"
    elif isinstance(error, PermissionError):
        reason = f"the {what} cannot be read: permission denied"
    else:
        reason = f"the {what} cannot be read: {error.strerror or error}"
    return InputProblem(str(path), 0, reason)


def read_input_text(path: str | os.PathLike, what: str = "file") -> str:
    """:func:`read_utf8_text` for an input the user named: a file that is missing, a folder or
    unreadable is an :class:`InputError` too (:func:`unreadable_problem`)."""
    try:
        return read_utf8_text(path)
    except OSError as error:
        raise InputError([unreadable_problem(path, error, what)]) from None


def read_utf8_text(path: str | os.PathLike) -> str:
    """The whole text of a UTF-8 file (a leading byte-order mark is dropped); :class:`InputError`
    naming the line of the first byte that is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        reason = f"not valid UTF-8 (byte 0x{data[error.start]:02x} at column {error.start - line_start + 1}); " \
                 "save the file as UTF-8"
        raise InputError([InputProblem(str(path), line, reason)]) from None


class _JSONLimitExceeded(ValueError):
    """A JSON value beyond what an input line may hold."""


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_JSON_INT_DIGITS:
        raise _JSONLimitExceeded(f"an integer has {digits} digits; at most {MAX_JSON_INT_DIGITS} are allowed")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _JSONLimitExceeded(f"the number {text} is too large")
    return value


def _no_constants(name: str) -> None:
    raise _JSONLimitExceeded(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _JSONLimitExceeded(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _depth(value: Any) -> int:
    """Nesting depth of arrays and objects in ``value`` (a scalar: 0), found without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_line(text: str, max_depth: int = MAX_JSON_DEPTH) -> tuple[Any, str | None]:
    """``(value, None)`` for a valid JSON line within the bounds, else ``(None, reason)``.

    Refused besides invalid JSON: a key twice in one object, NaN and Infinity, an integer of more
    than :data:`MAX_JSON_INT_DIGITS` digits, a float too large to represent, and nesting deeper
    than ``max_depth``.
    """
    try:
        value = json.loads(text, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constants,
                           object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as error:
        return None, f"invalid JSON ({error.msg} at column {error.colno})"
    except _JSONLimitExceeded as error:
        return None, str(error)
    except RecursionError:
        return None, f"nested more than {max_depth} levels deep"
    if _depth(value) > max_depth:
        return None, f"nested more than {max_depth} levels deep"
    return value, None


def path_component_problem(part: str) -> str | None:
    """Why ``part`` cannot be one component of a file path written atomically (None if it can):
    a NUL or other control character, text that is not encodable, or a name (counting the
    temporary name of the atomic write) longer than :data:`NAME_MAX_BYTES`."""
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in part):
        return f"{part!r} contains a control character (such as NUL or a line break)"
    try:
        part.encode("utf-8")
    except UnicodeEncodeError:
        return f"{part!r} is not valid Unicode text"
    longest = max(len(part.encode("utf-8")), temporary_name_bytes(part, Path(part).suffix))
    if longest > NAME_MAX_BYTES:
        return f"a name of {len(part.encode('utf-8'))} bytes is too long for the file system (with the temporary " \
               f"name used while writing it, {longest} of at most {NAME_MAX_BYTES} bytes)"
    return None


def writable_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``folder`` or, when it does not exist yet, in the nearest
    folder above it (None when they can). Tried with a temporary file that is removed at once."""
    folder = Path(folder)
    existing = folder
    try:
        while not existing.exists() and existing.parent != existing:
            existing = existing.parent
        if not existing.is_dir():
            return "is a file, not a folder" if existing == folder else f"{existing} is a file, not a folder"
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".psalign-write-test.")
    except OSError as error:
        return f"cannot write in {existing}: {error.strerror or error}"
    os.close(fd)
    os.unlink(probe)
    return None


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be written as a file (None when it can): it is a folder, or its folder
    cannot be written."""
    path = Path(path)
    if path.is_dir():
        return "is a folder; give a file name"
    problem = writable_folder_problem(path.parent)
    return None if problem is None else f"cannot be written: {problem}"


@dataclass(frozen=True)
class JSONLines:
    """What :func:`read_json_lines` found: ``(line number, value)`` pairs, the lines that are not
    valid, and ``torn_line``: a last line cut short by an interrupted append (ignored, not a problem)."""

    entries: list[tuple[int, Any]]
    problems: list[InputProblem]
    torn_line: int | None = None


def read_json_lines(path: str | os.PathLike) -> JSONLines:
    """Parse a JSON-lines file that this package appends to (logs, records); blank lines are skipped.

    A last line with no newline that does not parse is a write cut short (``torn_line``); any
    other unreadable line is a problem named ``file:line``.
    """
    entries: list[tuple[int, Any]] = []
    problems: list[InputProblem] = []
    torn = None
    for line in read_text_lines(path):
        if line.text is None:
            problems.append(InputProblem(str(path), line.number, line.problem))
            continue
        if not line.text.strip():
            continue
        value, reason = parse_json_line(line.text)
        if reason is None:
            entries.append((line.number, value))
        elif not line.text.endswith("\n"):
            torn = line.number
        else:
            problems.append(InputProblem(str(path), line.number, reason))
    return JSONLines(entries, problems, torn)


def _end_at_line_boundary(handle: IO[bytes]) -> None:
    """Make a file opened ``r+b`` end with a newline: a torn last line (one that is not valid JSON)
    is cut off, a complete one gets its newline."""
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return
    handle.seek(end - 1)
    if handle.read(1) == b"\n":
        return
    start = end
    while start > 0:
        block = min(1 << 16, start)
        handle.seek(start - block)
        newline = handle.read(block).rfind(b"\n")
        if newline >= 0:
            start = start - block + newline + 1
            break
        start -= block
    handle.seek(start)
    tail = handle.read()
    try:
        complete = parse_json_line(tail.decode("utf-8"))[1] is None
    except UnicodeDecodeError:
        complete = False
    if complete:
        handle.seek(end)
        handle.write(b"\n")
    else:
        handle.truncate(start)


def append_json_lines(path: str | os.PathLike, values: Sequence[Any]) -> None:
    """Append one JSON line per value to ``path`` in a single write, then fsync; a torn last line
    left by an earlier interrupted append is cut off first, so lines never run together."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab"):
        pass
    with open(path, "r+b") as handle:
        _end_at_line_boundary(handle)
        handle.seek(0, os.SEEK_END)
        handle.write("".join(json.dumps(value) + "\n" for value in values).encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
