"""One training run per output: an operating-system lock on `<output_dir>/.<output_name>.lock`.

The lock is `flock` (POSIX) or `msvcrt.locking` (Windows) on that file, so the operating system releases it when
the process ends in any way (exit, crash, SIGKILL): a killed run never blocks the next one, there is no stale
marker to delete by hand. The file holds who has the lock (pid, host, start time) so a second run can say which
process it collides with. A run that releases the lock removes the file again (and the output folder, if the
lock created it and nothing else was written there); a killed run's file is simply taken over by the next run.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from library.errors import AnimaError

if os.name == "nt":
    import msvcrt

    _WINDOWS_LOCK_OFFSET = 1 << 30  # lock a byte far past the owner text, so other processes can still read it

    def _try_lock(fd: int) -> bool:
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def lock_path(output_dir: str | os.PathLike, output_name: str) -> Path:
    return Path(output_dir) / f".{output_name}.lock"


def is_run_lock_file(name: str) -> bool:
    """Is this file name a run lock (`.<name>.lock`)?"""
    return name.startswith(".") and name.endswith(".lock")


class RunLock:
    """A held run lock. Reentrant within one process (runs started one after another in the same interpreter,
    as the tests do, share it); `release()` once per acquire frees it."""

    def __init__(self, lock_file: Path, fd: int, created_dir: Path | None) -> None:
        self.lock_file = lock_file
        self._fd = fd
        self._created_dir = created_dir
        self._count = 1

    def release(self) -> None:
        self._count -= 1
        if self._count > 0 or self._fd < 0:
            return
        _HELD.pop(str(self.lock_file), None)
        if os.name != "nt":  # unlinked while still held: a process that opened it meanwhile sees it is stale
            self.lock_file.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = -1
        if self._created_dir is not None:
            try:
                self._created_dir.rmdir()  # only if the run wrote nothing there
            except OSError:
                pass


_HELD: dict[str, RunLock] = {}


def describe_owner(text: str) -> str:
    """`pid 123 on host, started 2026-01-01 12:00:00` from the lock file's text, or a plain phrase."""
    try:
        owner = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["started"])))
        return f"pid {int(owner['pid'])} on {owner['host']}, started {started}"
    except (ValueError, KeyError, TypeError):
        return "another process (its details are not readable yet)"


def acquire_run_lock(output_dir: str | os.PathLike, output_name: str) -> RunLock:
    """Take the lock of (output_dir, output_name), or raise AnimaError at once if a running process holds it."""
    lock_file = lock_path(output_dir, output_name).absolute()
    held = _HELD.get(str(lock_file))
    if held is not None:
        held._count += 1
        return held
    folder = lock_file.parent
    created_dir = None if folder.exists() else folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(lock_file)
    except OSError as exc:
        raise AnimaError(f"--output_dir {output_dir}: cannot create the run lock {lock_file} ({exc.strerror}); "
                         "choose a folder you can write to") from exc
    if fd is None:
        raise AnimaError(f"--output_dir {output_dir} --output_name {output_name}: another run is writing these "
                         f"files ({describe_owner(_read_text(lock_file))}); wait for it to finish, stop it, or "
                         "choose another --output_name / --output_dir")
    owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    try:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, owner.encode("utf-8"))
    except OSError:
        pass  # (a full disk) only the message of a colliding run needs the owner; the lock itself holds
    lock = RunLock(lock_file, fd, created_dir)
    _HELD[str(lock_file)] = lock
    return lock


def _open_locked(lock_file: Path) -> int | None:
    """A locked descriptor of `lock_file`, or None if another process holds the lock."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            os.close(fd)
            return None
        if os.name == "nt" or _same_file(fd, lock_file):
            return fd
        os.close(fd)  # the holder released and removed this file between our open and lock: open it anew


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
