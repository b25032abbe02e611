"""Ctrl-C during training: with `--save_state` the first Ctrl-C lets the current optimizer step finish, the trainer
saves a state of it and stops; a second Ctrl-C stops at once. Single process only (the processes could not agree
on the step), and only when nobody else has installed a SIGINT handler."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class CtrlC:
    """`requested` turns True at the first Ctrl-C inside `armed()`."""

    def __init__(self) -> None:
        self.requested = False

    @contextmanager
    def armed(self, enabled: bool) -> Iterator[CtrlC]:
        self.requested = False
        if not enabled or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("Ctrl-C: finishing this step and saving a state (Ctrl-C again stops at once)", flush=True)

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: keep the default behaviour
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
