"""The project's error type: raised for bad user input, printed as one line without a traceback."""

from __future__ import annotations

_WORKER_MARK = "\nOriginal Traceback"
_NAME = "AnimaError: "


class AnimaError(Exception):
    """A problem with the user's input (file, flag, config) whose message says what to fix."""

    def __init__(self, message: object = "") -> None:
        super().__init__(_original_message(str(message)))


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
