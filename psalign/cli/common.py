"""What every command line shares: the help layout, defaults read from the config dataclasses,
and the way a program ends (an exit status and one message, never a traceback for an expected
problem)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

from psalign.io import InputError

EXIT_OK = 0
#: Refused inputs: the message names file:line (or --flag) and the reason.
EXIT_REFUSED = 2
#: Ctrl-C: what was written is kept, and the message says how to resume.
EXIT_INTERRUPTED = 130


#: The installed commands' common prefix (``[project.scripts]``: ``psalign-toy``, ``psalign-embed``, ...).
COMMAND_PREFIX = "psalign-"


def program_name(module: str) -> str:
    """The name ``--help`` gives the program of ``module``: the installed command when that is
    what runs (``psalign-toy``), else the form ``python -m psalign.toy``."""
    command = Path(sys.argv[0] if sys.argv else "").name.removesuffix(".exe")
    return command if command.startswith(COMMAND_PREFIX) else f"python -m {module}"


def _shown(value: Any) -> str:
    """A default as ``--help`` shows it: lists comma-joined, ``%`` escaped for argparse."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("%", "%%")


def shown_default(value: Any) -> str:
    """`` (default: X)``, or nothing for a default that says nothing (``None``, ``False``, an
    empty list, a suppressed default)."""
    if value is None or value is False or value is argparse.SUPPRESS:
        return ""
    if isinstance(value, (list, tuple)) and not value:
        return ""
    return f" (default: {_shown(value)})"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks, and appends ``(default: X)`` to an option's help only
    when the default says something (:func:`shown_default`) and the help does not already state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings:
            return text
        return text + shown_default(action.default)


def field_default(config_class: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``config_class`` (the one place it is defined)."""
    for spec in dataclasses.fields(config_class):
        if spec.name == name:
            if spec.default is not dataclasses.MISSING:
                return spec.default
            if spec.default_factory is not dataclasses.MISSING:
                return spec.default_factory()
            raise ValueError(f"{config_class.__name__}.{name} has no default")
    raise KeyError(f"{config_class.__name__} has no field {name!r}")


def declared_default(owner: Callable[..., Any], name: str) -> Any:
    """The default of ``name``: a field of dataclass ``owner``, or a parameter of function or
    class ``owner`` (the one place it is defined)."""
    if dataclasses.is_dataclass(owner):
        return field_default(owner, name)
    default = inspect.signature(owner).parameters[name].default
    if default is inspect.Parameter.empty:
        raise ValueError(f"{owner.__qualname__}({name}) has no default")
    return default


def default_text(owner: Callable[..., Any], name: str) -> str:
    """`` (default: X)`` for an option whose default is declared by ``owner`` (:func:`declared_default`)."""
    return shown_default(declared_default(owner, name))


def given(args: argparse.Namespace, owner: Callable[..., Any]) -> dict[str, Any]:
    """The parsed options that ``owner`` takes: fields of a config dataclass, or parameters of a
    function or class (options left out stay at its defaults; parsers give such options
    ``default=argparse.SUPPRESS``)."""
    names = inspect.signature(owner).parameters
    return {key: value for key, value in vars(args).items() if key in names}


def run_program(
    body: Callable[[], int | None],
    interrupted: Callable[[], str] | str = "interrupted",
    refused: tuple[type[BaseException], ...] = (),
) -> int:
    """Run ``body`` and turn how it ends into an exit status: its own status (None: 0), 2 for an
    :class:`~psalign.io.InputError` or one of ``refused`` (printed as ``error: ...``), 130 for
    Ctrl-C (printing ``interrupted``, or what it returns)."""
    try:
        status = body()
    except (InputError, *refused) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK if status is None else status
