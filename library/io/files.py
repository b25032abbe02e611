"""Writing files safely and hashing them: atomic writes of files and folders, writability checks, hashes.

Every write goes to a temporary name in the destination folder and is then moved into place with
`os.replace`, so an interrupted run never leaves a half-written file or folder under the final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from io import BytesIO
from pathlib import Path

import safetensors.torch
import torch

from library.errors import AnimaError


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- finite values ---


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first floating tensor holding NaN or infinity (None when all are finite)."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


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
    """Call `write(tmp)` with a temporary path next to `path` (same suffix), then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        # Some writers (safetensors) create files as 0600; give the file the user's normal permissions so
        # another account (e.g. a ComfyUI service) can read it.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary folder with `write(tmp_dir)`, then swap it in place of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    remove_path(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    finally:
        remove_path(tmp)
    return path


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
