"""Train a LoRA for Anima: `accelerate launch anima_train_network.py --pretrained_model_name_or_path ... `.

`AnimaNetworkTrainer` fills the model hooks of `train_network.NetworkTrainer`: loading the DiT, Qwen3 and
the Qwen-Image VAE, caption encoding (live or cached), latent encoding, the flow-matching step and sampling.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from library.data.config import debug_dataset_main, text_encoder_batch_size
from library.data.latent_cache import cache_group_latents
from library.data.text_cache import cache_group_text
from library.errors import AnimaError
from library.training import flow_matching
from library.training.args import handle_output_config, parse_args, require_training_inputs
from library.training.losses import ModelOutput
from library.training.reporting import logger, setup_console_logging
from train_network import NetworkTrainer

ANIMA_METADATA_ARGS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "timestep_sampling",
                       "sigmoid_scale", "discrete_flow_shift")


# A DiT at least this large is the released 2B model (or one of its size): fp32 GEMMs without TF32 cost minutes.
LARGE_DIT_PARAMETERS = 10**9


def slow_precision_warning(device: torch.device, weight_dtype: torch.dtype, num_parameters: int,
                           native_bf16: bool = True) -> str | None:
    """The warning for a CUDA run whose precision leaves the GPU's tensor cores idle when training a large DiT, or
    None. `native_bf16`: whether the GPU has bf16 (and TF32) tensor cores (compute capability 8.0 and newer).

    Without them (Volta, Turing) bf16 is emulated and float32 runs on the plain cores: fp16, which their tensor
    cores do run, is the fast choice (the DiT keeps its hidden states in float32 under fp16). With them, float32
    without TF32 is the slow one (about 10x slower than bf16)."""
    if device.type != "cuda" or num_parameters < LARGE_DIT_PARAMETERS:
        return None
    size = f"{num_parameters / 1e9:.1f}B-parameter DiT"
    if not native_bf16:
        if weight_dtype == torch.float16:
            return None
        name = "bf16 (emulated here)" if weight_dtype == torch.bfloat16 else "float32"
        return (f"training the {size} in {name} on a GPU without bf16/TF32 tensor cores (compute capability below "
                "8.0): many times slower than fp16; use --mixed_precision fp16 (its hidden states stay float32)")
    if weight_dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32:
        return None
    return (f"training the {size} in float32 (--mixed_precision no) without TF32: float32 matmuls run without "
            "tensor cores, many times slower than bf16; use --mixed_precision bf16, or add --cuda_allow_tf32 to "
            "keep float32 weights with TF32 matmuls")


def file_identity(path: str, dtype: torch.dtype) -> str:
    """Cheap identity of a weights file for cache validity: path, size, mtime and the compute dtype."""
    stat = os.stat(path)
    return f"{os.path.abspath(path)}|{stat.st_size}|{int(stat.st_mtime)}|{dtype}"


class AnimaNetworkTrainer(NetworkTrainer):
    """The Anima hooks: Qwen3 + T5-id conditioning through the LLM adapter, Qwen-Image VAE latents."""

    # --self_attn_lr, --cross_attn_lr, ...: the DiT's attention, MLP and modulation layers and the LLM adapter.
    component_lr_names = ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter")

    def __init__(self) -> None:
        self.text_encoding: Any = None
        self.vae: torch.nn.Module | None = None
        self.sample_prompt_encoder: Any = None
        self.tokenizer: Any = None  # found by the input check, reused when the text encoder loads

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE runs in float32 with --no_half_vae, else in the weight dtype."""
        return torch.float32 if self.args.no_half_vae else self.weight_dtype

    # --- models -----------------------------------------------------------------------------------------------

    def inspect_models(self, args: argparse.Namespace) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
        from library.models.attention import check_attn_mode
        from library.models.dit_loading import load_anima_model
        from library.models.qwen3 import load_qwen3_text_encoder
        from library.models.vae import load_vae

        if not args.cache_only:  # the attention back-end is installed (the flag values were checked at parsing)
            check_attn_mode(args.attn_mode, training=True)
        meta = torch.device("meta")  # headers only: names, shapes and configs are checked, no weight is read
        dit = load_anima_model(args.pretrained_model_name_or_path, device=meta, attn_mode=args.attn_mode,
                               split_attn=args.split_attn, llm_adapter_path=args.llm_adapter_path)
        load_vae(args.vae, device=meta, chunk_size=args.vae_chunk_size)
        text_encoder = load_qwen3_text_encoder(args.qwen3, device=meta, dtype=torch.float32)
        self.tokenizer = self.load_tokenizer(args)
        return dit, [text_encoder]

    def load_tokenizer(self, args: argparse.Namespace) -> Any:
        """The Qwen3 + T5 tokenizer pair (from the flags, the Qwen3 folder or the hub cache)."""
        from library.models.tokenizers import AnimaTokenizer, load_qwen3_tokenizer, load_t5_tokenizer

        return AnimaTokenizer(
            load_qwen3_tokenizer(qwen3_path=args.qwen3, tokenizer_path=args.qwen3_tokenizer_path),
            load_t5_tokenizer(args.t5_tokenizer_path), args.qwen3_max_token_length, args.t5_max_token_length)

    def load_frozen_models(self, args: argparse.Namespace, groups: list[Any]) -> list[torch.nn.Module]:
        self.text_encoding = self.load_text_encoding(args)
        text_encoder = self.text_encoding.text_encoder
        self.vae, self.vae_identity = self.load_vae(args)
        if args.cache_latents:
            self.cache_latents(args, groups)
        if args.cache_text_encoder_outputs:
            self.cache_text_encoder_outputs(args, groups)
            self.text_encoding = None  # every batch brings its encoding; the trainer frees the encoder
        return [text_encoder]

    def write_caches_only(self, args: argparse.Namespace) -> None:
        from library.data.config import cache_only_main

        cache_only_main(args, load_vae=lambda: self.load_vae(args),
                        load_text_encoding=lambda: self.load_text_encoding(args), is_main_process=self.is_main)

    def load_text_encoding(self, args: argparse.Namespace) -> Any:
        """Tokenizers + Qwen3 on the device, wrapped in the encoding object the caches and the loop use."""
        from library.models.qwen3 import AnimaTextEncoding, load_qwen3_text_encoder

        tokenizer = self.tokenizer or self.load_tokenizer(args)
        text_encoder = load_qwen3_text_encoder(args.qwen3, device=self.device, dtype=self.weight_dtype)
        return AnimaTextEncoding(tokenizer, text_encoder, self.device, self.weight_dtype)

    def load_vae(self, args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
        """The VAE on the device and the identity string that ties latent caches to it."""
        from library.models.vae import LATENT_NORMALISATION, load_vae

        vae = load_vae(args.vae, device=self.device, dtype=self.vae_dtype, chunk_size=args.vae_chunk_size,
                       disable_cache=args.vae_disable_cache)
        identity = f"{file_identity(args.vae, self.vae_dtype)}|chunk{args.vae_chunk_size}|{LATENT_NORMALISATION}"
        return vae, identity

    def load_dit(self, args: argparse.Namespace) -> torch.nn.Module:
        from library.models.dit_loading import load_anima_model

        # With block swap the DiT stays in CPU memory until `place_dit` streams part of it to the device; with
        # --fp8_base until `place_dit` has stored its block projections in float8.
        device = torch.device("cpu") if args.blocks_to_swap or args.fp8_base else self.device
        dit = load_anima_model(args.pretrained_model_name_or_path, device=device, dtype=self.weight_dtype,
                               attn_mode=args.attn_mode, split_attn=args.split_attn,
                               llm_adapter_path=args.llm_adapter_path)
        native_bf16 = self.device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
        warning = slow_precision_warning(self.device, self.weight_dtype, sum(p.numel() for p in dit.parameters()),
                                         native_bf16)
        if warning:
            logger.warning(warning)
        return dit

    def place_dit(self, args: argparse.Namespace) -> None:
        from library.training.args import compile_options

        device = self.device
        if args.gradient_checkpointing:
            self.dit.enable_gradient_checkpointing(cpu_offload=args.cpu_offload_checkpointing,
                                                   unsloth_offload=args.unsloth_offload_checkpointing)
        blocks_to_swap = self.plan_block_swap(args, device) if args.blocks_to_swap == "auto" else args.blocks_to_swap
        if args.fp8_base:
            from library.models.fp8 import quantize_linear_weights

            # After --base_weights were merged into the bf16 weights and the LoRA hooks attached.
            names = quantize_linear_weights(self.dit)
            logger.info("--fp8_base: %d DiT block projections stored in float8_e4m3fn", len(names))
        if not blocks_to_swap:
            self.dit.to(device)
        else:
            # After --base_weights were merged: the swapper keeps a CPU copy of every block's weights from here on.
            self.dit.enable_block_swap(blocks_to_swap, device)
            self.dit.move_to_device_except_swap_blocks(device)
            self.dit.prepare_block_swap_before_forward()
        options = compile_options(args)
        if options is not None:
            logger.info("compiling each DiT block with torch.compile (%s)",
                        ", ".join(f"{k}={v}" for k, v in options.items()))
            self.dit.compile_blocks(**options)

    def plan_block_swap(self, args: argparse.Namespace, device: torch.device) -> int:
        """`--blocks_to_swap auto`: the smallest swap count whose estimated training peak fits the free device
        memory (see `library.models.block_swap.TrainingMemory.peak_bytes`), for the largest bucket x batch size."""
        from library.models import block_swap
        from library.training.memory import checkpointing_mode

        free = block_swap.device_free_bytes(device)
        if free is None:
            logger.info("--blocks_to_swap auto: %s has no free-memory query (not CUDA); swapping no block",
                        device)
            return 0
        datasets = [d for group in self.groups() for d in group.datasets]
        # Image tokens x batch of the largest batch: 16 pixels per token side (VAE 8x, 2x2 patches).
        batch, tokens = max(((d.config.batch_size, (w // 16) * (h // 16)) for d in datasets
                             for (w, h) in d.bucket_sizes), key=lambda bt: bt[0] * bt[1])
        memory = block_swap.dit_training_memory(
            self.dit, batch_size=batch, tokens=tokens, context_tokens=args.t5_max_token_length,
            adapter_context_tokens=args.qwen3_max_token_length, fp8=bool(args.fp8_base),
            trainable_bytes=sum(p.numel() * p.element_size() for p in self.network.parameters()),
            compute_dtype=self.weight_dtype)
        checkpointing = checkpointing_mode(args)
        plan = block_swap.plan_blocks_to_swap(memory, free, checkpointing)
        message = (f"{plan.describe()} (batch {batch} x {tokens} image tokens, checkpointing {checkpointing}, "
                   f"fp8 {bool(args.fp8_base)})")
        (logger.info if plan.fits else logger.warning)(message)
        return plan.blocks_to_swap

    def reset_dit_layout(self) -> None:
        self.dit.prepare_block_swap_before_forward()

    # --- caches -----------------------------------------------------------------------------------------------

    def cache_latents(self, args: argparse.Namespace, groups: list[Any]) -> None:
        # The main process encodes (and writes disk caches) first; the others then reuse the files.
        accelerator = self.accelerator
        with accelerator.main_process_first():
            for group in groups:
                cache_group_latents(group, self.vae, self.vae_identity, batch_size=args.vae_batch_size,
                                    to_disk=args.cache_latents_to_disk, skip_check=args.skip_cache_check,
                                    is_main_process=accelerator.is_main_process)

    def cache_text_encoder_outputs(self, args: argparse.Namespace, groups: list[Any]) -> None:
        accelerator = self.accelerator
        with accelerator.main_process_first(), torch.no_grad():
            for group in groups:
                cache_group_text(group, self.text_encoding, batch_size=text_encoder_batch_size(args, group),
                                 to_disk=args.cache_text_encoder_outputs_to_disk, skip_check=args.skip_cache_check,
                                 is_main_process=accelerator.is_main_process)
        if args.sample_prompts and accelerator.is_main_process:
            # Encode the sample prompts now: the text encoder is freed before training.
            from library.training.sampling import CachedPromptEncodings, load_sample_prompts

            self.sample_prompt_encoder = CachedPromptEncodings.from_encoder(
                self.text_encoding, load_sample_prompts(args.sample_prompts))

    # --- one step ---------------------------------------------------------------------------------------------

    def model_output(self, args: argparse.Namespace, batch: dict, train_text_encoder: bool) -> ModelOutput:
        latents = self.batch_latents(batch)
        with torch.set_grad_enabled(train_text_encoder):
            text = self.batch_text(batch, train_text_encoder)
        return self.noise_pred_and_target(args, latents, text)

    def batch_latents(self, batch: dict) -> torch.Tensor:
        """Latents of a batch, from the cache or encoded live: [B, 16, h, w], float32 from the cache, the VAE's
        dtype when encoded live (as sd-scripts keeps them: the noise ε is drawn in this dtype, and the target
        ε − x0 is not rounded through a 16-bit weight dtype; only the DiT's input is)."""
        device = self.device
        if batch.get("latents") is not None:
            # non_blocking: the loader pins its batches on CUDA, so the copy does not stall the host.
            return batch["latents"].to(device=device, non_blocking=True)  # [B, 16, h, w]
        with torch.no_grad():
            pixels = batch["images"].to(device=device, dtype=self.vae_dtype, non_blocking=True)  # [B, 3, H, W]
            # The dataset scales every image to [-1, 1]: no range check (it would read the device every step).
            latents = self.vae.encode_pixels_to_latents(pixels, check_range=False)
        # NaN (a VAE overflow) becomes 0; whether there was any is read with the step's one read, not here.
        nan = torch.isnan(latents)
        message = f"NaN in VAE latents of {list(batch.get('image_keys') or [])}; replaced by 0"
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.warn_if(nan.any(), message)
        elif nan.any():  # before training starts (no reporter yet): read now
            logger.warning(message)
        return torch.where(nan, torch.zeros((), dtype=latents.dtype, device=latents.device), latents)

    def batch_text(self, batch: dict, train_text_encoder: bool) -> dict[str, torch.Tensor]:
        """Text conditioning of a batch, from the cache or encoded live (with gradients for the Qwen3 LoRA)."""
        device = self.device
        if batch.get("text") is not None:
            text = batch["text"]  # cached; caption dropout already swapped in the empty-caption encoding
        elif self.text_encoding is not None:
            # Live encoding: keep the graph only when the Qwen3 LoRA trains; stay on the training device.
            tokens = self.text_encoding.tokenizer(list(batch["captions"]))
            with torch.set_grad_enabled(train_text_encoder):
                text = self.text_encoding.encode_tokens(tokens, output_device=device)
        else:
            raise AnimaError("a batch without cached text outputs reached training after the text encoder was "
                             "freed; delete stale *_anima_te.npz files or drop --cache_text_encoder_outputs")
        return {k: v.to(device, non_blocking=True) for k, v in text.items()}

    def noise_pred_and_target(self, args: argparse.Namespace, latents: torch.Tensor,
                              text: dict[str, torch.Tensor]) -> ModelOutput:
        """latents x0 [B, 16, h, w] -> velocity prediction, target ε − x0, σ [B], loss weight [B]."""
        batch_size, weight_dtype = latents.shape[0], self.weight_dtype
        # sd-scripts' draw order: ε (in the latents' dtype), σ, then the ip_noise_gamma draws.
        noise = flow_matching.training_noise(latents)
        sigmas, timesteps = flow_matching.training_noise_levels(
            batch_size, args.timestep_sampling, sigmoid_scale=args.sigmoid_scale,
            discrete_flow_shift=args.discrete_flow_shift, weighting_scheme=args.weighting_scheme,
            logit_mean=args.logit_mean, logit_std=args.logit_std, mode_scale=args.mode_scale,
            latent_size=tuple(latents.shape[-2:]), min_timestep=args.min_timestep, max_timestep=args.max_timestep,
            weight_dtype=weight_dtype, device=latents.device,
        )
        noisy = flow_matching.noisy_input(latents, noise, sigmas, weight_dtype, ip_noise_gamma=args.ip_noise_gamma,
                                          ip_noise_gamma_random_strength=args.ip_noise_gamma_random_strength)
        with self.model_autocast():
            context = self.dit.encode_text(text["qwen3_embeds"].to(weight_dtype), text["qwen3_mask"],
                                           text["t5_ids"], text["t5_mask"])
            pred = self.dit(noisy.unsqueeze(2), timesteps, context)  # [B, 16, 1, h, w]
        target = flow_matching.velocity_target(latents.float(), noise.float())
        weighting = flow_matching.loss_weighting(args.weighting_scheme, sigmas)
        return ModelOutput(prediction=pred.squeeze(2), target=target, sigmas=sigmas, weighting=weighting)

    # --- sampling and metadata --------------------------------------------------------------------------------

    def sample_images(self, args: argparse.Namespace, epoch: int | None, step: int) -> list[tuple[Path, str]]:
        from library.training.sampling import generate_sample_images, load_sample_prompts

        encoder = self.sample_prompt_encoder or self.text_encoding
        if encoder is None:
            logger.warning("sample images skipped: no text encoder and no cached prompt encodings")
            return []
        try:
            prompts = load_sample_prompts(args.sample_prompts)  # read again: it may have been edited since
        except AnimaError as err:
            # Checked at start-up; a file removed or broken since then costs this sampling, not the run.
            logger.warning("sample images at step %d skipped: %s", step, err)
            return []
        dit = self.accelerator.unwrap_model(self.dit)
        dit.switch_block_swap_for_inference()  # forward-only swapping; a no-op without --blocks_to_swap
        try:
            written = generate_sample_images(
                dit, self.vae, encoder, prompts, output_dir=args.output_dir,
                output_name=args.output_name, step=step, epoch=epoch, device=self.device,
                autocast_dtype=self.weight_dtype if self.weight_dtype != torch.float32 else None, network=self.network,
            )
        finally:
            dit.switch_block_swap_for_training()
        return [(path, prompt.prompt) for path, prompt in written]

    def update_metadata(self, metadata: dict[str, str], args: argparse.Namespace) -> None:
        for name in ANIMA_METADATA_ARGS:
            metadata[f"ss_{name}"] = str(getattr(args, name))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: bad input ends with one `error: ...` line and exit code 2."""
    try:
        written = handle_output_config(argv)
        if written is not None:
            print(f"wrote {written}")
            return 0
        args, warnings = parse_args(argv)
        setup_console_logging(args.console_log_level, args.console_log_file, args.console_log_simple)
        for warning in warnings:
            logger.warning(warning)
        if args.debug_dataset:
            # Show what the data pipeline yields and stop: no models are loaded, nothing is written.
            debug_dataset_main(args)
            return 0
        require_training_inputs(args)
        trainer = AnimaNetworkTrainer()
        try:
            trainer.train(args)
        finally:
            trainer.release_output()
    except AnimaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Saves are atomic, so every file already in --output_dir is complete. With --save_state the trainer
        # finished the step and saved a state of it; its folder is the exception's argument.
        if exc.args:
            print(f"error: interrupted (Ctrl-C); the state of the last step is saved in {exc.args[0]}; continue "
                  f"with --resume {exc.args[0]}", file=sys.stderr)
        else:
            print("error: interrupted (Ctrl-C); the LoRA files and states saved so far are complete; continue with "
                  "--resume <a *-state folder> if --save_state was on", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

