"""Generic LoRA training: `NetworkTrainer.train()` runs a fixed sequence of phases; a model plugs in via hooks.

Phases: seed -> input checks -> accelerator -> datasets -> frozen models and caches -> DiT -> network ->
optimizer -> data loaders and schedule -> prepare -> resume -> metadata -> loop -> final save. Each phase returns
what it builds and `train()` assigns it, so `train()` shows where every piece of the run's state comes from.
Model specifics (which files load, how text and images are encoded, the model call, sampling, extra metadata)
live in a subclass that overrides the hooks at the top of the class; `AnimaNetworkTrainer` is that subclass.
The parts live in `library/training`: network and optimizer building (`network_setup`), the input checks and the
dry-run plan (`preflight`), the schedule, the writes of LoRA files and states (`checkpointing`), the non-finite
guard, reporting.

Multi-process (accelerate DDP): every process trains on its shard of the batches; the network is wrapped in
accelerate's DistributedDataParallel through `distributed.TrainingModule` (its forward runs the training loss,
so DDP sees the LoRA layers run), which averages the gradients in buckets overlapped with the backward, so all
processes hold the same weights. Only the main process writes caches, LoRA files, states, samples and logs;
the others wait.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from library.data.metadata import group_metadata
from library.errors import AnimaError
from library.io import files
from library.models.precision import FLOAT16_OVERFLOW_ADVICE
from library.training import checkpointing, flow_matching, outputs, preflight, schedule
from library.training import state as train_state
from library.training.args import MIXED_PRECISION_DTYPES, SAVE_PRECISION_DTYPES
from library.training.distributed import (
    TrainingModule,
    allow_module_dropout,
    lone_cpu_launch_warning,
    process_group_kwargs,
)
from library.training.interrupt import CtrlC
from library.training.losses import ModelOutput, huber_threshold, per_sample_loss
from library.training.network_setup import network_from_args, optimizer_from_args, trains_text_encoder
from library.training.nonfinite import NonFiniteGuard
from library.training.optimizers import ScheduleFreeModes, allow_fp16_gradient_unscaling, install_fused_backward_pass
from library.training.reporting import (
    TrainingReporter,
    init_trackers,
    logger,
    lr_logs,
    prepare_tracker_environment,
    read_scalars,
    run_logging_dir,
)
from library.training.schedule import Position
from library.training.schedulers import is_relative_step_adafactor, lr_scheduler_from_args, resolve_lr_scheduler_name
from library.training.state import capture_rng, restore_rng


class NetworkTrainer:
    """Template of a LoRA training run. Subclasses implement the hooks marked "model hook"."""

    # ---------------------------------------------------------------------------------------------------------
    # Model hooks

    # The component learning-rate groups: `--<name>_lr` for each name (read by network_setup.optimizer_from_args).
    component_lr_names: tuple[str, ...] = ()

    def inspect_models(self, args: argparse.Namespace) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        """Model hook: check the model flags and every model file from its header (nothing is read) and return
        weightless (meta-device) copies of the denoiser and the text encoders, to check the network against."""
        raise NotImplementedError

    def write_caches_only(self, args: argparse.Namespace) -> None:
        """Model hook (`--cache_only`): write the disk caches of every dataset."""
        raise NotImplementedError

    def load_frozen_models(self, args: argparse.Namespace, groups: list[Any]) -> list[torch.nn.Module]:
        """Model hook: load the text encoder(s) and the VAE (kept frozen), encode the images and captions of
        `groups` once where --cache_latents / --cache_text_encoder_outputs ask, and return the text encoders
        the network may attach to."""
        raise NotImplementedError

    def load_dit(self, args: argparse.Namespace) -> torch.nn.Module:
        """Model hook: load the denoiser the LoRA attaches to."""
        raise NotImplementedError

    def place_dit(self, args: argparse.Namespace) -> None:
        """Model hook: move the frozen denoiser to the device (block swap keeps part of it in CPU memory) and
        turn on its gradient checkpointing."""
        self.dit.to(self.device)

    def reset_dit_layout(self) -> None:
        """Model hook: after a forward without backward (validation), restore the layout training expects."""

    def model_output(self, args: argparse.Namespace, batch: dict, train_text_encoder: bool) -> ModelOutput:
        """Model hook: a batch's latents and text conditioning (cached or encoded live; the text with gradients
        when `train_text_encoder`) -> the prediction, its target, the sigmas [B] and the loss weighting [B]."""
        raise NotImplementedError

    def sample_images(self, args: argparse.Namespace, epoch: int | None, step: int) -> list[tuple[Path, str]]:
        """Model hook: render `--sample_prompts` (main process only); returns (image file, prompt) pairs."""
        return []

    def update_metadata(self, metadata: dict[str, str], args: argparse.Namespace) -> None:
        """Model hook: add model-specific ss_* keys."""

    # ---------------------------------------------------------------------------------------------------------
    # The run

    def train(self, args: argparse.Namespace) -> Path | None:
        """Run every phase; returns the final LoRA file (None for `--cache_only` and `--dry_run`)."""
        self.args = args
        self.session_id, self.training_started_at = random.randint(0, 2**32), time.time()
        self.seed = self.run_seed(args)
        self.weight_dtype = MIXED_PRECISION_DTYPES[args.mixed_precision]
        self.save_dtype = SAVE_PRECISION_DTYPES[args.save_precision]
        self.network_size, self.loaded_state = self.check_inputs(args)
        # One run per output: a second run on the same --output_dir/--output_name stops here, before any work.
        self.output_lock = None if args.dry_run or args.cache_only else outputs.claim_output(args)
        self.accelerator = self.setup_accelerator(args)
        if args.cache_only and not args.dry_run:
            self.cache_only(args)
            return None
        self.train_group, self.val_group = self.build_datasets(args)
        self.schedule, self.data_facts = self.check_against_datasets(args)
        if args.dry_run:
            preflight.print_plan(args, self.schedule, self.train_group, self.val_group, self.loaded_state,
                                 self.network_size)
            return None
        self.text_encoders = self.load_frozen_models(args, self.groups())
        if args.cache_text_encoder_outputs:
            # Outputs cached, the encoder not trained: its weights go before the DiT loads (a full-size Qwen3 is
            # 2.2 GiB in float32). The weightless structure stays, so the network builds (and drops) its
            # text-encoder modules as before, drawing the same initial LoRA weights.
            self.text_encoders = [te.to(torch.device("meta")) for te in self.text_encoders]
        self.accelerator.wait_for_everyone()
        self.dit = self.load_dit(args)
        self.network, self.network_args, self.train_te = self.create_network(args)
        if args.cache_text_encoder_outputs:  # outputs cached, the encoder not trained: free it
            self.text_encoders = []
        self.opt = optimizer_from_args(args, self.network, self.component_lr_names)
        self.fused_backward = (install_fused_backward_pass(self.opt.optimizer, args.max_grad_norm,
                                                           args.gradient_accumulation_steps,
                                                           self.accelerator.num_processes)
                               if args.fused_backward_pass else None)
        self.train_loader, self.val_loader, self.schedule = self.build_loaders(args)
        # Stepped once per optimizer step on every process, so its length is the run's step count.
        self.lr_scheduler = lr_scheduler_from_args(args, self.opt.optimizer, self.schedule.max_train_steps)
        self.training_model, self.optimizer, self.train_loader, self.val_loader = self.prepare(args)
        self.modes = ScheduleFreeModes(self.optimizer)
        self.position = self.resume(args)
        self.metadata, self.model_spec = self.build_metadata(args)
        self.reporter, self.writer = self.start_outputs(args)
        self.train_loop(args)
        return self.save_final(args)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def model_autocast(self) -> contextlib.AbstractContextManager:
        """The autocast of a step's model calls: accelerate's, and torch's own for fp16 where accelerate has none
        (the CPU), so that an fp16 run computes as on a GPU (the DiT's float32 residual stream needs autocast)."""
        if self.weight_dtype == torch.float16 and not self.accelerator.native_amp:
            return torch.autocast(self.device.type, dtype=torch.float16)
        return self.accelerator.autocast()

    def groups(self) -> list[Any]:
        return [g for g in (self.train_group, self.val_group) if g is not None]

    # --- phases -----------------------------------------------------------------------------------------------

    def run_seed(self, args: argparse.Namespace) -> int:
        """--seed; without it a resumed run takes the seed its state recorded (the data order, the validation
        split and the noise depend on it), and a new run draws one."""
        if args.seed is not None:
            return args.seed
        saved = train_state.read_train_state(Path(args.resume)).seed if args.resume else None
        if saved is not None:
            logger.info("--seed not given: using the seed %d recorded in %s", saved, args.resume)
            return saved
        return random.randint(0, 2**32 - 1)

    def check_inputs(self, args: argparse.Namespace) -> tuple[preflight.NetworkSize, Any]:
        """Fail in seconds, before images are scanned, models loaded or caches written: the output folders, the
        model flags and files (headers only), and the network, optimizer and --resume folder on weightless
        copies of the models. Returns the network's sizes and the checked state (None without --resume)."""
        if not args.cache_only:
            files.check_writable_dir(args.output_dir, "--output_dir")
        if args.logging_dir and args.log_with:
            files.check_writable_dir(args.logging_dir, "--logging_dir")
        dit, text_encoders = self.inspect_models(args)
        if args.cache_only:
            return preflight.NetworkSize(dit, 0), None
        return preflight.check_network(args, dit, text_encoders, self.component_lr_names,
                                       seed_given=args.seed is not None)

    def setup_accelerator(self, args: argparse.Namespace) -> Accelerator:
        """Accelerator (grad accumulation, mixed precision, DDP); seeds every generator."""
        run_dir = run_logging_dir(args.logging_dir, args.log_prefix) if args.log_with else None
        prepare_tracker_environment(args, run_dir)
        accelerator = Accelerator(
            # Without an accelerator device, say so: accelerate then runs multi-process launches on CPU (gloo).
            cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(),
            log_with=args.log_with,  # the trackers start in train_loop (init_trackers)
            project_dir=run_dir,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            # The per-epoch shuffle depends only on (seed, epoch), so a resumed run sees the same order.
            # non_blocking: accelerate moves every batch to the device; from the loader's pinned memory (CUDA)
            # the copies then queue behind the step's work, where a blocking copy would wait for the GPU to
            # drain (a host sync per batch tensor). No effect on the CPU.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
            kwargs_handlers=process_group_kwargs(args),
        )
        set_seed(self.seed)
        if args.full_fp16 and accelerator.scaler is not None:
            allow_fp16_gradient_unscaling(accelerator.scaler)
        lone_cpu_launch = lone_cpu_launch_warning()
        if lone_cpu_launch and accelerator.num_processes == 1:
            logger.warning("%s", lone_cpu_launch)
        if args.cuda_allow_tf32:
            # TF32 tensor cores for float32 matmuls and convolutions (about 10 mantissa bits instead of 23).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return accelerator

    def cache_only(self, args: argparse.Namespace) -> None:
        """`--cache_only`: write the disk caches and stop. The main process writes first; the others then find
        the files and only check them."""
        with self.accelerator.main_process_first():
            self.write_caches_only(args)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def build_datasets(self, args: argparse.Namespace) -> tuple[Any, Any]:
        """Dataset groups from `--dataset_config` / folders (caching options checked against every subset)."""
        from library.data.config import build_dataset_groups

        train_group, val_group = build_dataset_groups(args, seed=self.seed)
        if train_group is None or len(train_group) == 0:
            source = args.dataset_config or getattr(args, "train_data_dir", None)
            raise AnimaError(f"no training images found in {source}; check image_dir / file extensions")
        return train_group, val_group

    def check_against_datasets(self, args: argparse.Namespace) -> tuple[schedule.Schedule, dict[str, Any]]:
        """After the image scan, before any model loads: the schedule, the disk-cache folders, the LR warmup against
        the run's length (with --max_train_epochs; otherwise the input check did it), and for --resume the
        dataset, batches per epoch and number of processes against the state, and the steps left. Returns the
        schedule and the data facts every state records."""
        num_processes = self.accelerator.num_processes
        run_schedule = schedule.schedule_from_args(args, len(self.train_group), num_processes)
        # Taken from the image scan (before caching may drop undecodable images), so that every run of the same
        # data records and compares the same facts.
        facts = preflight.run_facts(num_processes, run_schedule, self.train_group, args.dataset_config)
        preflight.check_cache_folders(args, self.groups())
        if args.max_train_epochs is not None:  # the step count was not known to the input check
            preflight.check_schedule_length(args, self.network_size, run_schedule.max_train_steps)
        if self.loaded_state is not None:
            preflight.check_resume_against_data(args, self.loaded_state, facts, run_schedule)
        return run_schedule, facts

    def release_output(self) -> None:
        """Free the run lock taken after the input checks (process exit frees it too)."""
        lock = getattr(self, "output_lock", None)
        if lock is not None:
            lock.release()
            self.output_lock = None

    def create_network(self, args: argparse.Namespace) -> tuple[Any, dict[str, str], bool]:
        """Merge --base_weights, create the LoRA, attach it and load --network_weights. Returns the network, the
        parsed --network_args and whether the text encoder trains."""
        network, network_args = network_from_args(args, self.dit, self.text_encoders, merge=True,
                                              dtype=self.weight_dtype, device=self.device)
        train_te = trains_text_encoder(args) and bool(self.text_encoders)
        if args.gradient_checkpointing and train_te:
            for te in self.text_encoders:
                if hasattr(te, "gradient_checkpointing_enable"):
                    te.gradient_checkpointing_enable()
        if args.full_fp16 or args.full_bf16:
            network.to(self.weight_dtype)
        return network, network_args, train_te

    def build_loaders(self, args: argparse.Namespace) -> tuple[Any, Any, schedule.Schedule]:
        """The training and validation loaders, and the schedule counted again from the loader (caching may
        have dropped undecodable images since the image scan)."""
        from library.data.config import make_dataloader

        train_loader, val_loader = (
            make_dataloader(group, num_workers=args.max_data_loader_n_workers,
                            persistent_workers=args.persistent_data_loader_workers, seed=self.seed)
            if group is not None else None
            for group in (self.train_group, self.val_group))
        run_schedule = schedule.schedule_from_args(args, len(train_loader), self.accelerator.num_processes)
        if args.max_train_epochs is not None:
            logger.info("--max_train_epochs %d -> %d steps", args.max_train_epochs, run_schedule.max_train_steps)
        self.train_group.set_max_train_steps(run_schedule.max_train_steps)
        return train_loader, val_loader, run_schedule

    def prepare(self, args: argparse.Namespace) -> tuple[torch.nn.Module, Any, Any, Any]:
        """Move models to the device, freeze the base models, let accelerate wrap the network (DDP), the
        optimizer and the loaders. Returns the training module, the optimizer and the two loaders, wrapped."""
        self.dit.requires_grad_(False)
        self.place_dit(args)
        for te in self.text_encoders:
            te.requires_grad_(False)
        self.network.to(self.device)
        for p in self.opt.trainable_params:
            p.requires_grad_(True)
        allow_module_dropout(self.accelerator, self.network, args)
        # Under several processes this wraps the module in DistributedDataParallel, which also broadcasts the
        # main process's LoRA weights to the others (see library/training/distributed.py).
        training_model, optimizer, train_loader = self.accelerator.prepare(
            TrainingModule(self.network, self.device.type), self.opt.optimizer, self.train_loader)
        val_loader = self.accelerator.prepare(self.val_loader) if self.val_loader is not None else None
        # Checkpointing acts only in training mode.
        self.dit.train(args.gradient_checkpointing)
        for te in self.text_encoders:
            te.train(args.gradient_checkpointing and self.train_te)
        return training_model, optimizer, train_loader, val_loader

    def resume(self, args: argparse.Namespace) -> Position:
        """Restore network, optimizer, scheduler and RNG from `--resume` (validated by check_inputs); returns the
        position the run starts at (the state's, or --initial_step / --initial_epoch)."""
        loaded = self.loaded_state
        if loaded is not None:
            checkpointing.load_state(loaded, network=self.network, optimizer=self.optimizer,
                                     lr_scheduler=self.lr_scheduler, device=self.device,
                                     rank=self.accelerator.process_index, seed=self.seed,
                                     scaler=self.accelerator.scaler)
            saved = loaded.train_state.position
            logger.info("resumed from %s (%s state): epoch %d, %d batches of it done, step %d", loaded.folder,
                        loaded.train_state.kind, saved.epoch + 1, saved.batches_done, saved.global_step)
            if args.initial_epoch or args.initial_step:
                logger.warning("--initial_step/--initial_epoch override the step stored in %s", args.resume)
        position = schedule.start_position(
            loaded.train_state.position if loaded is not None else None, self.schedule,
            initial_step=args.initial_step, initial_epoch=args.initial_epoch,
            skip_until_initial_step=args.skip_until_initial_step, resume_flag=args.resume)
        self.train_group.set_current_step(position.global_step)
        return position

    def build_metadata(self, args: argparse.Namespace) -> tuple[dict[str, str], dict[str, str]]:
        """ss_* metadata of the run (its fixed part) and the model spec."""
        dataset_metadata = group_metadata(self.train_group)
        if dataset_metadata and "ss_batch_size_per_device" in dataset_metadata:  # command-line dataset
            dataset_metadata["ss_total_batch_size"] = str(int(dataset_metadata["ss_batch_size_per_device"])
                                                          * self.accelerator.num_processes
                                                          * args.gradient_accumulation_steps)
        metadata = outputs.training_metadata(
            args, session_id=self.session_id, training_started_at=self.training_started_at, seed=self.seed,
            num_train_images=self.train_group.num_train_images, num_reg_images=self.train_group.num_reg_images,
            num_validation_images=getattr(self.val_group, "num_train_images", 0) if self.val_group else 0,
            num_batches_per_epoch=len(self.train_loader), num_epochs=self.schedule.num_epochs,
            optimizer_name=self.opt.text, network_args=self.network_args if args.network_args else None,
            dataset_metadata=dataset_metadata, max_train_steps=self.schedule.max_train_steps,
            network_dim=getattr(self.network, "network_dim", None),
            network_alpha=getattr(self.network, "network_alpha", None),
        )
        if is_relative_step_adafactor(self.opt.optimizer):
            # As sd-scripts records it: no LR was used, and the schedule that ran is adafactor:<initial lr>.
            metadata.update(ss_learning_rate="None", ss_unet_lr="None", ss_lr_scheduler=resolve_lr_scheduler_name(
                args.lr_scheduler, self.opt.optimizer, args.learning_rate))
        if not args.no_metadata:
            self.update_metadata(metadata, args)
        return metadata, outputs.model_spec(args, self.training_started_at)

    # --- the loop ---------------------------------------------------------------------------------------------

    def start_outputs(self, args: argparse.Namespace) -> tuple[TrainingReporter, checkpointing.RunWriter]:
        """The trackers, the reporter (progress, logs, pictures) and the writer of LoRA files and states."""
        init_trackers(self.accelerator, args, {"seed": self.seed, "max_train_steps": self.schedule.max_train_steps,
                                               "save_every_n_epochs": self.schedule.save_every_n_epochs})
        reporter = TrainingReporter(total_steps=self.schedule.max_train_steps, initial_step=self.position.global_step,
                                    is_main_process=self.is_main, accelerator=self.accelerator)
        writer = checkpointing.RunWriter(
            args, self.accelerator, network=self.network, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
            reporter=reporter, eval_mode=self.modes.eval_mode, metadata=self.metadata, model_spec=self.model_spec,
            save_dtype=self.save_dtype, seed=self.seed, data_facts=self.data_facts)
        return reporter, writer

    def train_loop(self, args: argparse.Namespace) -> None:
        accelerator, sched = self.accelerator, self.schedule
        self.reporter.message(
            f"training: {self.train_group.num_train_images} images, {len(self.train_loader)} batches per epoch "
            f"per process, {sched.num_epochs} epochs, {sched.max_train_steps} steps, "
            f"{accelerator.num_processes} process(es), grad accumulation {args.gradient_accumulation_steps}"
        )
        self.guard = NonFiniteGuard(args.max_nonfinite_steps, accelerator.num_processes)
        self.global_step = self.position.global_step
        first_epoch, skip_batches = schedule.resume_start(self.position, sched)
        self.modes.train_mode()
        if args.sample_at_first:
            # Before the first step, also of a resumed run (as sd-scripts does); a resumed run's files are named
            # after the step it resumes at, not e000000 like the samples of the untrained LoRA.
            self.run_sampling(epoch=0 if self.global_step == 0 else None, step=self.global_step)
        # Ctrl-C saves a state: single process only (the processes could not agree on the step).
        self.ctrl_c = CtrlC()
        try:
            with self.ctrl_c.armed(args.save_state and accelerator.num_processes == 1):
                for epoch in range(first_epoch, sched.num_epochs):
                    if self.global_step >= sched.max_train_steps:
                        break
                    self.train_epoch(args, epoch, skip_batches if epoch == first_epoch else 0)
        finally:
            self.reporter.close()
        if self.guard.skipped:
            logger.warning("%d step(s) were skipped for a non-finite loss or gradient; the run made %d of %d steps",
                           self.guard.skipped, self.global_step, sched.max_train_steps)
        accelerator.wait_for_everyone()

    def train_epoch(self, args: argparse.Namespace, epoch: int, skip_batches: int) -> None:
        """One epoch (0-based `epoch`), from its first batch or, resumed, after `skip_batches` batches."""
        accelerator = self.accelerator
        self.train_group.set_current_epoch(epoch + 1)
        self.network.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(self.train_loader, skip_batches) if skip_batches else self.train_loader
        epoch_batches = skip_batches
        step_start = None  # (position, random states) before the first batch of the current optimizer step
        earlier_losses: list[torch.Tensor] = []  # of the current step's batches before its last (accumulation)
        for batch in loader:
            if step_start is None:
                step_start = (Position(epoch, epoch_batches, self.global_step), capture_rng())
            epoch_batches += 1
            loss = self.train_step(args, batch)
            if not accelerator.sync_gradients:
                earlier_losses.append(loss)
                continue
            started, step_start = step_start, None
            step_losses, earlier_losses = earlier_losses, []
            if not self.step_finite:
                self.skip_nonfinite_step(batch, started)
                continue
            self.guard.record(True)
            self.global_step += 1
            self.position = Position(epoch, epoch_batches, self.global_step)
            self.train_group.set_current_step(self.global_step)
            logs = lr_logs(self.lr_scheduler, self.opt.group_descriptions, self.optimizer)
            if args.scale_weight_norms:
                logs.update(self.max_norm_logs)
            # The loss was read with the step's finite flag; device LRs are read with the next step's.
            self.reporter.train_step(self.global_step, epoch + 1, epoch_batches - 1, loss, logs, step_losses)
            self.after_step(args, epoch)
            files.fault_point(f"step:{self.global_step}")
            if self.ctrl_c.requested:
                path = self.writer.save_state(outputs.step_state_name(args, self.global_step),
                                              position=self.position, kind=train_state.INTERRUPTED)
                raise KeyboardInterrupt(str(path))
            if self.global_step >= self.schedule.max_train_steps:
                break
        else:
            self.position = Position(epoch + 1, 0, self.global_step)
        self.reporter.epoch_scalars(self.global_step, epoch + 1, {"loss/epoch_average": self.reporter.epoch_average()})
        self.after_epoch(args, epoch + 1)

    def skip_nonfinite_step(self, batch: dict, started: tuple[Position, dict[str, Any]]) -> None:
        """A step with a non-finite loss or gradient changed nothing (no update, optimizer state and LR schedule
        untouched, not counted). Log it; after --max_nonfinite_steps in a row, save the state of the last good
        step (the one before the streak's first batch) and stop."""
        position = started[0]
        stop = self.guard.record(False, start=started)
        sigmas = self.last_sigmas.float().cpu().tolist() if self.last_sigmas is not None else []
        logger.warning("non-finite loss or gradient after step %d (epoch %d, batch %d): step skipped; images %s, "
                       "sigmas %s", position.global_step, position.epoch + 1, position.batches_done + 1,
                       list(batch.get("image_keys") or []), [round(x, 4) for x in sigmas])
        broken = files.first_non_finite(dict(self.network.named_parameters()))
        if broken is not None:
            # The last counted step had a finite loss and gradients but its update broke the weights: there is no
            # good state in memory to save, and every further step would be skipped too.
            raise AnimaError(
                f"the update of step {position.global_step} turned the LoRA weights NaN or infinite ({broken}) from a "
                "finite loss and gradients: the optimizer's own arithmetic overflowed (a far too high "
                "--learning_rate, or a tiny eps with float16 weights); nothing more is saved, as it would hold "
                f"those weights; lower --learning_rate and restart, or resume from a state saved before step "
                f"{position.global_step}")
        if not stop:
            return
        good_position, good_rng = self.guard.streak_start
        path = self.writer.save_state(outputs.step_state_name(self.args, good_position.global_step),
                                      position=good_position, kind=train_state.NONFINITE, rng=good_rng)
        fp16 = (f"; {FLOAT16_OVERFLOW_ADVICE} (the text encoder and VAE compute in it too)"
                if self.args.mixed_precision == "fp16" else "")
        raise AnimaError(f"{self.guard.consecutive} steps in a row had a non-finite loss or gradient (the first after "
                         f"step {good_position.global_step}); the state of the last good step is saved in {path}; "
                         f"lower --learning_rate (or check the models and data), then continue with --resume {path}"
                         f"{fp16}")

    def train_step(self, args: argparse.Namespace, batch: dict) -> float | torch.Tensor:
        """One micro-batch: forward, backward (DDP averages the gradients on sync steps); on sync steps clip,
        optimizer and scheduler step. Returns the loss averaged over processes: a float on sync steps, read with
        the guard's finite flag (with the reporter's queued values, the step's one read from the device), else
        a 0-dim device tensor."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.training_model):
            loss = self.training_model(self.batch_loss, args, batch, training=True)
            mean_loss = self.mean_over_processes(loss.detach())
            self.step_finite = True
            if self.fused_backward is not None:
                # The hooks clip and step every parameter during backward, so the guard must decide before it:
                # a non-finite loss skips backward (and so the update) entirely.
                self.guard.add_loss(loss)
                self.step_finite, mean_loss = self.read_flag(self.guard.step_flag(None, (), check_gradients=False),
                                                             mean_loss)
                if self.step_finite:
                    accelerator.backward(loss)
            else:
                accelerator.backward(loss)
                self.guard.add_loss(loss)
                if accelerator.sync_gradients:
                    norm = (accelerator.clip_grad_norm_(self.opt.trainable_params, args.max_grad_norm)
                            if args.max_grad_norm else None)
                    # With a loss scaler (fp16) overflowing gradients are the scaler's business.
                    self.step_finite, mean_loss = self.read_flag(self.guard.step_flag(
                        norm, self.opt.trainable_params, check_gradients=accelerator.scaler is None), mean_loss)
                if self.step_finite:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients and self.step_finite:
                self.lr_scheduler.step()
        if args.scale_weight_norms and accelerator.sync_gradients and self.step_finite:  # skipped: no change
            keys_scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(
                args.scale_weight_norms, self.device)
            self.max_norm_logs = {"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_norm,
                                  "norm/avg_key_norm": mean_norm}
        return mean_loss

    def read_flag(self, flag: torch.Tensor, loss: torch.Tensor) -> tuple[bool, float]:
        """The step's one host sync: the guard's flag and the step's loss, read with the reporter's queue."""
        finite, loss_value = self.reporter.read_with(flag, loss)
        return bool(finite), loss_value

    last_sigmas: torch.Tensor | None = None  # of the last batch, read only to log a non-finite step

    def batch_loss(self, args: argparse.Namespace, batch: dict, training: bool) -> torch.Tensor:
        """Mean loss of a batch: model output -> weighted per-sample loss."""
        with torch.set_grad_enabled(training):
            out = self.model_output(args, batch, train_text_encoder=training and self.train_te)
            self.last_sigmas = out.sigmas.detach()
            huber_c = (huber_threshold(args.huber_schedule, out.sigmas, args.huber_c, args.huber_scale)
                       if args.loss_type in ("huber", "smooth_l1") else None)
            mask = batch.get("loss_masks")  # [B, 1, H, W] alpha / conditioning masks, or None
            device = out.prediction.device
            # The loader pins batches on CUDA: non_blocking copies queue behind the step instead of waiting.
            loss = per_sample_loss(out.prediction, out.target, args.loss_type, huber_c=huber_c,
                                   weighting=out.weighting,
                                   mask=mask.to(device, non_blocking=True) if mask is not None else None,
                                   sample_weights=batch["loss_weights"].to(device, non_blocking=True))
            return loss.mean()

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of `value` over processes: a 0-dim float32 tensor on the device (a collective, no host read)."""
        value = value.detach().float().mean()
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value.reshape(1), reduction="mean").reshape(())
        return value

    def after_step(self, args: argparse.Namespace, epoch: int) -> None:
        """Step-triggered sampling, checkpoint, state and validation."""
        step = self.global_step
        if schedule.step_sampling_due(step, args.sample_every_n_steps, args.sample_every_n_epochs):
            self.run_sampling(epoch=None, step=step)
        self.writer.after_step(self.position)
        if self.val_loader is not None and schedule.every(args.validate_every_n_steps, step):
            self.validate(args, "step")

    def after_epoch(self, args: argparse.Namespace, epoch: int) -> None:
        """Epoch-triggered validation, checkpoint (never for the final epoch), state and sampling."""
        if self.val_loader is not None and schedule.epoch_validation_due(epoch, args.validate_every_n_epochs):
            self.validate(args, "epoch", epoch)
        self.writer.after_epoch(epoch, self.position, self.schedule)
        if schedule.every(args.sample_every_n_epochs, epoch):
            self.run_sampling(epoch=epoch, step=self.global_step)

    def run_sampling(self, epoch: int | None, step: int) -> None:
        if not self.args.sample_prompts:
            return
        with self.modes.eval_mode(), self.reporter.excluded("sampling"):
            if self.is_main:
                self.reporter.samples(step, self.sample_images(self.args, epoch, step) or [])
            self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def validate(self, args: argparse.Namespace, kind: str, epoch: int = 0) -> None:
        """Mean loss on the validation set, each batch at sd-scripts' fixed validation timesteps, with a fixed seed
        (RNG restored afterwards); `kind` "step" or "epoch" (then `epoch` counts from 1) names the scalars, as
        sd-scripts does: loss/validation/<kind>_average and <kind>_divergence (minus the training loss/average)."""
        with self.modes.eval_mode(), self.reporter.excluded("validation"):
            self.network.eval()
            seed = args.validation_seed if args.validation_seed is not None else self.seed
            rng = capture_rng()
            torch.manual_seed(seed)
            random.seed(seed)
            losses = []  # device tensors, read once after the loop
            try:
                timesteps = flow_matching.validation_timesteps(args.min_timestep, args.max_timestep)
                # One copy of the flags per timestep, with both bounds at it: σ = t / 1000 for every sample.
                fixed = [argparse.Namespace(**{**vars(args), "min_timestep": t, "max_timestep": t}) for t in timesteps]
                for i, batch in enumerate(self.val_loader):
                    if args.max_validation_steps is not None and i >= args.max_validation_steps:
                        break
                    for at_timestep in fixed:
                        losses.append(self.mean_over_processes(self.batch_loss(at_timestep, batch, training=False)))
            finally:
                restore_rng(rng)
                self.network.train()
                self.reset_dit_layout()
            if losses:
                mean = sum(read_scalars(losses)) / len(losses)
                logs = {f"loss/validation/{kind}_average": mean,
                        f"loss/validation/{kind}_divergence": mean - self.reporter.epoch_average()}
                if kind == "epoch":
                    self.reporter.epoch_scalars(self.global_step, epoch, logs)
                else:
                    self.reporter.scalars(self.global_step, logs)
                self.reporter.message(f"validation loss at step {self.global_step}: {mean:.4f}")

    def save_final(self, args: argparse.Namespace) -> Path:
        # The exact position: the last epoch may have stopped part-way at --max_train_steps.
        if args.save_state or args.save_state_on_train_end:
            self.writer.save_state(outputs.last_state_name(args), position=self.position,
                                   kind=train_state.END_OF_RUN)
            files.fault_point("end_state")
        path = self.writer.save_model(outputs.last_model_name(args), steps=self.global_step,
                                      epoch=self.schedule.num_epochs)
        self.accelerator.end_training()
        self.reporter.summary(steps=self.global_step, output_file=str(path), device=self.device)
        return path
