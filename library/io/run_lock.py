"""One training run per output: an OS-level lock on `<output_dir>/.<output_name>.lock`.

The operating system releases the lock when the process ends in any way (exit, crash, SIGKILL), so a killed
run never blocks the next one; there is no stale marker to delete. The lock file itself holds nothing; who
holds the lock (pid, host, start time) is written beside it, in `.<output_name>.lock.owner`, so a second run
can say which process it collides with.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import filelock

from library.errors import AnimaError


def lock_path(output_dir: str | os.PathLike, output_name: str) -> Path:
    return Path(output_dir) / f".{output_name}.lock"


def is_run_lock_file(name: str) -> bool:
    """Is this file name one of the run lock's two files (`.<name>.lock`, `.<name>.lock.owner`)?"""
    return name.startswith(".") and (name.endswith(".lock") or name.endswith(".lock.owner"))


def _owner_path(lock_file: Path) -> Path:
    return lock_file.with_name(lock_file.name + ".owner")


def describe_owner(lock_file: Path) -> str:
    """`pid 123 on host, started 2026-01-01 12:00:00` from the owner file, or a plain phrase if unreadable."""
    try:
        owner = json.loads(_owner_path(lock_file).read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["started"])))
        return f"pid {int(owner['pid'])} on {owner['host']}, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are not readable yet)"


class RunLock:
    """The held lock of one output; `release()` (or process exit, however it ends) frees it."""

    def __init__(self, lock: filelock.BaseFileLock, lock_file: Path) -> None:
        self._lock = lock
        self.lock_file = lock_file

    def release(self) -> None:
        if self._lock.is_locked and self._lock.lock_counter == 1:
            _owner_path(self.lock_file).unlink(missing_ok=True)
        self._lock.release()


def acquire_run_lock(output_dir: str | os.PathLike, output_name: str) -> RunLock:
    """Take the lock of (output_dir, output_name) or raise AnimaError at once if a running process holds it.

    Within one process the lock is reentrant (runs started one after another in the same interpreter, as the
    tests do, share it); between processes it is exclusive.
    """
    lock_file = lock_path(output_dir, output_name)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(lock_file), timeout=0, is_singleton=True)
        lock.acquire()
    except filelock.Timeout:
        raise AnimaError(f"--output_dir {output_dir} --output_name {output_name}: another run is writing these "
                         f"files ({describe_owner(lock_file)}); wait for it to finish, stop it, or choose another "
                         "--output_name / --output_dir") from None
    except OSError as exc:
        raise AnimaError(f"--output_dir {output_dir}: cannot create the run lock {lock_file} ({exc.strerror}); "
                         "choose a folder you can write to") from exc
    if lock.lock_counter == 1:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        try:
            _owner_path(lock_file).write_text(json.dumps(owner), encoding="utf-8")
        except OSError:
            pass  # only the message of a colliding run needs it; the lock itself holds
    return RunLock(lock, lock_file)
