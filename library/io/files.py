"""Writing files safely and hashing them: atomic writes of files and folders, writability checks, hashes.

Every write goes to a temporary name in the destination folder and is then moved into place with
`os.replace`, so an interrupted run never leaves a half-written file or folder under the final name.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from io import BytesIO
from pathlib import Path

import safetensors.torch
import torch

from library.errors import AnimaError

logger = logging.getLogger(__name__)


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- finite values ---


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN or infinity. One min/max pass (NaN and +-inf reach the minimum or
    the maximum): on a CPU 20-40x faster than ``isfinite().all()``, which writes a bool tensor the input's size."""
    if tensor.numel() == 0:
        return True
    try:
        extremes = torch.stack(torch.aminmax(tensor))
    except (RuntimeError, NotImplementedError):  # dtypes without min/max kernels (float8)
        return bool(torch.isfinite(tensor.float()).all())
    return bool(torch.isfinite(extremes).all())


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN or infinity (None when all are finite)."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not all_finite(v)), None)


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """No LoRA file or state with a NaN or infinite value is ever written: one error line instead."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise AnimaError(f"refusing to write {path}: LoRA tensor {bad} is NaN or infinite (the training diverged, or "
                         "--save_precision fp16 overflows); the files saved earlier are intact; lower --learning_rate "
                         "or resume from an earlier state")


# --- fault injection (tests) ---

FAULT_ENV = "ANIMA_TEST_KILL_AT"


def fault_point(name: str) -> None:
    """Test hook for the kill-and-resume tests: when the environment variable ANIMA_TEST_KILL_AT equals `name`
    (e.g. "state_write:6", inside the atomic write of a state folder), the process kills itself with SIGKILL,
    exactly as a crash or the OOM killer would. Costs one dictionary lookup otherwise."""
    if os.environ.get(FAULT_ENV) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# --- atomic writes ------------------------------------------------------------------------------------------


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Fail now, not at the first save: `path` must be a folder, or creatable in a writable one. Creates nothing."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AnimaError(f"{flag} {path}: {existing} is a file, not a folder; choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AnimaError(f"{flag} {path}: {existing} is not writable; choose a folder you can write to")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` with a temporary path next to `path` (same suffix), then move it into place.

    A failed write (disk full, permission, I/O error) raises AnimaError naming `path`; the temporary file is
    removed and the file already under `path`, like every file written before, stays as it was.
    """
    path = Path(path)
    tmp = temporary_name(path)
    created = _first_missing(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        # Some writers (safetensors) create files as 0600; give the file the user's normal permissions so
        # another account (e.g. a ComfyUI service) can read it.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except Exception as exc:
        if tmp.exists():
            tmp.unlink()
        _remove_created_folders(path.parent, created)
        if is_write_failure(exc):
            raise write_error(path, exc) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _first_missing(folder: Path) -> Path | None:
    """The outermost folder of `folder`'s chain that does not exist yet (what a mkdir(parents=True) creates)."""
    missing = None
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        missing, folder = folder, folder.parent
    return missing


def _remove_created_folders(folder: Path, created: Path | None) -> None:
    """After a failed write, remove the (empty) folders it created, from `folder` up to `created`."""
    if created is None:
        return
    folder = folder.absolute()
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created or folder == folder.parent:
            return
        folder = folder.parent


def temporary_name(path: Path) -> Path:
    """`.<stem>.tmp<pid><suffix>`: where atomic_write writes `path` first (see LEFTOVER_PATTERN)."""
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def is_write_failure(exc: BaseException) -> bool:
    """Is `exc` a failed disk write? torch.save and safetensors do not raise OSError for a full disk: torch's
    zip writer raises RuntimeError ("PytorchStreamWriter failed ..." / "unexpected pos"), safetensors raises
    SafetensorError ("I/O error: ...")."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        return "I/O error" in text
    return isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)


def write_error(path: Path, exc: BaseException) -> AnimaError:
    """The one-line error of a failed write: the file, the reason, that earlier files are intact, the fix."""
    number = getattr(exc, "errno", None)
    if number is None and ("No space left" in str(exc) or _nearly_full(path.parent)):
        number = errno.ENOSPC  # torch's zip writer does not say why a write failed: look at the disk
    if number in (errno.ENOSPC, errno.EDQUOT):
        reason, advice = "the disk is full", "free some space (or choose another folder) and run again"
    elif number in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason, advice = "permission denied", "make the folder writable or choose another one"
    else:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = getattr(exc, "strerror", None) or first_line
        advice = "check the disk and run again"
    return AnimaError(f"cannot write {path}: {reason}; nothing was replaced and the files written before are "
                      f"intact; {advice}")


def _nearly_full(folder: Path) -> bool:
    """Less than 1 MiB free where `folder` lives (measured while the failed temporary file still exists)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_dir(path: Path, write: Callable[[Path], None], *,
                     _between_renames: Callable[[], None] | None = None) -> Path:
    """Fill a temporary folder with `write(tmp_dir)`, then swap it in place of `path`.

    The swap is two renames (`path` -> `.<name>.old<pid>`, then tmp -> `path`). If the process dies between
    them, the previous folder survives only under the hidden name; `restore_interrupted_dir` (called here
    and by `remove_leftovers` at every start) moves it back. `_between_renames` is a fault-injection hook for
    tests. A failed write raises AnimaError naming `path` (see atomic_write); the previous folder is kept.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    created = _first_missing(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        restore_interrupted_dir(path)
        remove_path(tmp)
        tmp.mkdir()
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            try:
                if _between_renames is not None:
                    _between_renames()
                os.replace(tmp, path)
            except OSError:
                os.replace(old, path)  # put the previous folder back before reporting
                raise
            remove_path(old)
        else:
            os.replace(tmp, path)
    except Exception as exc:
        remove_path(tmp)
        _remove_created_folders(path.parent, created)
        if is_write_failure(exc):
            raise write_error(path, exc) from exc
        raise
    finally:
        remove_path(tmp)
    return path


# --- leftovers of killed runs -------------------------------------------------------------------------------

# `.<name>.tmp<pid>[<suffix>]` (atomic_write, atomic_write_dir) and `.<name>.old<pid>` (atomic_write_dir).
LEFTOVER_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)(?P<suffix>\.[^.]+)?$")


def process_is_alive(pid: int) -> bool:
    """Is a process with this id running on this machine? Our own id counts as alive."""
    if pid == os.getpid():
        return True
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def restore_interrupted_dir(path: Path) -> Path | None:
    """If `path` is missing but a dead process left it as `.<name>.old<pid>` (killed between the two renames
    of atomic_write_dir), rename it back. Returns the folder it restored from, or None."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return None
    prefix = f".{path.name}.old"
    for candidate in sorted(path.parent.glob(f"{glob.escape(prefix)}*")):
        pid = candidate.name[len(prefix):]
        if pid.isdigit() and not process_is_alive(int(pid)) and candidate.is_dir():
            os.replace(candidate, path)
            logger.info("restored %s from %s (a run was stopped while replacing it)", path, candidate.name)
            return candidate
    return None


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed runs left in `folder` (our naming pattern, a process
    id that is no longer running); first restore any folder a kill left only under its `.old` name.
    Returns what was removed; logs one line when anything was."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    leftovers = []
    for entry in sorted(folder.iterdir()):
        match = LEFTOVER_PATTERN.match(entry.name)
        if match and not process_is_alive(int(match["pid"])):
            leftovers.append((entry, match))
    for _, match in leftovers:
        if match["kind"] == "old" and match["suffix"] is None:
            restore_interrupted_dir(folder / match["name"])
    removed = []
    for entry, _ in leftovers:
        if entry.exists() or entry.is_symlink():
            try:
                remove_path(entry)
            except OSError as exc:
                logger.warning("could not remove the leftover %s of a stopped run: %s", entry, exc)
                continue
            removed.append(entry)
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else "")
        logger.info("removed %d temporary file(s) left by stopped runs in %s: %s", len(removed), folder, names)
    return removed


# --- hashes -------------------------------------------------------------------------------------------------


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a LoRA: computed on a serialisation holding only ss_* metadata.

    model hash = SHA-256 of the tensor-data section; legacy hash = first 8 hex digits of the SHA-256 of the
    64 KiB at offset 1 MiB of that serialisation (what image UIs show).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(path: str) -> tuple[str, str]:
    """(old 8-hex hash of 64 KiB at 1 MiB, full-file SHA-256) of a model file, as written into ss_* metadata."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return legacy, file_sha256(path)
