"""Writing the LoRA files and the training-state folders of a run, pruning old ones, and loading a state back.

Every write is atomic (temp file or folder + rename); only the main process writes, the others wait."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from library.errors import AnimaError
from library.io import files
from library.training import state as train_state
from library.training.reporting import logger
from library.training.state import restore_rng


def write_lora(network: Any, path: Path, metadata: dict[str, str], save_dtype: torch.dtype | None,
               lora_format: str) -> None:
    """The LoRA file (metadata only in safetensors files); save_weights writes atomically."""
    is_safetensors = path.suffix == ".safetensors"
    network.save_weights(str(path), save_dtype, metadata if is_safetensors else None, lora_format=lora_format)


def gather_objects(accelerator: Accelerator, obj: Any) -> list[Any]:
    """`obj` of every process, in rank order."""
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def write_state_folder(path: Path, *, network: Any, optimizer: Any, lr_scheduler: Any, rng_states: list[Any],
                       record: train_state.TrainState) -> None:
    """The state folder at `path`, written atomically; refuses non-finite weights."""
    weights = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    files.refuse_non_finite(weights, path)

    def write(tmp: Path) -> None:
        train_state.write_state_files(tmp, network=weights, optimizer=optimizer.state_dict(),
                                      scheduler=lr_scheduler.state_dict(), rng_states=rng_states,
                                      train_state=record)
        files.fault_point(f"state_write:{record.position.global_step}")

    files.atomic_write_dir(path, write)


def load_state(loaded: train_state.LoadedState, *, network: Any, optimizer: Any, lr_scheduler: Any,
               device: torch.device, rank: int, seed: int) -> None:
    """Put a validated state folder into the network, optimizer, scheduler and this process's random generators."""
    folder = loaded.folder
    result = network.load_state_dict({k: v.to(device) for k, v in loaded.network.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise AnimaError(f"--resume {folder}: the saved network does not match this one "
                         f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
                         "use the same --network_dim/--network_args as the saved run")
    optimizer.load_state_dict(loaded.optimizer)
    lr_scheduler.load_state_dict(loaded.scheduler)
    if rank < len(loaded.rng_states):
        restore_rng(loaded.rng_states[rank])
    else:  # more processes than the state had (accepted by --resume_allow_changes): seeded per rank
        logger.warning("--resume %s has no random state for process %d; seeding it from --seed", folder, rank)
        set_seed(seed + rank)

