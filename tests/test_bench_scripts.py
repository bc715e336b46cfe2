"""The benchmark scripts under bench/ keep working as the library changes."""

from __future__ import annotations

from pathlib import Path


def test_every_psalign_name_the_bench_scripts_import_exists():
    """The benchmark scripts import psalign inside their functions, so a renamed or moved name
    breaks them only when they run (minutes later, on the slow path); check every name now."""
    import ast
    import importlib

    missing = []
    for script in sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("psalign"):
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{alias.name}" for alias in node.names
                            if not hasattr(module, alias.name)]
    assert not missing
