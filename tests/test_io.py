"""Atomic writes: all or nothing, with ordinary file permissions."""

import os

import pytest

from psalign.io import InputError, InputProblem, atomic_path, atomic_write


def test_atomic_write_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_files_get_umask_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.txt") as handle:
            handle.write("x")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o644


def test_input_error_lists_every_problem_with_its_location():
    error = InputError([InputProblem("p.jsonl", 3, "missing", "caption"), InputProblem("u.csv", 0, "not found")])
    assert str(error).splitlines()[1:] == ["  p.jsonl:3: caption: missing", "  u.csv: not found"]
