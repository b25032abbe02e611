"""Up-front checks of a run (before any model loads) and the `--dry_run` plan.

Everything here reads headers, flags, the image scan and the --resume folder; nothing is loaded or written."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import torch

from library.errors import AnimaError
from library.training import network_setup, outputs, schedule
from library.training import state as train_state
from library.training.reporting import logger
from library.training.schedulers import lr_scheduler_from_args


def report_resume_changes(args: argparse.Namespace, changes: list[train_state.SettingChange]) -> None:
    """One warning line per changed setting; those that break an exact continuation are refused unless
    --resume_allow_changes."""
    for change in changes:
        logger.warning("--resume: changed since the state: %s%s", change.describe(),
                       " (breaks the exact continuation)" if change.breaks_continuation else "")
    breaking = [c for c in changes if c.breaks_continuation]
    if breaking and not args.resume_allow_changes:
        names = ", ".join(c.describe() for c in breaking)
        raise AnimaError(f"--resume {args.resume}: {names}; these changes make an exact continuation impossible; "
                         "use the saved run's settings, or add --resume_allow_changes to continue anyway")


def check_resume_folder(args: argparse.Namespace, network: Any, optimizer: Any, scheduler: Any,
                        seed_given: bool) -> train_state.LoadedState:
    """--resume: every file of the folder read (weights_only) and checked against this run's network,
    optimizer and scheduler; the step count and every changed setting checked. Nothing is loaded yet."""
    folder = Path(args.resume)
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    loaded = train_state.validate_state_folder(folder, shapes)
    try:
        optimizer.load_state_dict(loaded.optimizer)  # group sizes and state keys are checked on meta tensors
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise AnimaError(f"--resume {folder}: optimizer.pt does not fit this run's optimizer ({exc}); use the "
                         "--optimizer_type, --optimizer_args and learning-rate flags of the saved run") from None
    try:
        scheduler.load_state_dict(loaded.scheduler)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AnimaError(f"--resume {folder}: scheduler.pt does not fit this run's --lr_scheduler ({exc}); use "
                         "the saved run's scheduler flags") from None
    saved = loaded.train_state
    if args.max_train_epochs is None and saved.global_step >= args.max_train_steps:
        raise AnimaError(f"--resume {folder}: the state is already at step {saved.global_step} of "
                         f"--max_train_steps {args.max_train_steps}; raise --max_train_steps to train further")
    if saved.settings is None:
        logger.warning("--resume %s: the state records no settings (written by an older version); changes "
                       "to the command line cannot be checked", folder)
        return loaded
    current = train_state.recorded_settings(args)
    changes = train_state.compare_settings(saved.settings, current)
    if seed_given and saved.seed is not None and saved.seed != args.seed:
        changes.append(train_state.SettingChange(train_state.SEED, saved.seed, args.seed, True))
    report_resume_changes(args, changes)
    return loaded


def run_facts(num_processes: int, sched: schedule.Schedule, train_group: Any, dataset_config: str | None
              ) -> dict[str, Any]:
    """What the data order depends on besides the flags (recorded in every state)."""
    return {train_state.NUM_PROCESSES: num_processes,
            train_state.BATCHES_PER_EPOCH: sched.batches_per_epoch,
            train_state.DATASET_FINGERPRINT: train_state.dataset_fingerprint(train_group, dataset_config)}


def check_resume_against_data(args: argparse.Namespace, loaded: train_state.LoadedState, facts: dict[str, Any],
                              sched: schedule.Schedule) -> None:
    """--resume after the image scan: the dataset, batches per epoch and number of processes against the state,
    and the steps left."""
    saved = loaded.train_state
    if saved.settings is not None:
        changes = [train_state.SettingChange(name, saved.facts.get(name), value, True)
                   for name, value in facts.items() if saved.facts.get(name) != value]
        report_resume_changes(args, changes)
    if schedule.steps_left(saved.position, sched) <= 0:
        raise AnimaError(f"--resume {args.resume}: nothing left to train (the state is at step "
                         f"{saved.global_step}, epoch {saved.position.epoch + 1} of {sched.num_epochs}, "
                         f"--max_train_steps {sched.max_train_steps}); raise --max_train_steps or "
                         "--max_train_epochs")


def check_cache_folders(args: argparse.Namespace, groups: list[Any]) -> None:
    """Disk caches are written beside the images: a folder that must receive a missing cache file has to be
    writable (checked now, not after the models loaded)."""
    from library.data.cache_files import latents_npz_path, text_npz_path

    for _, info in (pair for group in groups for pair in group.image_infos()):
        wanted = []
        if args.cache_latents_to_disk:
            wanted.append(latents_npz_path(info.path, info.image_size))
        if args.cache_text_encoder_outputs_to_disk:
            wanted.append(text_npz_path(info.path))
        for path in wanted:
            folder = Path(path).parent
            if not Path(path).exists() and not os.access(folder, os.W_OK | os.X_OK):
                raise AnimaError(f"cache folder {folder} is not writable, and the disk cache {Path(path).name} "
                                 "must be written there; make the image folder writable or drop "
                                 "--cache_latents_to_disk / --cache_text_encoder_outputs_to_disk")


class NetworkSize:
    """What the input check learnt about the network on weightless models (for the dry-run plan)."""

    def __init__(self, dit: torch.nn.Module, text_encoder_parameters: int, network_parameters: int = 0,
                 trainable_parameters: int = 0) -> None:
        self.dit = dit  # meta-device copy
        self.text_encoder_parameters = text_encoder_parameters
        self.network_parameters = network_parameters
        self.trainable_parameters = trainable_parameters
        self.optimizer: torch.optim.Optimizer | None = None  # built on the weightless LoRA parameters


def check_network(args: argparse.Namespace, dit: torch.nn.Module, text_encoders: list[torch.nn.Module],
                  component_lr_names: tuple[str, ...], seed_given: bool
                  ) -> tuple[NetworkSize, train_state.LoadedState | None]:
    """On weightless (meta-device) models: the network (--network_args, --network_weights, --base_weights), the
    optimizer and LR scheduler (a typo'd --optimizer_type or --lr_scheduler, or bad --optimizer_args, fail here
    and not after caching) and the --resume folder against them. Returns the sizes and the checked state."""
    size = NetworkSize(dit, sum(p.numel() for te in text_encoders for p in te.parameters()))
    logging.disable(logging.WARNING)  # the real build logs the same lines again
    try:
        network, _ = network_setup.network_from_args(args, dit, text_encoders, merge=False)
        try:
            setup = network_setup.optimizer_from_args(args, network, component_lr_names)
        except (RuntimeError, NotImplementedError) as exc:
            if "meta" not in str(exc):
                raise
            # An optimizer that reads its parameters' values when built: give it uninitialised CPU copies.
            network.to_empty(device="cpu")
            setup = network_setup.optimizer_from_args(args, network, component_lr_names)
        # The step count only shapes the schedule; with --max_train_epochs it is known after the image scan, where
        # `check_schedule_length` checks the warmup against it.
        scheduler = lr_scheduler_from_args(args, setup.optimizer, args.max_train_steps,
                                           check_length=args.max_train_epochs is None)
    finally:
        logging.disable(logging.NOTSET)
    network.remove_hooks()
    size.optimizer = setup.optimizer
    size.network_parameters = sum(p.numel() for p in network.parameters())
    size.trainable_parameters = sum(p.numel() for p in setup.trainable_params)
    loaded = check_resume_folder(args, network, setup.optimizer, scheduler, seed_given) if args.resume else None
    return size, loaded


def check_schedule_length(args: argparse.Namespace, size: NetworkSize, num_steps: int) -> None:
    """Once the image scan gives the run's step count: --lr_warmup_steps (and --lr_decay_steps) must fit in it
    (checked on the input check's weightless optimizer, before any model loads)."""
    if size.optimizer is None:
        return
    logging.disable(logging.WARNING)  # the real build logs the same lines again
    try:
        lr_scheduler_from_args(args, size.optimizer, num_steps)
    finally:
        logging.disable(logging.NOTSET)


def print_plan(args: argparse.Namespace, sched: schedule.Schedule, train_group: Any, val_group: Any,
               loaded: train_state.LoadedState | None, size: NetworkSize) -> None:
    """--dry_run: what the run would do, after every check passed."""
    from library.training.memory import estimate_training_memory

    groups = [g for g in (train_group, val_group) if g is not None]
    lines = ["dry run: every check passed; nothing was loaded or written"]
    for group, name in ((train_group, "training"), (val_group, "validation")):
        if group is None:
            continue
        for index, dataset in enumerate(group.datasets):
            buckets = ", ".join(f"{w}x{h}" for w, h in dataset.bucket_sizes)
            lines.append(f"  {name} dataset {index}: {len(dataset.infos)} images ({dataset.num_train_images} "
                         f"with repeats), batch size {dataset.config.batch_size}, {len(dataset)} batches, "
                         f"buckets {buckets}")
    lines.append(f"  schedule: {sched.batches_per_epoch} batches per epoch per process, {sched.steps_per_epoch} "
                 f"steps per epoch, {sched.num_epochs} epochs, {sched.max_train_steps} steps")
    if loaded is not None:
        position = loaded.train_state.position
        lines.append(f"  resume: from step {position.global_step} (epoch {position.epoch + 1}, "
                     f"{position.batches_done} batches done), {schedule.steps_left(position, sched)} steps left")
    images = sum(len(d.infos) for g in groups for d in g.datasets)
    cached = []
    if args.cache_latents:
        cached.append(f"latents of {images} images ({'disk' if args.cache_latents_to_disk else 'memory'})")
    if args.cache_text_encoder_outputs:
        cached.append(f"text-encoder outputs of {images} captions "
                      f"({'disk' if args.cache_text_encoder_outputs_to_disk else 'memory'})")
    lines.append("  cache: " + ("; ".join(cached) if cached else "nothing (encoded every step)"))
    if args.cache_only:
        lines.append("  --cache_only: the caches would be written, then the run would stop")
        print("\n".join(lines), flush=True)
        return
    lines.append(f"  network: {size.network_parameters:,} LoRA parameters, {size.trainable_parameters:,} trained")
    estimate = estimate_training_memory(args, size.dit, size.trainable_parameters, train_group,
                                        size.text_encoder_parameters)
    lines.append("  memory estimate: " + estimate.describe())
    lines.append(f"  outputs: {Path(args.output_dir) / outputs.last_model_name(args)}")
    print("\n".join(lines), flush=True)
