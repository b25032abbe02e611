"""Generic LoRA training: `NetworkTrainer.train()` runs a fixed sequence of phases; a model plugs in via hooks.

Phases: check args -> accelerator and dtypes -> datasets -> frozen models -> caches -> DiT -> network ->
optimizer and scheduler -> prepare -> resume -> loop -> final save. Model specifics (how models are loaded,
how text and images are encoded, the noise/target/model call, sampling, extra metadata) live in a subclass
that overrides the hook methods grouped at the top of the class; `AnimaNetworkTrainer` is that subclass.

Multi-process (accelerate DDP): every process trains on its shard of the batches; the network is wrapped in
accelerate's DistributedDataParallel through `distributed.TrainingModule` (its forward runs the training loss,
so DDP sees the LoRA layers run), which averages the gradients in buckets overlapped with the backward, so all
processes hold the same weights. Only the main process writes caches, LoRA files, states, samples and logs;
the others wait.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from library.data.metadata import group_metadata
from library.errors import AnimaError
from library.io import files
from library.training import checkpointing, outputs, preflight, schedule
from library.training import state as train_state
from library.training.distributed import TrainingModule, process_group_kwargs, uses_module_dropout
from library.training.losses import ModelOutput, huber_threshold, per_sample_loss
from library.training.nonfinite import NonFiniteGuard, finite_flag, total_grad_norm
from library.training.optimizers import unwrap_optimizer
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
from library.training.schedulers import lr_scheduler_from_args
from library.training.state import capture_rng, restore_rng
from networks import import_network_module
from networks.lora_format import load_lora_file

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NetworkTrainer:
    """Template of a LoRA training run. Subclasses implement the hooks marked "model hook"."""

    # ---------------------------------------------------------------------------------------------------------
    # Model hooks

    # The model's component learning-rate groups: `--<name>_lr` for each name (read by build_optimizer).
    component_lr_names: tuple[str, ...] = ()

    def assert_extra_args(self, args: argparse.Namespace, train_group: Any, val_group: Any) -> None:
        """Model hook: model-specific checks that need the datasets (raise AnimaError)."""

    def load_frozen_models(self, args: argparse.Namespace, accelerator: Accelerator, weight_dtype: torch.dtype) -> None:
        """Model hook: load the text encoder(s) and the VAE (kept frozen)."""
        raise NotImplementedError

    def cache_latents(self, args: argparse.Namespace, accelerator: Accelerator, groups: list[Any]) -> None:
        """Model hook: encode all images once with the VAE (`--cache_latents`)."""
        raise NotImplementedError

    def cache_text_encoder_outputs(self, args: argparse.Namespace, accelerator: Accelerator,
                                   groups: list[Any]) -> None:
        """Model hook: encode all captions (and sample prompts) once (`--cache_text_encoder_outputs`)."""
        raise NotImplementedError

    def load_vae_for_caching(self, args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
        """Model hook (`--cache_only`): the VAE and its cache identity string."""
        raise NotImplementedError

    def load_text_encoding_for_caching(self, args: argparse.Namespace) -> Any:
        """Model hook (`--cache_only`): the caption encoding object the text cache uses."""
        raise NotImplementedError

    def load_dit(self, args: argparse.Namespace, accelerator: Accelerator, weight_dtype: torch.dtype) -> torch.nn.Module:
        """Model hook: load the denoiser the LoRA attaches to."""
        raise NotImplementedError

    def text_encoders(self) -> list[torch.nn.Module]:
        """Model hook: text encoders the network may attach LoRA to (empty when they were freed)."""
        return []

    def inspect_models(self, args: argparse.Namespace) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        """Model hook: check every model file from its header (nothing is read) and return weightless
        (meta-device) copies of the denoiser and the text encoders, for checking the network against them."""
        raise NotImplementedError

    def place_dit(self, args: argparse.Namespace, device: torch.device) -> None:
        """Model hook: move the frozen denoiser to the device (block swap keeps part of it in CPU memory) and
        turn on its gradient checkpointing."""
        self.dit.to(device)

    def reset_dit_layout(self) -> None:
        """Model hook: after a forward without backward (validation), restore the layout training expects."""

    def batch_latents(self, args: argparse.Namespace, batch: dict, weight_dtype: torch.dtype) -> torch.Tensor:
        """Model hook: latents of a batch, from the cache or encoded live. [B, C, h, w]."""
        raise NotImplementedError

    def batch_text(self, args: argparse.Namespace, batch: dict, train_text_encoder: bool) -> dict[str, torch.Tensor]:
        """Model hook: text conditioning of a batch, from the cache or encoded live."""
        raise NotImplementedError

    def noise_pred_and_target(self, args: argparse.Namespace, accelerator: Accelerator, latents: torch.Tensor,
                              text: dict[str, torch.Tensor], weight_dtype: torch.dtype) -> ModelOutput:
        """Model hook: the prediction, its target, the sigmas [B] and the loss weighting [B]."""
        raise NotImplementedError

    def sample_images(self, args: argparse.Namespace, accelerator: Accelerator, epoch: int | None,
                      step: int) -> list[tuple[Path, str]]:
        """Model hook: render `--sample_prompts` (main process only); returns (image file, prompt) pairs."""
        return []

    def update_metadata(self, metadata: dict[str, str], args: argparse.Namespace) -> None:
        """Model hook: add model-specific ss_* keys."""

    def free_text_encoders_if_unused(self, args: argparse.Namespace) -> None:
        """Model hook: drop text encoders when their outputs are cached and they are not trained."""

    # ---------------------------------------------------------------------------------------------------------
    # The run

    def train(self, args: argparse.Namespace) -> Path | None:
        """Run every phase; returns the final LoRA file (None for `--cache_only`)."""
        self.args = args
        self.setup_run(args)
        self.check_inputs(args)
        self.setup_accelerator(args)
        if args.cache_only and not args.dry_run:
            self.write_caches_only(args)
            return None
        self.build_datasets(args)
        self.schedule, self.data_facts = self.check_against_datasets(args)
        if args.dry_run:
            preflight.print_plan(args, self.schedule, self.train_group, self.val_group, self.loaded_state,
                                 self.network_size)
            return None
        self.load_frozen_models(args, self.accelerator, self.weight_dtype)
        self.build_caches(args)
        self.dit = self.load_dit(args, self.accelerator, self.weight_dtype)
        self.create_network(args)
        self.create_optimizer(args)
        self.prepare(args)
        self.resume(args)
        self.build_metadata(args)
        self.free_text_encoders_if_unused(args)
        self.train_loop(args)
        return self.save_final(args)

    # --- phases -----------------------------------------------------------------------------------------------

    def setup_run(self, args: argparse.Namespace) -> None:
        """Session id, start time, seed. Without --seed a resumed run takes the seed its state recorded (the data
        order, the validation split and the noise depend on it); a new run draws one."""
        self.session_id = random.randint(0, 2**32)
        self.training_started_at = time.time()
        self.seed_given = args.seed is not None
        self.saved_train_state = train_state.read_train_state(Path(args.resume)) if args.resume else None
        if args.seed is None:
            saved_seed = self.saved_train_state.seed if self.saved_train_state is not None else None
            args.seed = saved_seed if saved_seed is not None else random.randint(0, 2**32 - 1)
            if saved_seed is not None:
                logger.info("--seed not given: using the seed %d recorded in %s", saved_seed, args.resume)

    def check_inputs(self, args: argparse.Namespace) -> None:
        """Fail in seconds, before images are scanned, models loaded or caches written: the model files (headers
        only), the --resume folder, and the network (--network_args, --network_weights, --base_weights) built
        on weightless copies of the models."""
        if not args.cache_only:
            files.check_writable_dir(args.output_dir, "--output_dir")
        if args.logging_dir and args.log_with:
            files.check_writable_dir(args.logging_dir, "--logging_dir")
        dit, text_encoders = self.inspect_models(args)
        self.network_size = preflight.NetworkSize(dit, sum(p.numel() for te in text_encoders for p in te.parameters()))
        self.loaded_state = None
        if args.cache_only:
            return
        logging.disable(logging.WARNING)  # the real build logs the same lines again
        try:
            network = self.build_network(args, dit, text_encoders, merge_base_weights=False)
            # The optimizer and the LR scheduler on the weightless LoRA parameters: a typo'd --optimizer_type or
            # --lr_scheduler, or bad --optimizer_args, fail here and not after caching.
            optimizer, scheduler = self.check_optimizer_and_scheduler(args, network)
        finally:
            logging.disable(logging.NOTSET)
        network.remove_hooks()
        self.network_size.network_parameters = sum(p.numel() for p in network.parameters())
        self.network_size.trainable_parameters = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        if args.resume:
            self.loaded_state = preflight.check_resume_folder(args, network, optimizer, scheduler, self.seed_given)
        # One run per output: a second run on the same --output_dir/--output_name stops here, before any work.
        # A dry run writes nothing, so it takes no lock.
        self.output_lock = None if args.dry_run else outputs.claim_output(args)

    def check_optimizer_and_scheduler(self, args: argparse.Namespace, network: Any) -> tuple[Any, Any]:
        """Build the optimizer and LR scheduler as the run will, on the network's (meta-device) parameters."""
        try:
            _, _, optimizer, _ = self.build_optimizer(args, network)
        except (RuntimeError, NotImplementedError) as exc:
            if "meta" not in str(exc):
                raise
            # An optimizer that reads its parameters' values when built: give it uninitialised CPU copies.
            network.to_empty(device="cpu")
            _, _, optimizer, _ = self.build_optimizer(args, network)
        # The step count only shapes the schedule; with --max_train_epochs it is known after the image scan.
        return optimizer, lr_scheduler_from_args(args, optimizer, args.max_train_steps)

    def check_against_datasets(self, args: argparse.Namespace) -> tuple[schedule.Schedule, dict[str, Any]]:
        """After the image scan, before any model loads: the schedule, the disk-cache folders, and for --resume
        the dataset, batches per epoch and number of processes against the state, and the steps left. Returns
        the schedule and the data facts every state records."""
        run_schedule = self.make_run_schedule(args, len(self.train_group))
        # Taken from the image scan (before caching may drop undecodable images), so that every run of the same
        # data records and compares the same facts.
        facts = preflight.run_facts(self.accelerator.num_processes, run_schedule, self.train_group,
                                    args.dataset_config)
        preflight.check_cache_folders(args, self.groups())
        if self.loaded_state is not None:
            preflight.check_resume_against_data(args, self.loaded_state, facts, run_schedule)
        return run_schedule, facts

    def make_run_schedule(self, args: argparse.Namespace, num_batches: int) -> schedule.Schedule:
        return schedule.make_schedule(
            num_batches, num_processes=self.accelerator.num_processes,
            gradient_accumulation_steps=args.gradient_accumulation_steps, max_train_steps=args.max_train_steps,
            max_train_epochs=args.max_train_epochs, save_every_n_epochs=args.save_every_n_epochs,
            save_n_epoch_ratio=args.save_n_epoch_ratio)

    def release_output(self) -> None:
        """Free the run lock taken in check_inputs (process exit frees it too)."""
        lock = getattr(self, "output_lock", None)
        if lock is not None:
            lock.release()
            self.output_lock = None

    def setup_accelerator(self, args: argparse.Namespace) -> None:
        """Accelerator (grad accumulation, mixed precision, DDP) and the dtypes derived from the flags."""
        kwargs_handlers = process_group_kwargs(args)
        # Without an accelerator device, say so: accelerate then runs multi-process launches on CPU (gloo).
        no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
        run_dir = run_logging_dir(args.logging_dir, args.log_prefix) if args.log_with else None
        prepare_tracker_environment(args, run_dir)
        self.accelerator = Accelerator(
            cpu=no_accelerator,
            log_with=args.log_with,  # the trackers start in train_loop (init_trackers)
            project_dir=run_dir,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            # The per-epoch shuffle depends only on (seed, epoch), so a resumed run sees the same order.
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=kwargs_handlers,
        )
        set_seed(args.seed)
        if args.cuda_allow_tf32:
            # TF32 tensor cores for float32 matmuls and convolutions (about 10 mantissa bits instead of 23).
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.weight_dtype = DTYPES[args.mixed_precision]
        self.save_dtype = SAVE_DTYPES[args.save_precision]

    def build_datasets(self, args: argparse.Namespace) -> None:
        """Dataset groups from `--dataset_config` / folders, checked before any model loads."""
        from library.data.config import build_dataset_groups

        self.train_group, self.val_group = build_dataset_groups(args)
        if self.train_group is None or len(self.train_group) == 0:
            source = args.dataset_config or getattr(args, "train_data_dir", None)
            raise AnimaError(f"no training images found in {source}; check image_dir / file extensions")
        # build_dataset_groups has already checked the caching options against every subset.
        self.assert_extra_args(args, self.train_group, self.val_group)

    def write_caches_only(self, args: argparse.Namespace) -> None:
        """`--cache_only`: write the disk caches and stop. The main process writes first; the others then
        find the files and only check them."""
        from library.data.config import cache_only_main

        with self.accelerator.main_process_first():
            cache_only_main(args, load_vae=lambda: self.load_vae_for_caching(args),
                            load_text_encoding=lambda: self.load_text_encoding_for_caching(args),
                            is_main_process=self.is_main)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def groups(self) -> list[Any]:
        return [g for g in (self.train_group, self.val_group) if g is not None]

    def build_caches(self, args: argparse.Namespace) -> None:
        """Latent and text-encoder caches; only the main process writes files, the others wait."""
        if args.cache_latents:
            self.cache_latents(args, self.accelerator, self.groups())
            self.accelerator.wait_for_everyone()
        if args.cache_text_encoder_outputs:
            self.cache_text_encoder_outputs(args, self.accelerator, self.groups())
            self.accelerator.wait_for_everyone()

    def build_network(self, args: argparse.Namespace, dit: torch.nn.Module, text_encoders: list[torch.nn.Module],
                      merge_base_weights: bool) -> Any:
        """The attached LoRA network (with --network_weights loaded). Also runs on weightless models from
        `inspect_models`, with `merge_base_weights=False`: then it only checks the network options and files."""
        network_module = import_network_module(args.network_module)
        self.network_module = network_module
        for i, path in enumerate(args.base_weights or []):
            multiplier = (args.base_weights_multiplier or [])[i] if i < len(args.base_weights_multiplier or []) else 1.0
            # Read the file here so that its errors name --base_weights.
            base_sd, _ = load_lora_file(path, flag="--base_weights")
            merged, _ = network_module.create_network_from_weights(multiplier, path, None, text_encoders, dit,
                                                                  weights_sd=base_sd, for_inference=True)
            if merge_base_weights:
                logger.info("merging base weights %s (multiplier %s)", path, multiplier)
                merged.merge_to(text_encoders, dit, weights_sd=None, dtype=self.weight_dtype, device=self.device)

        self.network_args = parse_network_args(args.network_args)
        if args.dim_from_weights:
            if not args.network_weights:
                raise AnimaError("--dim_from_weights needs --network_weights")
            network, _ = network_module.create_network_from_weights(1.0, args.network_weights, None, text_encoders,
                                                                   dit)
        else:
            if "dropout" not in self.network_args:
                self.network_args["dropout"] = args.network_dropout
            # network_args dropout=p (LyCORIS' key, which sd-scripts also fills from --network_dropout) wins.
            network = network_module.create_network(
                1.0, args.network_dim, args.network_alpha, None, text_encoders, dit,
                neuron_dropout=self.network_args["dropout"],
                **{k: v for k, v in self.network_args.items() if k != "dropout"},
            )
        if network is None:
            raise AnimaError("the network module returned no network; check --network_args")
        network.check_save_format(args.lora_format)
        train_te = self.train_text_encoder(args) and bool(text_encoders)
        network.apply_to(text_encoders, dit, train_te, not args.network_train_text_encoder_only)
        if args.network_weights and not args.dim_from_weights:
            info = network.load_weights(args.network_weights)
            if merge_base_weights:
                logger.info("loaded network weights from %s: %s", args.network_weights, info)
        return network

    def train_text_encoder(self, args: argparse.Namespace) -> bool:
        return not args.network_train_unet_only and not args.cache_text_encoder_outputs

    def create_network(self, args: argparse.Namespace) -> None:
        """Merge --base_weights, create the LoRA, attach it and load --network_weights."""
        text_encoders = self.text_encoders()
        network = self.build_network(args, self.dit, text_encoders, merge_base_weights=True)
        train_dit = not args.network_train_text_encoder_only
        train_te = self.train_text_encoder(args) and bool(text_encoders)
        if args.gradient_checkpointing:
            for te in text_encoders if train_te else []:
                if hasattr(te, "gradient_checkpointing_enable"):
                    te.gradient_checkpointing_enable()
        if args.full_fp16 or args.full_bf16:
            network.to(self.weight_dtype)
        self.network = network
        self.train_te = train_te
        self.train_dit = train_dit

    def build_optimizer(self, args: argparse.Namespace, network: Any) -> tuple[str, str, Any, list[str]]:
        """Parameter groups (per component / LoRA+) and the optimizer; parameters of lr-0 groups are frozen.
        Returns (name, args text, optimizer, group descriptions). Also runs on a meta-device network."""
        from library.training.optimizers import create_optimizer

        component_lrs = {name: getattr(args, f"{name}_lr") for name in self.component_lr_names}
        groups, descriptions = network.prepare_optimizer_params(
            args.text_encoder_lr, args.unet_lr, args.learning_rate, component_lrs)
        trained = {id(p) for g in groups for p in g["params"]}
        for p in network.parameters():
            p.requires_grad_(id(p) in trained)  # lr 0 groups were dropped: their parameters stay frozen
        if not trained:
            raise AnimaError("no LoRA parameter is trained: every learning rate is 0 or no module matched")
        optimizer_name, optimizer_args_text, optimizer = create_optimizer(
            args.optimizer_type, groups, args.learning_rate, args.optimizer_args,
            use_8bit_adam=args.use_8bit_adam, use_lion_optimizer=args.use_lion_optimizer)
        return optimizer_name, optimizer_args_text, optimizer, descriptions

    def create_optimizer(self, args: argparse.Namespace) -> None:
        """Optimizer, data loader, the run's schedule (step counts) and the LR scheduler."""
        from library.data.config import make_dataloader
        from library.training.optimizers import install_fused_backward_pass, is_schedule_free

        optimizer_name, optimizer_args_text, optimizer, descriptions = self.build_optimizer(args, self.network)
        self.trainable_params = [p for p in self.network.parameters() if p.requires_grad]
        self.lr_descriptions = descriptions
        # ss_optimizer: "module.Class(key=value,...)" or just "module.Class" without --optimizer_args.
        self.optimizer_text = optimizer_name + (f"({optimizer_args_text})" if optimizer_args_text else "")
        self.schedule_free = is_schedule_free(optimizer)
        self.optimizer_eval_depth = 0

        workers = min(args.max_data_loader_n_workers, max((torch.multiprocessing.cpu_count() or 1) - 1, 0))
        self.train_loader = make_dataloader(self.train_group, num_workers=workers,
                                            persistent_workers=args.persistent_data_loader_workers, seed=args.seed)
        self.val_loader = (make_dataloader(self.val_group, num_workers=workers,
                                           persistent_workers=args.persistent_data_loader_workers, seed=args.seed)
                           if self.val_group is not None else None)

        # Counted again now: caching may have dropped undecodable images since the image scan.
        self.schedule = self.make_run_schedule(args, len(self.train_loader))
        if args.max_train_epochs is not None:
            logger.info("--max_train_epochs %d -> %d steps", args.max_train_epochs, self.schedule.max_train_steps)
        self.train_group.set_max_train_steps(self.schedule.max_train_steps)

        self.optimizer = optimizer
        # Stepped once per optimizer step on every process, so its length is the run's step count.
        self.lr_scheduler = lr_scheduler_from_args(args, optimizer, self.schedule.max_train_steps)
        self.fused_backward = None
        if args.fused_backward_pass:
            self.fused_backward = install_fused_backward_pass(
                optimizer, args.max_grad_norm, args.gradient_accumulation_steps, self.accelerator.num_processes)

    def prepare(self, args: argparse.Namespace) -> None:
        """Move models to the device, freeze the base models, let accelerate wrap optimizer and loaders."""
        device = self.device
        self.dit.requires_grad_(False)
        self.place_dit(args, device)
        for te in self.text_encoders():
            te.requires_grad_(False)
        self.network.to(device)
        for p in self.trainable_params:
            p.requires_grad_(True)
        if self.accelerator.num_processes > 1 and uses_module_dropout(self.network):
            if args.ddp_static_graph:
                raise AnimaError("--ddp_static_graph cannot be combined with module_dropout in --network_args "
                                 "(a dropped module changes the set of trained parameters); drop one")
            if args.cpu_offload_checkpointing or args.unsloth_offload_checkpointing:
                # DDP finds the unused parameters in the forward graph, which the offloaded blocks leave out.
                raise AnimaError("module_dropout in --network_args does not work with --cpu_offload_checkpointing "
                                 "or --unsloth_offload_checkpointing on several processes; drop one or use "
                                 "--gradient_checkpointing alone")
            self.accelerator.ddp_handler.find_unused_parameters = True
        # Under several processes this wraps the module in DistributedDataParallel, which also broadcasts the
        # main process's LoRA weights to the others (see library/training/distributed.py).
        self.training_model, self.optimizer, self.train_loader = self.accelerator.prepare(
            TrainingModule(self.network, device.type), self.optimizer, self.train_loader)
        if self.val_loader is not None:
            self.val_loader = self.accelerator.prepare(self.val_loader)
        if args.gradient_checkpointing:
            self.dit.train()  # checkpointing acts only in training mode
            for te in self.text_encoders() if self.train_te else []:
                te.train()
        else:
            self.dit.eval()
            for te in self.text_encoders():
                te.eval()

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    @property
    def num_epochs(self) -> int:
        return self.schedule.num_epochs

    def resume(self, args: argparse.Namespace) -> None:
        """Restore network, optimizer, scheduler, RNG and the exact position from `--resume` (validated by
        check_inputs), or start at --initial_step / --initial_epoch."""
        self.position = Position()
        if args.resume:
            loaded = self.loaded_state
            if loaded is None:  # a trainer driven without check_inputs
                network = self.network
                loaded = train_state.validate_state_folder(
                    Path(args.resume), {k: tuple(v.shape) for k, v in network.state_dict().items()})
            checkpointing.load_state(loaded, network=self.network, optimizer=self.optimizer,
                                     lr_scheduler=self.lr_scheduler, device=self.device,
                                     rank=self.accelerator.process_index, seed=args.seed)
            self.position = loaded.train_state.position
            if schedule.steps_left(self.position, self.schedule) <= 0:
                raise AnimaError(f"--resume {args.resume}: nothing left to train (the state is at step "
                                 f"{self.position.global_step} of {self.schedule.max_train_steps}); raise "
                                 "--max_train_steps or --max_train_epochs")
            logger.info("resumed from %s (%s state): epoch %d, %d batches of it done, step %d", loaded.folder,
                        loaded.train_state.kind, self.position.epoch + 1, self.position.batches_done,
                        self.position.global_step)
        if args.initial_epoch or args.initial_step:
            if args.resume:
                logger.warning("--initial_step/--initial_epoch override the step stored in %s", args.resume)
            step = schedule.initial_step(args.initial_step, args.initial_epoch, self.schedule,
                                         self.position.global_step)
            if step >= self.schedule.max_train_steps:
                raise AnimaError(f"--initial_step {step} must be below --max_train_steps "
                                 f"{self.schedule.max_train_steps}")
            self.position = schedule.position_from_initial_step(step, self.schedule, args.skip_until_initial_step)
        self.global_step = self.position.global_step
        self.first_epoch, self.skip_batches = schedule.resume_start(self.position, self.schedule)
        self.train_group.set_current_step(self.global_step)

    def build_metadata(self, args: argparse.Namespace) -> None:
        """ss_* metadata of the run (fixed part) and the model spec."""
        dataset_metadata = group_metadata(self.train_group)
        if dataset_metadata and "ss_batch_size_per_device" in dataset_metadata:  # command-line dataset
            dataset_metadata["ss_total_batch_size"] = str(int(dataset_metadata["ss_batch_size_per_device"])
                                                          * self.accelerator.num_processes
                                                          * args.gradient_accumulation_steps)
        num_val = getattr(self.val_group, "num_train_images", 0) if self.val_group is not None else 0
        metadata = outputs.training_metadata(
            args, session_id=self.session_id, training_started_at=self.training_started_at,
            num_train_images=self.train_group.num_train_images, num_reg_images=self.train_group.num_reg_images,
            num_validation_images=num_val, num_batches_per_epoch=len(self.train_loader),
            num_epochs=self.num_epochs, optimizer_name=self.optimizer_text,
            network_args=self.network_args if args.network_args else None, dataset_metadata=dataset_metadata,
            max_train_steps=self.schedule.max_train_steps,
            network_dim=getattr(self.network, "network_dim", None),
            network_alpha=getattr(self.network, "network_alpha", None),
        )
        if not args.no_metadata:
            self.update_metadata(metadata, args)
        self.metadata = metadata
        self.model_spec = outputs.model_spec(args, self.training_started_at)

    # --- the loop ---------------------------------------------------------------------------------------------

    def train_loop(self, args: argparse.Namespace) -> None:
        accelerator = self.accelerator
        sched = self.schedule
        init_trackers(accelerator, args)
        self.reporter = TrainingReporter(total_steps=sched.max_train_steps, initial_step=self.global_step,
                                         is_main_process=self.is_main, accelerator=accelerator)
        self.reporter.message(
            f"training: {self.train_group.num_train_images} images, {len(self.train_loader)} batches per epoch "
            f"per process, {sched.num_epochs} epochs, {sched.max_train_steps} steps, "
            f"{accelerator.num_processes} process(es), grad accumulation {args.gradient_accumulation_steps}"
        )
        self.guard = NonFiniteGuard(args.max_nonfinite_steps)
        self.last_epoch = self.first_epoch
        self.optimizer_train_mode()
        if args.sample_at_first and self.global_step == 0:
            self.run_sampling(epoch=0, step=0)
        try:
            with self.ctrl_c_saves_a_state(args):
                for epoch in range(self.first_epoch, sched.num_epochs):
                    if self.global_step >= sched.max_train_steps:
                        break
                    self.train_epoch(args, epoch)
        finally:
            self.reporter.close()
        if self.guard.skipped:
            logger.warning("%d step(s) were skipped for a non-finite loss or gradient; the run made %d of %d steps",
                           self.guard.skipped, self.global_step, sched.max_train_steps)
        accelerator.wait_for_everyone()

    def train_epoch(self, args: argparse.Namespace, epoch: int) -> None:
        """One epoch (0-based `epoch`), from its first batch or from the resume position."""
        accelerator = self.accelerator
        self.last_epoch = epoch
        self.train_group.set_current_epoch(epoch + 1)
        self.network.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        loader = self.train_loader
        if self.skip_batches:
            loader = accelerator.skip_first_batches(self.train_loader, self.skip_batches)
        epoch_batches = self.skip_batches
        self.skip_batches = 0
        self.reporter.new_epoch()
        step_start = None  # (position, random states) before the first batch of the current optimizer step
        for batch in loader:
            if step_start is None:
                step_start = (Position(epoch, epoch_batches, self.global_step), capture_rng())
            epoch_batches += 1
            loss = self.train_step(args, batch)
            if not accelerator.sync_gradients:
                continue
            started, step_start = step_start, None
            if not self.step_finite:
                self.skip_nonfinite_step(args, batch, started)
                continue
            self.guard.record(True)
            self.global_step += 1
            self.position = Position(epoch, epoch_batches, self.global_step)
            self.train_group.set_current_step(self.global_step)
            logs = lr_logs(self.lr_scheduler, self.lr_descriptions, self.optimizer)
            if args.scale_weight_norms:
                logs.update(self.max_norm_logs)
            # The loss stays on the device: the reporter reads it with other steps' (no sync per step).
            self.reporter.train_step(self.global_step, epoch + 1,
                                     schedule.step_in_epoch(epoch_batches, args.gradient_accumulation_steps), loss,
                                     logs)
            self.after_step(args, epoch, epoch_batches)
            files.fault_point(f"step:{self.global_step}")
            if self.interrupt_requested:
                self.save_interrupt_state(args)
            if self.global_step >= self.schedule.max_train_steps:
                break
        else:
            self.position = Position(epoch + 1, 0, self.global_step)
        self.reporter.epoch_scalars(self.global_step, epoch + 1, {"loss/epoch_average": self.reporter.epoch_average()})
        self.after_epoch(args, epoch + 1)

    def skip_nonfinite_step(self, args: argparse.Namespace, batch: dict,
                            started: tuple[Position, dict[str, Any]]) -> None:
        """A step with a non-finite loss or gradient changed nothing (no update, optimizer state and LR schedule
        untouched, not counted). Log it; after --max_nonfinite_steps in a row, save the state of the last good
        step and stop."""
        position, rng = started
        if self.guard.consecutive == 0:
            self.first_bad_step = started  # the state of the last good step is the one before this batch
        stop = self.guard.record(False)
        sigmas = self.last_sigmas.detach().float().cpu().tolist() if self.last_sigmas is not None else []
        logger.warning("non-finite loss or gradient after step %d (epoch %d, batch %d): step skipped; images %s, "
                       "sigmas %s", position.global_step, position.epoch + 1, position.batches_done + 1,
                       list(batch.get("image_keys") or []), [round(x, 4) for x in sigmas])
        if not stop:
            return
        good_position, good_rng = self.first_bad_step
        name = outputs.step_state_name(self.args, good_position.global_step)
        path = self.save_state(name, position=good_position, kind=train_state.NONFINITE, rng=good_rng)
        raise AnimaError(f"{self.guard.consecutive} steps in a row had a non-finite loss or gradient (the first after "
                         f"step {good_position.global_step}); the state of the last good step is saved in {path}; "
                         f"lower --learning_rate (or check the models and data), then continue with --resume {path}")

    @contextmanager
    def ctrl_c_saves_a_state(self, args: argparse.Namespace) -> Iterator[None]:
        """With --save_state, the first Ctrl-C lets the current step finish, saves a state of it and stops; a
        second Ctrl-C stops at once. Single process only (the processes could not agree on the step)."""
        self.interrupt_requested = False
        usable = (args.save_state and self.accelerator.num_processes == 1
                  and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if not usable:
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.interrupt_requested:
                raise KeyboardInterrupt
            self.interrupt_requested = True
            print("Ctrl-C: finishing this step and saving a state (Ctrl-C again stops at once)", flush=True)

        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: keep the default behaviour
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def save_interrupt_state(self, args: argparse.Namespace) -> None:
        path = self.save_state(outputs.step_state_name(args, self.global_step), position=self.position,
                               kind=train_state.INTERRUPTED)
        raise KeyboardInterrupt(str(path))

    def train_step(self, args: argparse.Namespace, batch: dict) -> torch.Tensor:
        """One micro-batch: forward, backward (DDP averages the gradients on sync steps); on sync steps clip,
        optimizer and scheduler step. Returns the loss averaged over processes, a 0-dim float32 tensor on the
        device (not read here). The non-finite guard's flag is the one value a step reads from the device."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.training_model):
            loss = self.training_model(self.batch_loss, args, batch, training=True)
            self.step_finite = True
            if self.fused_backward is not None:
                # The hooks clip and step every parameter during backward, so the guard must decide before it:
                # a non-finite loss skips backward (and so the update) entirely.
                self.step_finite = self.read_finite_flag(finite_flag(loss))
                if self.step_finite:
                    accelerator.backward(loss)
            else:
                accelerator.backward(loss)
                self.batch_finite = finite_flag(loss) if self.batch_finite is None \
                    else self.batch_finite * finite_flag(loss)
                if accelerator.sync_gradients:
                    norm = (accelerator.clip_grad_norm_(self.trainable_params, args.max_grad_norm)
                            if args.max_grad_norm else None)
                    self.step_finite = self.step_gradients_finite(norm)
                if self.step_finite:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients and self.step_finite:
                self.lr_scheduler.step()
        if args.scale_weight_norms and accelerator.sync_gradients and self.step_finite:  # skipped: no change
            keys_scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(
                args.scale_weight_norms, self.device)
            self.max_norm_logs = {"max_norm/keys_scaled": keys_scaled, "max_norm/average_key_norm": mean_norm,
                                  "max_norm/max_key_norm": max_norm}
        return self.mean_over_processes(loss.detach())

    def batch_loss(self, args: argparse.Namespace, batch: dict, training: bool) -> torch.Tensor:
        """Mean loss of a batch: latents and text -> prediction/target -> weighted per-sample loss."""
        latents = self.batch_latents(args, batch, self.weight_dtype)
        with torch.set_grad_enabled(training and self.train_te):
            text = self.batch_text(args, batch, train_text_encoder=training and self.train_te)
        with torch.set_grad_enabled(training):
            out = self.noise_pred_and_target(args, self.accelerator, latents, text, self.weight_dtype)
            pred = out.prediction
            self.last_sigmas = out.sigmas.detach()  # [B], read only to log a non-finite step
            huber_c = (huber_threshold(args.huber_schedule, out.sigmas, args.huber_c, args.huber_scale)
                       if args.loss_type in ("huber", "smooth_l1") else None)
            mask = batch.get("loss_masks")  # [B, 1, H, W] alpha / conditioning masks, or None
            # The loader pins batches on CUDA: non_blocking copies queue behind the step instead of waiting.
            loss = per_sample_loss(pred, out.target, args.loss_type, huber_c=huber_c, weighting=out.weighting,
                                   mask=mask.to(pred.device, non_blocking=True) if mask is not None else None,
                                   sample_weights=batch["loss_weights"].to(pred.device, non_blocking=True))
            return loss.mean()

    # The non-finite guard: one device->host read per optimizer step (see library/training/nonfinite.py).
    batch_finite: torch.Tensor | None = None  # product of the micro-batch loss flags since the last step
    last_sigmas: torch.Tensor | None = None

    def step_gradients_finite(self, clipped_norm: torch.Tensor | None) -> bool:
        """Whether the accumulated losses and the averaged gradients are finite. With a loss scaler (fp16)
        overflowing gradients are the scaler's business (it skips the step and lowers the scale), so only
        the losses count there."""
        flags = self.batch_finite if self.batch_finite is not None else torch.ones((), device=self.device)
        self.batch_finite = None
        if self.accelerator.scaler is None:
            norm = clipped_norm if clipped_norm is not None else total_grad_norm(self.trainable_params)
            if norm is not None:
                flags = flags * finite_flag(norm)
        return self.read_finite_flag(flags)

    def read_finite_flag(self, flag: torch.Tensor) -> bool:
        """The guard's single host sync; every process takes the same decision (minimum over processes)."""
        if self.accelerator.num_processes > 1:
            import torch.distributed as dist

            flag = flag.reshape(1).clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of `value` over processes: a 0-dim float32 tensor on the device (a collective, no host read)."""
        value = value.detach().float().mean()
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value.reshape(1), reduction="mean").reshape(())
        return value

    def after_step(self, args: argparse.Namespace, epoch: int, epoch_batches: int) -> None:
        """Step-triggered sampling, checkpoint, state and validation."""
        step = self.global_step
        if schedule.step_sampling_due(step, args.sample_every_n_steps, args.sample_every_n_epochs):
            self.run_sampling(epoch=None, step=step)
        if schedule.step_save_due(step, args.save_every_n_steps, self.schedule.max_train_steps):
            self.save_model(outputs.step_model_name(args, step), steps=step, epoch=epoch)
            self.prune(outputs.step_model_name, outputs.step_to_prune(step, args.save_every_n_steps,
                                                                    args.save_last_n_steps))
            if args.save_state:
                self.save_state(outputs.step_state_name(args, step), position=Position(epoch, epoch_batches, step))
                keep = args.save_last_n_steps_state or args.save_last_n_steps
                self.prune(outputs.step_state_name, outputs.step_to_prune(step, args.save_every_n_steps, keep))
        if self.val_loader is not None and schedule.every(args.validate_every_n_steps, step):
            self.validate(args)

    def after_epoch(self, args: argparse.Namespace, epoch: int) -> None:
        """Epoch-triggered validation, checkpoint (never for the final epoch), state and sampling."""
        if self.val_loader is not None and schedule.epoch_validation_due(epoch, args.validate_every_n_epochs,
                                                                         args.validate_every_n_steps):
            self.validate(args)
        every_n_epochs = self.schedule.save_every_n_epochs
        if schedule.epoch_save_due(epoch, every_n_epochs, self.num_epochs):
            self.save_model(outputs.epoch_model_name(args, epoch), steps=self.global_step, epoch=epoch)
            self.prune(outputs.epoch_model_name, outputs.epoch_to_prune(epoch, every_n_epochs,
                                                                      args.save_last_n_epochs))
            if args.save_state:
                self.save_state(outputs.epoch_state_name(args, epoch), position=self.position)
                keep = args.save_last_n_epochs_state or args.save_last_n_epochs
                self.prune(outputs.epoch_state_name, outputs.epoch_to_prune(epoch, every_n_epochs, keep))
        if schedule.every(args.sample_every_n_epochs, epoch):
            self.run_sampling(epoch=epoch, step=self.global_step)

    def run_sampling(self, epoch: int | None, step: int) -> None:
        if not self.args.sample_prompts:
            return
        with self.optimizer_eval_mode(), self.reporter.excluded("sampling"):
            if self.is_main:
                self.reporter.samples(step, self.sample_images(self.args, self.accelerator, epoch, step) or [])
            self.accelerator.wait_for_everyone()

    # Schedule-free optimizers hold two weight sets; evaluation, sampling and saving must see the averaged one.

    def optimizer_train_mode(self) -> None:
        if self.schedule_free:
            unwrap_optimizer(self.optimizer).train()

    @contextmanager
    def optimizer_eval_mode(self) -> Iterator[None]:
        """Switch a schedule-free optimizer to eval weights for the block (nested uses switch once)."""
        if not self.schedule_free:
            yield
            return
        inner = unwrap_optimizer(self.optimizer)
        if self.optimizer_eval_depth == 0:
            inner.eval()
        self.optimizer_eval_depth += 1
        try:
            yield
        finally:
            self.optimizer_eval_depth -= 1
            if self.optimizer_eval_depth == 0:
                inner.train()

    @torch.no_grad()
    def validate(self, args: argparse.Namespace) -> None:
        """Mean loss on the validation set with a fixed seed (RNG restored afterwards)."""
        with self.optimizer_eval_mode(), self.reporter.excluded("validation"):
            self.validation_loss(args)

    def validation_loss(self, args: argparse.Namespace) -> None:
        self.network.eval()
        seed = args.validation_seed if args.validation_seed is not None else args.seed
        rng = capture_rng()
        torch.manual_seed(seed)
        random.seed(seed)
        losses = []  # device tensors, read once after the loop
        try:
            for i, batch in enumerate(self.val_loader):
                if args.max_validation_steps is not None and i >= args.max_validation_steps:
                    break
                losses.append(self.mean_over_processes(self.batch_loss(args, batch, training=False)))
        finally:
            restore_rng(rng)
            self.network.train()
            self.reset_dit_layout()
        total, count = sum(read_scalars(losses)), len(losses)
        if count:
            self.reporter.scalars(self.global_step, {"loss/validation/step_average": total / count})
            self.reporter.message(f"validation loss at step {self.global_step}: {total / count:.4f}")

    # --- saving -----------------------------------------------------------------------------------------------

    def save_model(self, file_name: str, *, steps: int, epoch: int) -> Path | None:
        """Write the LoRA atomically (main process); the others wait."""
        path = Path(self.args.output_dir) / file_name
        with self.optimizer_eval_mode(), self.reporter.excluded("saving"):
            self.write_model(path, steps=steps, epoch=epoch)
            self.reporter.write_pictures(self.args.output_dir, self.args.output_name)
        self.accelerator.wait_for_everyone()
        return path

    def write_model(self, path: Path, *, steps: int, epoch: int) -> None:
        if self.is_main:
            metadata = outputs.metadata_for_save(self.metadata, self.model_spec, steps=steps, epoch=epoch,
                                                no_metadata=self.args.no_metadata)
            checkpointing.write_lora(self.network, path, metadata, self.save_dtype, self.args.lora_format)
            self.reporter.message(f"saved {path}")

    def prune(self, name_of: Callable[[argparse.Namespace, int], str], number: int | None) -> None:
        """Remove the checkpoint `name_of(args, number)` that left its keep window (None: nothing to remove)."""
        if self.is_main and number is not None:
            path = Path(self.args.output_dir) / name_of(self.args, number)
            if path.exists():
                files.remove_path(path)
                self.reporter.message(f"removed old checkpoint {path}")
        self.accelerator.wait_for_everyone()

    def save_state(self, folder_name: str, *, position: Position, kind: str = train_state.PERIODIC,
                   rng: dict[str, Any] | None = None) -> Path:
        """Training state folder at `position`: network weights, optimizer, scheduler, the random states of every
        process (`rng`: this process's, default the current ones), the position and the run's settings."""
        path = Path(self.args.output_dir) / folder_name
        with self.optimizer_eval_mode(), self.reporter.excluded("saving"):
            self.write_state(path, position=position, kind=kind, rng=rng if rng is not None else capture_rng())
        return path

    def write_state(self, path: Path, *, position: Position, kind: str, rng: dict[str, Any]) -> None:
        gathered = checkpointing.gather_objects(self.accelerator, rng)
        if self.is_main:
            record = train_state.TrainState(position=position, seed=self.args.seed, kind=kind,
                                            facts=self.data_facts,
                                            settings=train_state.recorded_settings(self.args))
            checkpointing.write_state_folder(path, network=self.network, optimizer=self.optimizer,
                                             lr_scheduler=self.lr_scheduler, rng_states=gathered, record=record)
            self.reporter.message(f"saved state {path}")
        self.accelerator.wait_for_everyone()

    def save_final(self, args: argparse.Namespace) -> Path:
        # The exact position: the last epoch may have stopped part-way at --max_train_steps.
        end = self.position
        if args.save_state or args.save_state_on_train_end:
            self.save_state(outputs.last_state_name(args), position=end, kind=train_state.END_OF_RUN)
            files.fault_point("end_state")
        path = self.save_model(outputs.last_model_name(args), steps=self.global_step, epoch=self.num_epochs)
        self.accelerator.end_training()
        self.reporter.summary(steps=self.global_step, output_file=str(path), device=self.device)
        return path


# --- helpers ------------------------------------------------------------------------------------------------


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """`key=value` items of --network_args (split at the first '=')."""
    parsed: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise AnimaError(f"--network_args {item!r}: expected key=value")
        key, value = item.split("=", 1)
        parsed[key.strip()] = value.strip()
    return parsed
