"""The project's error type: raised for bad user input, printed as one line without a traceback."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class AnimaError(Exception):
    """A problem with the user's input (file, flag, config) whose message says what to fix."""


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
