"""The state folder written by --save_state and read by --resume: counters, network and optimizer files."""

from __future__ import annotations

import json
from pathlib import Path

from library.errors import AnimaError

TRAIN_STATE_FILE = "train_state.json"
NETWORK_STATE_FILE = "network.safetensors"


# --- training state -----------------------------------------------------------------------------------------


def write_train_state(folder: Path, *, epoch: int, global_step: int, epoch_step: int) -> None:
    """Counters needed to continue: finished epochs, optimizer steps done, batches done in the current epoch."""
    state = {"current_epoch": epoch, "global_step": global_step, "epoch_step": epoch_step}
    (Path(folder) / TRAIN_STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def read_train_state(folder: Path) -> dict[str, int]:
    path = Path(folder) / TRAIN_STATE_FILE
    if not path.is_file():
        raise AnimaError(f"--resume {folder}: {TRAIN_STATE_FILE} not found; give a folder written by --save_state")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return {"current_epoch": int(state["current_epoch"]), "global_step": int(state["global_step"]),
                "epoch_step": int(state.get("epoch_step", 0))}
    except (ValueError, KeyError, TypeError) as exc:
        raise AnimaError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({exc}); use another state folder") \
            from exc
