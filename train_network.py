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
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from library.data.metadata import group_metadata
from library.errors import AnimaError
from library.io import files
from library.training import outputs
from library.training.distributed import TrainingModule, process_group_kwargs, uses_module_dropout
from library.training.losses import huber_threshold, per_sample_loss
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
from library.training.state import NETWORK_STATE_FILE, read_train_state, write_train_state
from networks import import_network_module
from networks.lora_format import load_lora_file

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NetworkTrainer:
    """Template of a LoRA training run. Subclasses implement the hooks marked "model hook"."""

    # ---------------------------------------------------------------------------------------------------------
    # Model hooks

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
        """Model hook: move the frozen denoiser to the device (block swap keeps part of it in CPU memory)."""
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
                              text: dict[str, torch.Tensor], weight_dtype: torch.dtype
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model hook: returns (prediction, target, sigmas [B], loss weighting [B])."""
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
        if args.cache_only:
            self.write_caches_only(args)
            return None
        self.build_datasets(args)
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
        """Session id, start time, seed."""
        self.session_id = random.randint(0, 2**32)
        self.training_started_at = time.time()
        if args.seed is None:
            args.seed = random.randint(0, 2**32 - 1)

    def check_inputs(self, args: argparse.Namespace) -> None:
        """Fail in seconds, before images are scanned, models loaded or caches written: the model files (headers
        only), the --resume folder, and the network (--network_args, --network_weights, --base_weights) built
        on weightless copies of the models."""
        if args.resume:
            read_train_state(Path(args.resume))
        if not args.cache_only:
            files.check_writable_dir(args.output_dir, "--output_dir")
        if args.logging_dir and args.log_with:
            files.check_writable_dir(args.logging_dir, "--logging_dir")
        dit, text_encoders = self.inspect_models(args)
        if not args.cache_only:
            logging.disable(logging.WARNING)  # the real build logs the same lines again
            try:
                self.build_network(args, dit, text_encoders, merge_base_weights=False).remove_hooks()
            finally:
                logging.disable(logging.NOTSET)
        # One run per output: a second run on the same --output_dir/--output_name stops here, before any work.
        self.output_lock = outputs.claim_output(args)

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
        self.vae_dtype = torch.float32 if args.no_half_vae else self.weight_dtype

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
            self.dit.enable_gradient_checkpointing(cpu_offload=args.cpu_offload_checkpointing,
                                                   unsloth_offload=args.unsloth_offload_checkpointing)
            for te in text_encoders if train_te else []:
                if hasattr(te, "gradient_checkpointing_enable"):
                    te.gradient_checkpointing_enable()
        if args.full_fp16 or args.full_bf16:
            network.to(self.weight_dtype)
        self.network = network
        self.train_te = train_te
        self.train_dit = train_dit

    def create_optimizer(self, args: argparse.Namespace) -> None:
        """Parameter groups (per component / LoRA+), optimizer, data loader, step counts, LR scheduler."""
        from library.data.config import make_dataloader
        from library.training.optimizers import create_optimizer, install_fused_backward_pass, is_schedule_free
        from library.training.schedulers import create_lr_scheduler, resolve_lr_scheduler_name

        component_lrs = {name: getattr(args, f"{name}_lr")
                         for name in ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter")}
        groups, descriptions = self.network.prepare_optimizer_params(
            args.text_encoder_lr, args.unet_lr, args.learning_rate, component_lrs)
        trained = {id(p) for g in groups for p in g["params"]}
        for p in self.network.parameters():
            p.requires_grad_(id(p) in trained)  # lr 0 groups were dropped: their parameters stay frozen
        if not trained:
            raise AnimaError("no LoRA parameter is trained: every learning rate is 0 or no module matched")
        self.trainable_params = [p for p in self.network.parameters() if p.requires_grad]
        self.lr_descriptions = descriptions
        optimizer_name, optimizer_args_text, optimizer = create_optimizer(
            args.optimizer_type, groups, args.learning_rate, args.optimizer_args,
            use_8bit_adam=args.use_8bit_adam, use_lion_optimizer=args.use_lion_optimizer)
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

        # Steps per epoch are counted per process after sharding.
        batches = math.ceil(len(self.train_loader) / self.accelerator.num_processes)
        self.steps_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * self.steps_per_epoch
            logger.info("--max_train_epochs %d -> %d steps", args.max_train_epochs, args.max_train_steps)
        self.num_epochs = math.ceil(args.max_train_steps / self.steps_per_epoch)
        if args.save_n_epoch_ratio:
            args.save_every_n_epochs = max(1, self.num_epochs // args.save_n_epoch_ratio)
        self.train_group.set_max_train_steps(args.max_train_steps)

        self.optimizer = optimizer
        # Stepped once per optimizer step on every process, so its length is --max_train_steps.
        self.lr_scheduler = create_lr_scheduler(
            resolve_lr_scheduler_name(args.lr_scheduler, optimizer, args.learning_rate), optimizer,
            args.max_train_steps, args.lr_warmup_steps, num_decay_steps=args.lr_decay_steps,
            num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power,
            timescale=args.lr_scheduler_timescale, min_lr_ratio=args.lr_scheduler_min_lr_ratio,
            scheduler_type=args.lr_scheduler_type, scheduler_args=args.lr_scheduler_args)
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

    def resume(self, args: argparse.Namespace) -> None:
        """Restore network, optimizer, scheduler, RNG and counters from `--resume`."""
        self.global_step = 0
        self.first_epoch = 0
        self.skip_batches = 0
        if not args.resume:
            if args.initial_epoch or args.initial_step:
                self.apply_initial_step(args, 0)
            return
        folder = Path(args.resume)
        state = read_train_state(folder)
        self.load_state(folder)
        self.global_step = state["global_step"]
        self.first_epoch = state["current_epoch"]
        self.skip_batches = state["epoch_step"]
        logger.info("resumed from %s: epoch %d, step %d", folder, self.first_epoch, self.global_step)
        if args.initial_epoch or args.initial_step:
            logger.warning("--initial_step/--initial_epoch override the step stored in %s", folder)
            self.apply_initial_step(args, self.global_step)
        if self.global_step >= args.max_train_steps:
            raise AnimaError(f"--resume {folder}: already at step {self.global_step} of --max_train_steps "
                             f"{args.max_train_steps}; raise --max_train_steps or --max_train_epochs")

    def apply_initial_step(self, args: argparse.Namespace, default: int) -> None:
        step = default
        if args.initial_step is not None:
            step = args.initial_step
        elif args.initial_epoch is not None:
            step = (args.initial_epoch - 1) * self.steps_per_epoch
        if step >= args.max_train_steps:
            raise AnimaError(f"--initial_step {step} must be below --max_train_steps {args.max_train_steps}")
        self.global_step = step
        self.first_epoch = step // self.steps_per_epoch
        in_epoch_steps = step - self.first_epoch * self.steps_per_epoch
        # Only with --skip_until_initial_step is the data actually skipped; otherwise the epoch starts fresh.
        self.skip_batches = in_epoch_steps * args.gradient_accumulation_steps if args.skip_until_initial_step else 0

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
        init_trackers(accelerator, args)
        self.reporter = TrainingReporter(total_steps=args.max_train_steps, initial_step=self.global_step,
                                         is_main_process=self.is_main, accelerator=accelerator)
        self.reporter.message(
            f"training: {self.train_group.num_train_images} images, {len(self.train_loader)} batches per epoch "
            f"per process, {self.num_epochs} epochs, {args.max_train_steps} steps, "
            f"{accelerator.num_processes} process(es), grad accumulation {args.gradient_accumulation_steps}"
        )
        self.last_epoch = self.first_epoch
        self.optimizer_train_mode()
        if args.sample_at_first and self.global_step == 0:
            self.run_sampling(epoch=0, step=0)
        try:
            for epoch in range(self.first_epoch, self.num_epochs):
                if self.global_step >= args.max_train_steps:
                    break
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
                for batch in loader:
                    epoch_batches += 1
                    loss = self.train_step(args, batch)
                    if not accelerator.sync_gradients:
                        continue
                    self.global_step += 1
                    self.train_group.set_current_step(self.global_step)
                    step_in_epoch = math.ceil(epoch_batches / args.gradient_accumulation_steps) - 1
                    logs = lr_logs(self.lr_scheduler, self.lr_descriptions, self.optimizer)
                    if args.scale_weight_norms:
                        logs.update(self.max_norm_logs)
                    # The loss stays on the device: the reporter reads it with other steps' (no sync per step).
                    self.reporter.train_step(self.global_step, epoch + 1, step_in_epoch, loss, logs)
                    self.after_step(args, epoch, epoch_batches)
                    if self.global_step >= args.max_train_steps:
                        break
                self.reporter.epoch_scalars(self.global_step, epoch + 1,
                                            {"loss/epoch_average": self.reporter.epoch_average()})
                self.after_epoch(args, epoch + 1)
        finally:
            self.reporter.close()
        accelerator.wait_for_everyone()

    def train_step(self, args: argparse.Namespace, batch: dict) -> torch.Tensor:
        """One micro-batch: forward, backward (DDP averages the gradients on sync steps); on sync steps clip,
        optimizer and scheduler step. Returns the loss averaged over processes, a 0-dim float32 tensor on the
        device (not read here)."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.training_model):
            loss = self.training_model(self.batch_loss, args, batch, training=True)
            accelerator.backward(loss)
            # With --fused_backward_pass the hooks already clipped and stepped every parameter during backward.
            if self.fused_backward is None:
                if accelerator.sync_gradients:
                    if args.max_grad_norm:
                        accelerator.clip_grad_norm_(self.trainable_params, args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                self.lr_scheduler.step()
        if args.scale_weight_norms and accelerator.sync_gradients:
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
            pred, target, sigmas, weighting = self.noise_pred_and_target(args, self.accelerator, latents, text,
                                                                         self.weight_dtype)
            huber_c = (huber_threshold(args.huber_schedule, sigmas, args.huber_c, args.huber_scale)
                       if args.loss_type in ("huber", "smooth_l1") else None)
            mask = batch.get("loss_masks")  # [B, 1, H, W] alpha / conditioning masks, or None
            # The loader pins batches on CUDA: non_blocking copies queue behind the step instead of waiting.
            loss = per_sample_loss(pred, target, args.loss_type, huber_c=huber_c, weighting=weighting,
                                   mask=mask.to(pred.device, non_blocking=True) if mask is not None else None,
                                   sample_weights=batch["loss_weights"].to(pred.device, non_blocking=True))
            return loss.mean()

    def mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of `value` over processes: a 0-dim float32 tensor on the device (a collective, no host read)."""
        value = value.detach().float().mean()
        if self.accelerator.num_processes > 1:
            value = self.accelerator.reduce(value.reshape(1), reduction="mean").reshape(())
        return value

    def after_step(self, args: argparse.Namespace, epoch: int, epoch_batches: int) -> None:
        """Step-triggered sampling, checkpoint, state and validation."""
        step = self.global_step
        if args.sample_every_n_steps and not args.sample_every_n_epochs and step % args.sample_every_n_steps == 0:
            self.run_sampling(epoch=None, step=step)
        if args.save_every_n_steps and step % args.save_every_n_steps == 0 and step < args.max_train_steps:
            self.save_model(outputs.step_model_name(args, step), steps=step, epoch=epoch)
            self.prune(outputs.step_model_name, outputs.step_to_prune(step, args.save_every_n_steps,
                                                                    args.save_last_n_steps))
            if args.save_state:
                self.save_state(outputs.step_state_name(args, step), epoch=epoch, epoch_batches=epoch_batches)
                keep = args.save_last_n_steps_state or args.save_last_n_steps
                self.prune(outputs.step_state_name, outputs.step_to_prune(step, args.save_every_n_steps, keep))
        if self.val_loader is not None and args.validate_every_n_steps and step % args.validate_every_n_steps == 0:
            self.validate(args)

    def after_epoch(self, args: argparse.Namespace, epoch: int) -> None:
        """Epoch-triggered validation, checkpoint (never for the final epoch), state and sampling."""
        if self.val_loader is not None and (
                (args.validate_every_n_epochs and epoch % args.validate_every_n_epochs == 0)
                or (not args.validate_every_n_epochs and not args.validate_every_n_steps)):
            self.validate(args)
        if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and epoch < self.num_epochs:
            self.save_model(outputs.epoch_model_name(args, epoch), steps=self.global_step, epoch=epoch)
            self.prune(outputs.epoch_model_name, outputs.epoch_to_prune(epoch, args.save_every_n_epochs,
                                                                      args.save_last_n_epochs))
            if args.save_state:
                self.save_state(outputs.epoch_state_name(args, epoch), epoch=epoch, epoch_batches=0)
                keep = args.save_last_n_epochs_state or args.save_last_n_epochs
                self.prune(outputs.epoch_state_name, outputs.epoch_to_prune(epoch, args.save_every_n_epochs, keep))
        if args.sample_every_n_epochs and epoch % args.sample_every_n_epochs == 0:
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
        rng = _rng_state()
        torch.manual_seed(seed)
        random.seed(seed)
        losses = []  # device tensors, read once after the loop
        try:
            for i, batch in enumerate(self.val_loader):
                if args.max_validation_steps is not None and i >= args.max_validation_steps:
                    break
                losses.append(self.mean_over_processes(self.batch_loss(args, batch, training=False)))
        finally:
            _set_rng_state(rng)
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
            is_safetensors = path.suffix == ".safetensors"
            # save_weights writes atomically (temp file + rename).
            self.network.save_weights(str(path), self.save_dtype, metadata if is_safetensors else None,
                                      lora_format=self.args.lora_format)
            self.reporter.message(f"saved {path}")

    def prune(self, name_of: Callable[[argparse.Namespace, int], str], number: int | None) -> None:
        """Remove the checkpoint `name_of(args, number)` that left its keep window (None: nothing to remove)."""
        if self.is_main and number is not None:
            path = Path(self.args.output_dir) / name_of(self.args, number)
            if path.exists():
                files.remove_path(path)
                self.reporter.message(f"removed old checkpoint {path}")
        self.accelerator.wait_for_everyone()

    def save_state(self, folder_name: str, *, epoch: int, epoch_batches: int) -> None:
        """Training state folder: network weights, optimizer, scheduler, RNG of every process, counters."""
        with self.optimizer_eval_mode(), self.reporter.excluded("saving"):
            self.write_state(Path(self.args.output_dir) / folder_name, epoch=epoch, epoch_batches=epoch_batches)

    def write_state(self, path: Path, *, epoch: int, epoch_batches: int) -> None:
        rng = _rng_state()
        gathered = _gather_objects(self.accelerator, rng)
        if self.is_main:
            def write(tmp: Path) -> None:
                import safetensors.torch

                weights = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
                safetensors.torch.save_file(weights, str(tmp / NETWORK_STATE_FILE))
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
                for rank, state in enumerate(gathered):
                    torch.save(state, tmp / f"rng_{rank}.pt")
                write_train_state(tmp, epoch=epoch, global_step=self.global_step, epoch_step=epoch_batches)

            files.atomic_write_dir(path, write)
            self.reporter.message(f"saved state {path}")
        self.accelerator.wait_for_everyone()

    def load_state(self, folder: Path) -> None:
        import safetensors.torch

        needed = [NETWORK_STATE_FILE, "optimizer.pt", "scheduler.pt"]
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise AnimaError(f"--resume {folder}: missing {', '.join(missing)}; give a folder written by --save_state")
        weights = safetensors.torch.load_file(str(folder / NETWORK_STATE_FILE),
                                              device=str(self.device))
        result = self.network.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise AnimaError(f"--resume {folder}: the saved network does not match this one "
                             f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); "
                             "use the same --network_dim/--network_args as the saved run")
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        rng_file = folder / f"rng_{self.accelerator.process_index}.pt"
        if rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=True))

    def save_final(self, args: argparse.Namespace) -> Path:
        epoch = self.num_epochs
        if args.save_state or args.save_state_on_train_end:
            self.save_state(outputs.last_state_name(args), epoch=epoch, epoch_batches=0)
        path = self.save_model(outputs.last_model_name(args), steps=self.global_step, epoch=epoch)
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


def _rng_state() -> dict[str, Any]:
    """RNG states as plain tensors/lists (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_objects(accelerator: Accelerator, obj: Any) -> list[Any]:
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out
