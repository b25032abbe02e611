"""npz cache files: atomic writes, reading with a clear reason for damaged files, merging keys into a file."""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from library.io.files import atomic_write

logger = logging.getLogger(__name__)

# What reading a damaged npz raises: a bad zip directory or CRC (BadZipFile), a bad .npy header or a short
# array (ValueError, EOFError, OSError), a damaged compressed member (zlib.error), a missing key (KeyError).
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)


def save_npz_atomic(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write an npz atomically (`atomic_write`), so a crash never leaves a partial cache."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle, so numpy adds no .npz suffix
            np.savez(handle, **arrays)

    atomic_write(Path(path), write)


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an npz; raises ValueError with the reason for a truncated or foreign file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except NPZ_READ_ERRORS as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc


def merge_into_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Add/replace keys in an npz, keeping its other entries (other resolutions); an unreadable file is replaced."""
    existing: dict[str, np.ndarray] = {}
    if os.path.exists(path):
        try:
            existing = read_npz(path)
        except ValueError as exc:
            logger.info("replacing unreadable cache file %s (%s)", path, exc)
    existing.update(arrays)
    save_npz_atomic(path, existing)
