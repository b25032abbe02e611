"""The project's error type: raised for bad user input, printed as one line without a traceback; the argument
parser whose errors are that type."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

_WORKER_MARK = "\nOriginal Traceback"
_NAME = "AnimaError: "


class AnimaError(Exception):
    """A problem with the user's input (file, flag, config) whose message says what to fix."""

    def __init__(self, message: object = "") -> None:
        super().__init__(_original_message(str(message)))


def check_choice(flag: str, value: object, choices: Sequence[object]) -> None:
    """AnimaError unless ``value`` is one of ``choices``: "--flag 'value' is not supported; use one of a, b"."""
    if value not in choices:
        raise AnimaError(f"{flag} {value!r} is not supported; use one of {', '.join(map(str, choices))}")


def _original_message(message: str) -> str:
    """An AnimaError raised in a DataLoader worker reaches the main process re-created from the worker's whole
    traceback text ("Caught AnimaError in DataLoader worker process 0.\\nOriginal Traceback ..."); keep only
    the original message so the user still sees one line."""
    if _WORKER_MARK not in message:
        return message
    for line in reversed(message.splitlines()):
        if _NAME in line:
            return line.split(_NAME, 1)[1]
    return message


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are an AnimaError (printed as one `error:` line by the CLI) instead of the
    usage block; each misspelt flag on the command line gets the closest real flag as a suggestion (also when
    another error, such as a missing required flag, is the one argparse reports)."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        self._tokens = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        raise AnimaError(f"{message}{self._suggestions()}; see {self.prog} --help")

    def _suggestions(self) -> str:
        known = [option for option in self._option_string_actions if option.startswith("--")]
        hints = []
        for token in getattr(self, "_tokens", []):
            name = token.split("=", 1)[0]
            if not name.startswith("--") or name in known or any(o.startswith(name) for o in known):
                continue  # a value, a known flag or an abbreviation argparse accepts
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"{name}: did you mean {close[0]}?")
        return f" ({'; '.join(hints)})" if hints else ""

@contextmanager
def flags_renamed(names: Mapping[str, str]) -> Iterator[None]:
    """Re-raise AnimaErrors with the trainer's flag names replaced by a tool's own (``--pretrained_model_name_or_path``
    -> ``--dit``), so a loader shared with the trainer names the flag the user actually typed."""
    try:
        yield
    except AnimaError as error:
        message = str(error)
        for trainer_flag, tool_flag in names.items():
            message = re.sub(rf"{re.escape(trainer_flag)}(?![\w-])", tool_flag, message)
        raise AnimaError(message) from None
