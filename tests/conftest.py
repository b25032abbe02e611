"""Shared test fixtures.

Reference material (golden tensors, real tokenizer files) lives in ``../shared`` beside the clone, or
wherever ``ANIMA_SHARED_DIR`` points. Tests that need it skip with a visible reason when it is absent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

# Tiny ops are dominated by thread start-up and contention on small CI machines.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("ANIMA_SHARED_DIR", REPO_ROOT.parent / "shared"))


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        pytest.skip(f"{what} not found at {path} (set ANIMA_SHARED_DIR to the shared reference folder)")
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return _require_dir(SHARED_DIR / "golden", "golden reference tensors")


@pytest.fixture(scope="session")
def tokenizers_dir() -> Path:
    return _require_dir(SHARED_DIR / "tokenizers", "real tokenizer files")


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory):
    """Tiny random Anima checkpoints, tokenizers, images, dataset TOML and prompts, shared by the session."""
    from library.models.tiny import write_tiny_anima_setup

    return write_tiny_anima_setup(tmp_path_factory.mktemp("tiny_setup"))


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a run with another --mixed_precision needs it reset (and after)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def restore_logging():
    """The trainer's main() points its console logging (its own logger and the package loggers) at the stderr
    of the test that runs it, which pytest closes afterwards; later messages would then print "--- Logging error
    ---". Every test gets those loggers' handlers, levels and propagation back as they were."""
    from library.training.reporting import PACKAGE_LOGGERS, logger

    loggers = [logging.getLogger(name) for name in (logger.name, *PACKAGE_LOGGERS)]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()  # a --console_log_file handler releases its file
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
