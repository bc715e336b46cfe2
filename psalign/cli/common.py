"""What every command line shares: the help layout, defaults read from the config dataclasses,
and the way a program ends (an exit status and one message, never a traceback for an expected
problem)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable

from psalign.io import InputError

EXIT_OK = 0
#: Refused inputs: the message names file:line (or --flag) and the reason.
EXIT_REFUSED = 2
#: Ctrl-C: what was written is kept, and the message says how to resume.
EXIT_INTERRUPTED = 130


def _shown(value: Any) -> str:
    """A default as ``--help`` shows it: lists comma-joined, ``%`` escaped for argparse."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("%", "%%")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks, and appends ``(default: X)`` to an option's help only
    when the default says something: not for ``None``, ``False``, an empty list or a suppressed
    default, and not when the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or not action.option_strings or default is argparse.SUPPRESS:
            return text
        if default is None or default is False or (isinstance(default, (list, tuple)) and not default):
            return text
        return f"{text} (default: {_shown(default)})"


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


def default_text(config_class: type, name: str) -> str:
    """`` (default: X)`` for an option whose default lives in ``config_class``."""
    return f" (default: {_shown(field_default(config_class, name))})"


def given(args: argparse.Namespace, config_class: type) -> dict[str, Any]:
    """The parsed options that are fields of ``config_class`` (options left out stay at the
    dataclass defaults; parsers give such options ``default=argparse.SUPPRESS``)."""
    names = {spec.name for spec in dataclasses.fields(config_class)}
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
