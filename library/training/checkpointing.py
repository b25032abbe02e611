"""Writing the LoRA files and the training-state folders of a run, pruning old ones, and loading a state back.

Every write is atomic (temp file or folder + rename); only the main process writes, the others wait.
`RunWriter` holds what a run's writes need and owns the rules of when a step or an epoch saves (with the names
and keep windows of `outputs`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from library.errors import AnimaError
from library.io import files
from library.training import outputs, schedule
from library.training import state as train_state
from library.training.reporting import TrainingReporter, logger
from library.training.schedule import Position
from library.training.state import capture_rng, restore_rng


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
                       record: train_state.TrainState, scaler: Any = None) -> None:
    """The state folder at `path`, written atomically; refuses non-finite weights. `scaler`: the fp16 loss
    scaler (accelerate's, on CUDA), or None."""
    weights = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    files.refuse_non_finite(weights, path)

    def write(tmp: Path) -> None:
        train_state.write_state_files(tmp, network=weights, optimizer=optimizer.state_dict(),
                                      scheduler=lr_scheduler.state_dict(), rng_states=rng_states,
                                      train_state=record, scaler=None if scaler is None else scaler.state_dict())
        files.fault_point(f"state_write:{record.position.global_step}")

    files.atomic_write_dir(path, write)


def load_state(loaded: train_state.LoadedState, *, network: Any, optimizer: Any, lr_scheduler: Any,
               device: torch.device, rank: int, seed: int, scaler: Any = None) -> None:
    """Put a validated state folder into the network, optimizer, scheduler, the fp16 loss `scaler` (where both
    the state and this run have one) and this process's random generators."""
    folder = loaded.folder
    result = network.load_state_dict({k: v.to(device) for k, v in loaded.network.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise AnimaError(f"--resume {folder}: the saved network does not match this one "
                         f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
                         "use the same --network_dim/--network_args as the saved run")
    optimizer.load_state_dict(loaded.optimizer)
    lr_scheduler.load_state_dict(loaded.scheduler)
    if scaler is not None and loaded.scaler is not None:
        scaler.load_state_dict(loaded.scaler)
    elif scaler is not None:
        logger.info("--resume %s holds no fp16 loss-scaler state (saved without one): the scale starts afresh",
                    folder)
    if rank < len(loaded.rng_states):
        restore_rng(loaded.rng_states[rank])
    else:  # more processes than the state had (accepted by --resume_allow_changes): seeded per rank
        logger.warning("--resume %s has no random state for process %d; seeding it from --seed", folder, rank)
        set_seed(seed + rank)



class RunWriter:
    """The LoRA files and state folders of one run in `--output_dir`, and the pruning of those that left their
    keep window. Writes see a schedule-free optimizer's averaged weights (`eval_mode`) and are left out of the
    step times."""

    def __init__(self, args: Any, accelerator: Accelerator, *, network: Any, optimizer: Any, lr_scheduler: Any,
                 reporter: TrainingReporter, eval_mode: Callable[[], AbstractContextManager[None]],
                 metadata: dict[str, str], model_spec: dict[str, str], save_dtype: torch.dtype | None, seed: int,
                 data_facts: dict[str, Any]) -> None:
        self.args, self.accelerator, self.network = args, accelerator, network
        self.optimizer, self.lr_scheduler, self.reporter, self.eval_mode = optimizer, lr_scheduler, reporter, eval_mode
        self.metadata, self.model_spec, self.save_dtype = metadata, model_spec, save_dtype
        self.seed, self.data_facts = seed, data_facts
        self.output_dir = Path(args.output_dir)

    def save_model(self, file_name: str, *, steps: int, epoch: int) -> Path:
        path = self.output_dir / file_name
        with self.eval_mode(), self.reporter.excluded("saving"):
            if self.accelerator.is_main_process:
                metadata = outputs.metadata_for_save(self.metadata, self.model_spec, steps=steps, epoch=epoch,
                                                    no_metadata=self.args.no_metadata)
                write_lora(self.network, path, metadata, self.save_dtype, self.args.lora_format)
                self.reporter.message(f"saved {path}")
            self.reporter.write_pictures(self.args.output_dir, self.args.output_name)
        self.accelerator.wait_for_everyone()
        return path

    def save_state(self, folder_name: str, *, position: Position, kind: str = train_state.PERIODIC,
                   rng: dict[str, Any] | None = None) -> Path:
        """The state folder at `position`: network weights, optimizer, scheduler, the random states of every
        process (`rng`: this process's, default the current ones), the position and the run's settings."""
        path = self.output_dir / folder_name
        with self.eval_mode(), self.reporter.excluded("saving"):
            gathered = gather_objects(self.accelerator, rng if rng is not None else capture_rng())
            if self.accelerator.is_main_process:
                record = train_state.TrainState(position=position, seed=self.seed, kind=kind, facts=self.data_facts,
                                                settings=train_state.recorded_settings(self.args))
                write_state_folder(path, network=self.network, optimizer=self.optimizer,
                                   lr_scheduler=self.lr_scheduler, rng_states=gathered, record=record,
                                   scaler=self.accelerator.scaler)
                self.reporter.message(f"saved state {path}")
            self.accelerator.wait_for_everyone()
        return path

    def prune(self, name_of: Callable[[Any, int], str], number: int | None) -> None:
        """Remove the checkpoint `name_of(args, number)` (None: nothing left its keep window)."""
        if self.accelerator.is_main_process and number is not None:
            path = self.output_dir / name_of(self.args, number)
            if path.exists():
                files.remove_path(path)
                self.reporter.message(f"removed old checkpoint {path}")
        self.accelerator.wait_for_everyone()

    def after_step(self, position: Position) -> None:
        """`--save_every_n_steps`: the LoRA (and with --save_state the state) of this step; old ones pruned."""
        args, step = self.args, position.global_step
        if schedule.step_save_due(step, args.save_every_n_steps):
            self._save_and_prune(step, outputs.step_model_name, outputs.step_state_name,
                                 lambda keep: outputs.step_to_prune(step, args.save_every_n_steps, keep),
                                 args.save_last_n_steps, args.save_last_n_steps_state,
                                 steps=step, epoch=position.epoch, position=position)

    def after_epoch(self, epoch: int, position: Position, run_schedule: schedule.Schedule) -> None:
        """`--save_every_n_epochs` (never for the final epoch, which the run's end saves) after 1-based `epoch`."""
        args, every_n_epochs = self.args, run_schedule.save_every_n_epochs
        if schedule.epoch_save_due(epoch, every_n_epochs, run_schedule.num_epochs):
            self._save_and_prune(epoch, outputs.epoch_model_name, outputs.epoch_state_name,
                                 lambda keep: outputs.epoch_to_prune(epoch, every_n_epochs, keep),
                                 args.save_last_n_epochs, args.save_last_n_epochs_state,
                                 steps=position.global_step, epoch=epoch, position=position)

    def _save_and_prune(self, number: int, model_name: Callable[[Any, int], str],
                        state_name: Callable[[Any, int], str], to_prune: Callable[[int | None], int | None],
                        keep: int | None, keep_states: int | None, *, steps: int, epoch: int,
                        position: Position) -> None:
        """The LoRA `model_name(args, number)` (and the state `state_name(...)`), then the ones that left their
        keep window (`keep`; states `keep_states`, default `keep`)."""
        self.save_model(model_name(self.args, number), steps=steps, epoch=epoch)
        self.prune(model_name, to_prune(keep))
        if self.args.save_state:
            self.save_state(state_name(self.args, number), position=position)
            self.prune(state_name, to_prune(keep_states or keep))
