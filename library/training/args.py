"""Command-line flags of the trainer (everything except the dataset flags), TOML config files, validation.

Flag names and defaults follow sd-scripts so existing command lines and `--config_file` TOMLs keep working.
`parse_args(argv)` is the single entry point: it builds the parser, merges `--config_file`, normalises
aliases and runs `validate_args`, which raises `AnimaError` (one line naming the flags) for combinations that
cannot work and returns warnings for flags that have no effect.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from library.data.config import add_dataset_arguments, normalize_dataset_args
from library.errors import AnimaError, OneLineErrorParser
from library.io.files import atomic_write, restore_interrupted_dir
from library.models.attention import ATTN_MODE_CHOICES
from library.models.block_swap import max_blocks_to_swap
from library.models.dit import GRAPHS_PER_BLOCK, ONE_GRAPH_FOR_ALL_BLOCKS_SINCE, AnimaConfig
from library.models.offload_checkpointing import checkpoint_offload_mode
from library.training.flow_matching import TIMESTEP_SAMPLING_METHODS, WEIGHTING_SCHEMES, check_flow_matching_options
from library.training.losses import HUBER_SCHEDULES, LOSS_TYPES, check_loss_options
from library.training.optimizers import (
    check_full_fp16_optimizer,
    check_fused_backward_pass,
    optimizer_type_names,
    resolve_optimizer_type,
)
from library.training.outputs import MODEL_SPEC_TEXT_FIELDS, thumbnail_data_url
from library.training.schedulers import LR_SCHEDULERS, NO_WARMUP_SCHEDULERS, check_no_warmup, parse_int_or_float
from networks import LYCORIS_MODULE
from networks.lora_format import KIND_NAMES, LORA_FORMATS, SD_SCRIPTS_FORMAT
from networks.network_base import MODULE_FOR_KIND

GPU_ONLY = "[GPU only] "

# --mixed_precision: the autocast and frozen-model dtype; --save_precision: the dtype of the saved LoRA.
MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAVE_PRECISION_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

MAX_BLOCKS_TO_SWAP = max_blocks_to_swap(AnimaConfig().num_blocks)  # 26 for the 28-block DiT

# --log_with values: accelerate's tracker names (accelerate.utils.LoggerType), "all" last.
TRACKERS = ["tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio", "all"]

# Flags sd-scripts command lines carry that change nothing for Anima: accepted so those command lines run, and
# warned once when given (a value other than the default). name -> why it has no effect. The --help text of each
# flag and the list in docs/flags.md come from this table.
_SD_NOISE = "a Stable Diffusion noise tweak; sd-scripts' Anima trainer ignores it too"
_SD_SNR = "a loss option of the Stable Diffusion noise schedule; flow matching has no such schedule"
NO_EFFECT_FLAGS: dict[str, str] = {
    "v2": "a Stable Diffusion 2 option",
    "v_parameterization": "a Stable Diffusion option; Anima always predicts the flow velocity",
    "clip_skip": "a CLIP option; Anima's text encoder is Qwen3",
    "max_token_length": "a CLIP option; use --qwen3_max_token_length / --t5_max_token_length",
    "tokenizer_cache_dir": "tokenizers come from --qwen3 / --qwen3_tokenizer_path / --t5_tokenizer_path",
    "mem_eff_attn": "a Stable Diffusion attention option; choose the attention with --attn_mode",
    "noise_offset": _SD_NOISE,
    "noise_offset_random_strength": _SD_NOISE,
    "multires_noise_iterations": _SD_NOISE,
    "multires_noise_discount": _SD_NOISE,
    "adaptive_noise_scale": _SD_NOISE,
    "min_snr_gamma": _SD_SNR,
    "debiased_estimation_loss": _SD_SNR,
    "scale_v_pred_loss_like_noise_pred": _SD_SNR,
    "v_pred_like_loss": _SD_SNR,
    "zero_terminal_snr": _SD_SNR,
    "highvram": "in sd-scripts it skips freeing memory during latent caching; this trainer frees none there",
    "lowram": "in sd-scripts it keeps the VAE on the GPU while text outputs are cached; this trainer never moves "
              "models off the device for caching",
    "disable_mmap_load_safetensors": "model files are always read through safetensors' memory map (sd-scripts' "
                                     "Anima trainer ignores this flag too)",
    "sample_sampler": "sample images always use the flow-matching Euler sampler (sd-scripts' Anima trainer ignores "
                      "this flag too); euler and k_euler name that sampler and are accepted without a warning",
}
# --sample_sampler values that name the sampler actually used (no warning).
EULER_SAMPLERS = ("euler", "k_euler")


def no_effect_help(name: str) -> str:
    return f"no effect for Anima (warned): {NO_EFFECT_FLAGS[name]}"


# Keys never written by --output_config (secrets and the config flags themselves).
_NOT_SAVED_IN_CONFIG = {"config_file", "output_config", "wandb_api_key"}


# Step count or ratio ("123", "0.1", "10%"): one parser shared with the LR scheduler factory.
int_or_float = parse_int_or_float


def blocks_to_swap_value(text: str) -> int | str:
    """argparse type of --blocks_to_swap: a block count, or "auto" (planned from the free GPU memory)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a block count nor auto") from None


def _add(group: argparse._ActionsContainer, parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """Add `--name`; every flag has exactly one definition (the dataset flags come from library.data.config)."""
    if f"--{name}" in parser._option_string_actions:
        raise ValueError(f"--{name} is defined twice")
    group.add_argument(f"--{name}", **kwargs)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model files")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("pretrained_model_name_or_path", type=str, default=None,
      help="Anima DiT .safetensors (ComfyUI `net.` prefix accepted)")
    a("qwen3", type=str, default=None, help="Qwen3-0.6B text encoder: a Hugging Face folder or one .safetensors file")
    a("vae", type=str, default=None, help="Qwen-Image VAE .safetensors")
    a("llm_adapter_path", type=str, default=None,
      help="separate LLM adapter weights; default: the adapter inside the DiT file")
    a("qwen3_tokenizer_path", type=str, default=None,
      help="Qwen3 tokenizer folder; default: the --qwen3 folder if it holds the tokenizer, else downloaded once "
      "from the Hugging Face hub (first run needs network; point this flag at a local folder to avoid it)")
    a("t5_tokenizer_path", type=str, default=None,
      help="T5 tokenizer folder; default: downloaded once from the Hugging Face hub (first run needs network; "
      "point this flag at a local folder to avoid it)")
    a("tokenizer_cache_dir", type=str, default=None)
    a("v2", action="store_true")
    a("v_parameterization", action="store_true")
    a("disable_mmap_load_safetensors", action="store_true")


def _add_anima_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Anima training")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("timestep_sampling", choices=TIMESTEP_SAMPLING_METHODS, default="sigmoid", help="how sigma is drawn per sample")
    a("sigmoid_scale", type=float, default=1.0, help="scale of the normal draw in sigmoid/shift/flux_shift sampling")
    a("discrete_flow_shift", type=float, default=1.0,
      help="shift s in s*t/(1+(s-1)*t); used by `shift` and `sigma` sampling")
    a("weighting_scheme", choices=WEIGHTING_SCHEMES, default="uniform",
      help="loss weight (sigma_sqrt, cosmap); logit_normal/mode shape sigma only with --timestep_sampling sigma")
    a("logit_mean", type=float, default=0.0, help="mean of the logit_normal density")
    a("logit_std", type=float, default=1.0, help="std of the logit_normal density")
    a("mode_scale", type=float, default=1.29, help="scale of the `mode` density")
    a("qwen3_max_token_length", type=int, default=512, help="Qwen3 tokens: truncate and pad to this length")
    a("t5_max_token_length", type=int, default=512, help="T5 tokens: truncate and pad to this length")
    a("attn_mode", choices=ATTN_MODE_CHOICES, default=None,
      help="DiT attention: torch (default, alias sdpa); " + GPU_ONLY + "xformers (needs --split_attn), flash: "
      "GPU-only packages, verified only with stand-in kernels on CPU "
      "(tests/test_attention.py::test_package_modes_match_reference_with_and_without_mask), no GPU test yet; "
      "sageattn is inference only (rejected for training). Overrides --xformers")
    a("split_attn", action="store_true", help="run attention one sample at a time (less memory)")
    a("vae_chunk_size", type=int, default=None, help="spatial chunking inside the VAE (less memory)")
    a("vae_disable_cache", action="store_true", help="disable the VAE's causal-conv cache (less memory)")
    for component in ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter"):
        a(f"{component}_lr", type=float, default=None,
          help=f"learning rate of the {component} LoRA modules; 0 freezes them; default: the DiT learning rate")
    a("blocks_to_swap", type=blocks_to_swap_value, default=None,
      help=f"number of DiT blocks whose weights stay in CPU memory and are streamed to the GPU when needed "
      f"(1-{MAX_BLOCKS_TO_SWAP}, at most the block count - 2), or auto: the smallest count whose estimated peak "
      "(weights, activations for the largest bucket x batch, checkpointing mode, --fp8_base) fits the GPU's free "
      "memory, logged at start (0 without CUDA; planner tested on CPU with a fake budget, "
      "tests/test_block_swap.py::test_auto_plan_picks_the_smallest_swap_count_that_fits); saves GPU memory, "
      "costs speed; the host keeps a "
      "pinned copy of every block's weights (~3.6 GiB bf16 for the 2B DiT); excludes the offload checkpointing "
      "flags. Verified on CPU (synchronous copies); the CUDA side-stream path is GPU-only, covered by "
      "tests/test_block_swap.py::test_gpu_block_swap_matches_resident_model_on_cuda and "
      "tests/test_block_swap.py::test_gpu_block_swap_resident_weight_memory_drops_by_swapped_blocks "
      "(skipped without CUDA)")
    a("cpu_offload_checkpointing", action="store_true",
      help="gradient checkpointing that keeps the saved block inputs in CPU memory (blocking copies); implies "
      "--gradient_checkpointing. Verified on CPU; the CUDA path is GPU-only, covered by "
      "tests/test_offload_checkpointing.py::test_gpu_offload_checkpointing_matches_no_checkpointing_on_cuda and "
      "tests/test_offload_checkpointing.py::test_gpu_offload_checkpointing_frees_block_inputs_on_cuda "
      "(skipped without CUDA)")
    a("unsloth_offload_checkpointing", action="store_true",
      help="like --cpu_offload_checkpointing with asynchronous copies (side stream, pinned memory); implies "
      "--gradient_checkpointing. Verified on CPU (where the copies are synchronous); the asynchronous CUDA path is "
      "GPU-only, covered by "
      "tests/test_offload_checkpointing.py::test_gpu_offload_checkpointing_matches_no_checkpointing_on_cuda and "
      "tests/test_offload_checkpointing.py::test_gpu_offload_checkpointing_frees_block_inputs_on_cuda "
      "(skipped without CUDA)")


def _add_network_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network (LoRA)")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("network_module", type=str, default=None,
      help="network module to train: " + ", ".join(f"{module} ({KIND_NAMES[kind]})" for kind, module in MODULE_FOR_KIND.items())
      + f", {LYCORIS_MODULE} (LyCORIS, needs pip install lycoris-lora)")
    a("network_dim", type=int, default=None, help="LoRA rank (default 4)")
    a("network_alpha", type=float, default=1, help="LoRA alpha; scale = alpha / rank")
    a("network_dropout", type=float, default=None, help="dropout on the rank-r activations")
    a("network_args", type=str, default=None, nargs="*", help="extra network options as key=value")
    a("network_train_unet_only", action="store_true", help="train only the DiT LoRA")
    a("network_train_text_encoder_only", action="store_true", help="train only the Qwen3 LoRA")
    a("network_weights", type=str, default=None, help="LoRA weights to start from")
    a("dim_from_weights", action="store_true", help="take ranks/alphas from --network_weights")
    a("base_weights", type=str, default=None, nargs="*", help="LoRA files merged into the base model before training")
    a("base_weights_multiplier", type=float, default=None, nargs="*", help="multiplier per --base_weights file")
    a("scale_weight_norms", type=float, default=None, help="max-norm regularisation of each LoRA module")
    a("unet_lr", type=float, default=None, help="learning rate of the DiT LoRA (default --learning_rate)")
    a("text_encoder_lr", type=float, default=None, nargs="*",
      help="learning rate of the Qwen3 LoRA (default --learning_rate)")
    a("training_comment", type=str, default=None, help="stored as ss_training_comment")
    a("no_metadata", action="store_true", help="write only the minimal metadata into the LoRA file")
    a("save_model_as", choices=[None, "ckpt", "pt", "safetensors"], default="safetensors",
      help="LoRA file format (metadata only in safetensors)")
    a("lora_format", choices=LORA_FORMATS, default=SD_SCRIPTS_FORMAT,
      help="key names in the saved LoRA: sd-scripts (lora_unet_*) or comfy (diffusion_model.*, lora_A/lora_B)")


def _add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer and learning-rate schedule")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("optimizer_type", type=str, default="",
      help=f"AdamW (default), {', '.join(n for n in optimizer_type_names() if n != 'AdamW')}, a torch.optim class "
      "name or a dotted class path")
    a("use_8bit_adam", action="store_true", help="legacy alias of --optimizer_type AdamW8bit")
    a("use_lion_optimizer", action="store_true", help="legacy alias of --optimizer_type Lion")
    a("learning_rate", type=float, default=2.0e-6, help="base learning rate")
    a("max_grad_norm", type=float, default=1.0, help="clip the total gradient norm; 0 disables")
    a("optimizer_args", type=str, default=None, nargs="*", help="optimizer options as key=value")
    a("lr_scheduler", type=str, default="constant", help=", ".join(LR_SCHEDULERS))
    a("lr_scheduler_type", type=str, default="", help="custom scheduler class")
    a("lr_scheduler_args", type=str, default=None, nargs="*", help="scheduler options as key=value")
    a("lr_warmup_steps", type=int_or_float, default=0, help="warmup steps, or a ratio of total steps (0.1, 10%%)")
    a("lr_decay_steps", type=int_or_float, default=0, help="decay steps or ratio (warmup_stable_decay)")
    a("lr_scheduler_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    a("lr_scheduler_power", type=float, default=1, help="power of the polynomial scheduler")
    a("lr_scheduler_timescale", type=int, default=None, help="timescale of inverse_sqrt")
    a("lr_scheduler_min_lr_ratio", type=float, default=None, help="minimum LR ratio (cosine_with_min_lr, WSD)")
    a("fused_backward_pass", action="store_true",
      help="apply the optimizer step inside backward (Adafactor only, no gradient accumulation)")


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training loop")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("max_train_steps", type=int, default=1600, help="number of optimizer steps")
    a("max_train_epochs", type=int, default=None, help="number of epochs (overrides --max_train_steps)")
    a("train_batch_size", type=int, default=1, help="batch size per process")
    a("gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    a("mixed_precision", choices=list(MIXED_PRECISION_DTYPES), default="no",
      help="autocast and frozen-model dtype (fp16, for GPUs without bf16: the DiT's hidden states stay float32)")
    a("full_fp16", action="store_true", help="keep the LoRA weights in fp16 (needs --mixed_precision fp16; an "
      "optimizer eps that is 0 in fp16, like AdamW's 1e-8, is refused: use AdamW8bit, Lion or eps=1e-4)")
    a("full_bf16", action="store_true", help="keep the LoRA weights in bf16 (needs --mixed_precision bf16)")
    a("fp8_base", action="store_true",
      help="store the frozen DiT block projections (attention q/k/v/output, MLP) as float8_e4m3fn with one scale "
      "per output channel and compute them in bf16 (or the autocast dtype): 0.55x the block weight memory and "
      "swap traffic. Embedders, norms, adaLN modulation, the final layer, the LLM adapter, Qwen3 and the LoRA "
      "keep their dtype. Verified on CPU (tests/test_fp8.py); the CUDA path is covered by "
      "tests/test_fp8.py::test_gpu_fp8_training_step_matches_bf16_on_cuda")
    a("fp8_base_unet", action="store_true",
      help="same as --fp8_base (the DiT is Anima's U-Net; the text encoder is never stored in float8)")
    a("no_half_vae", action="store_true", help="keep the VAE in float32")
    a("seed", type=int, default=None, help="random seed (default: random)")
    a("gradient_checkpointing", action="store_true", help="recompute DiT block activations in backward")
    a("cuda_allow_tf32", action="store_true",
      help=GPU_ONLY + "allow TF32 tensor cores for float32 matmuls and convolutions (torch.backends.*.allow_tf32): "
      "much faster fp32 training (--mixed_precision no) at about 10 mantissa bits; flags set and fp32 warning "
      "tested on CPU with a stand-in device (tests/test_train_args.py::test_cuda_allow_tf32_sets_the_backend_flags"
      "_and_fp32_without_it_warns), no GPU test")
    a("loss_type", choices=LOSS_TYPES, default="l2", help="element-wise loss")
    a("huber_schedule", choices=HUBER_SCHEDULES, default="snr",
      help="huber c per sample as a function of sigma: constant, exponential (huber_c^sigma) or snr "
      "((1 - huber_c)(1 - sigma)^2 + huber_c); all scaled by --huber_scale")
    a("huber_c", type=float, default=0.1, help="huber c")
    a("huber_scale", type=float, default=1.0, help="huber scale")
    a("ip_noise_gamma", type=float, default=None, help="input-perturbation noise strength")
    a("ip_noise_gamma_random_strength", action="store_true", help="draw the ip noise strength in [0, gamma)")
    a("masked_loss", action="store_true",
      help="multiply the loss by the mask images of conditioning_data_dir / --conditioning_data_dir (red channel; "
      "required there); --alpha_mask masks apply without it")
    # Stable Diffusion noise/loss tweaks: parsed so old command lines work, warned as having no effect.
    a("noise_offset", type=float, default=None)
    a("noise_offset_random_strength", action="store_true")
    a("multires_noise_iterations", type=int, default=None)
    a("multires_noise_discount", type=float, default=None)
    a("adaptive_noise_scale", type=float, default=None)
    a("min_snr_gamma", type=float, default=None)
    a("debiased_estimation_loss", action="store_true")
    a("scale_v_pred_loss_like_noise_pred", action="store_true")
    a("v_pred_like_loss", type=float, default=None)
    a("zero_terminal_snr", action="store_true")
    a("min_timestep", type=int, default=None,
      help="lowest timestep (0-1000) to train on: each drawn sigma is mapped linearly from [0, 1] into "
      "[min_timestep, max_timestep] / 1000 (as sd-scripts' SD3 trainer maps its draw); default 0")
    a("max_timestep", type=int, default=None,
      help="highest timestep (0-1000) to train on, see --min_timestep; default 1000")
    a("weighted_captions", action="store_true", help="not supported by the Anima tokenizer (rejected)")
    a("clip_skip", type=int, default=None)
    a("max_token_length", type=int, default=None, choices=[None, 150, 225])
    a("mem_eff_attn", action="store_true")
    a("sdpa", action="store_true", help="use torch SDPA attention (the default; same as --attn_mode torch)")
    a("xformers", action="store_true", help=GPU_ONLY + "use xformers attention (same as --attn_mode xformers)")
    a("torch_compile", action="store_true",
      help="same as --compile (each DiT block compiled), with --dynamo_backend as the backend")
    a("dynamo_backend", type=str, default=None,
      help="torch.compile backend for --torch_compile (default inductor); without --torch_compile it has no "
      "effect (warned)")
    a("ddp_timeout", type=int, default=None, help="multi-GPU: process-group timeout in minutes")
    a("ddp_gradient_as_bucket_view", action="store_true", help="multi-GPU: DDP gradient_as_bucket_view")
    a("ddp_static_graph", action="store_true", help="multi-GPU: DDP static_graph")
    a("lowram", action="store_true")
    a("highvram", action="store_true")
    a("initial_epoch", type=int, default=None, help="epoch to start counting from")
    a("initial_step", type=int, default=None, help="step to start counting from")
    a("skip_until_initial_step", action="store_true", help="skip the data before --initial_step")
    a("validate_every_n_steps", type=int, default=None, help="validate every N steps")
    a("validate_every_n_epochs", type=int, default=None, help="validate every N epochs")
    a("max_validation_steps", type=int, default=None, help="cap on validation batches")
    a("cache_only", action="store_true", help="write the latent / text-encoder caches and exit without training")
    a("max_nonfinite_steps", type=int, default=3,
      help="stop after this many optimizer steps in a row with a NaN/inf loss or gradient (each is skipped "
      "without an update), saving a state of the last good step; 0 never stops")
    a("dry_run", action="store_true",
      help="check everything that needs no weights (flags, dataset, images, model headers, network, optimizer, "
      "resume folder, output and cache folders), print the plan and a memory estimate, and exit")


def _add_saving_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("saving and resuming")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("output_dir", type=str, default=None, help="output folder")
    a("output_name", type=str, default=None, help="base name of the LoRA files")
    a("save_precision", choices=list(SAVE_PRECISION_DTYPES), default=None, help="dtype of the saved LoRA")
    a("save_every_n_epochs", type=int, default=None, help="save every N epochs")
    a("save_every_n_steps", type=int, default=None, help="save every N steps")
    a("save_n_epoch_ratio", type=int, default=None, help="save about N times over the run")
    a("save_last_n_epochs", type=int, default=None, help="keep only the last N epoch files")
    a("save_last_n_steps", type=int, default=None, help="keep only the step files of the last N steps")
    a("save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    a("save_last_n_steps_state", type=int, default=None, help="keep only the states of the last N steps")
    a("save_state", action="store_true", help="also save the training state with every LoRA file")
    a("save_state_on_train_end", action="store_true", help="save the training state at the end")
    a("resume", type=str, default=None, help="state folder to resume from")
    a("resume_allow_changes", action="store_true",
      help="resume even when settings that the exact continuation depends on (seed, dataset, batch size, "
      "network, optimizer, ...) changed since the state; each change is still listed")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sample images")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("sample_prompts", type=str, default=None, help="prompt file (.txt, .toml, .json)")
    a("sample_every_n_steps", type=int, default=None, help="sample every N steps")
    a("sample_every_n_epochs", type=int, default=None, help="sample every N epochs (overrides steps)")
    a("sample_at_first", action="store_true", help="sample before training")
    a("sample_sampler", type=str, default=None)


def _add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging and metadata")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("logging_dir", type=str, default=None,
      help="folder of the tracker logs (alone it turns on tensorboard); each run writes <prefix><timestamp>/ there")
    a("log_with", choices=TRACKERS, default=None,
      help="experiment tracker (through accelerate); 'all': every installed one; tensorboard/all need --logging_dir")
    a("log_prefix", type=str, default=None, help="prefix of the run folder")
    a("log_tracker_name", type=str, default=None, help="tracker project / run-group name (default network_train)")
    a("log_tracker_config", type=str, default=None,
      help="TOML of tracker init kwargs, one table per tracker, e.g. [wandb] entity = \"me\"")
    a("log_config", action="store_true",
      help="log the training arguments as hyperparameters (secrets and local paths left out)")
    a("wandb_run_name", type=str, default=None, help="wandb run name")
    a("wandb_api_key", type=str, default=None,
      help="wandb API key (logs in before the run; never written by --output_config)")
    a("console_log_level", type=str, default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
      help="console log level")
    a("console_log_file", type=str, default=None, help="also write the console log to this file")
    a("console_log_simple", action="store_true", help="plain console log format")
    a("metadata_title", type=str, default=None, help="model-spec title (default: --output_name)")
    for field, what in MODEL_SPEC_TEXT_FIELDS.items():
        a(f"metadata_{field}", type=str, default=None, help=f"model-spec {what} (modelspec.{field})")


# sd-scripts flags this trainer does not implement. They are parsed so a carried-over command line or config
# gets advice instead of argparse's "unrecognized arguments"; a value other than the default is rejected.
# name -> (argparse keywords, what to do instead)
_DEEPSPEED = "DeepSpeed is not supported; remove it (multi-GPU training runs with `accelerate launch --multi_gpu`)"
_HUB = "Hugging Face upload/resume is not supported; remove it and upload the files from --output_dir yourself"
UNSUPPORTED_FLAGS: dict[str, tuple[dict[str, Any], str]] = {
    "deepspeed": ({"action": "store_true"}, _DEEPSPEED),
    "zero_stage": ({"type": int, "default": 2}, _DEEPSPEED),
    "offload_optimizer_device": ({"type": str, "default": None}, _DEEPSPEED),
    "offload_optimizer_nvme_path": ({"type": str, "default": None}, _DEEPSPEED),
    "offload_param_device": ({"type": str, "default": None}, _DEEPSPEED),
    "offload_param_nvme_path": ({"type": str, "default": None}, _DEEPSPEED),
    "zero3_init_flag": ({"action": "store_true"}, _DEEPSPEED),
    "zero3_save_16bit_model": ({"action": "store_true"}, _DEEPSPEED),
    "fp16_master_weights_and_gradients": ({"action": "store_true"}, _DEEPSPEED),
    "huggingface_repo_id": ({"type": str, "default": None}, _HUB),
    "huggingface_repo_type": ({"type": str, "default": None}, _HUB),
    "huggingface_path_in_repo": ({"type": str, "default": None}, _HUB),
    "huggingface_token": ({"type": str, "default": None}, _HUB),
    "huggingface_repo_visibility": ({"type": str, "default": None}, _HUB),
    "save_state_to_huggingface": ({"action": "store_true"}, _HUB),
    "resume_from_huggingface": ({"action": "store_true"}, "resuming from the Hugging Face hub is not supported; "
                                "download the state folder and pass it to --resume"),
    "async_upload": ({"action": "store_true"}, _HUB),
    "dataset_class": ({"type": str, "default": None}, "custom dataset classes are not supported; describe the "
                      "images with --dataset_config (a dataset TOML) or --train_data_dir"),
}


def _add_unsupported_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("not supported (accepted only to explain what to use instead)")
    for name, (kwargs, advice) in UNSUPPORTED_FLAGS.items():
        _add(g, parser, name, help=f"rejected: {advice}", **kwargs)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("config file")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("config_file", type=str, default=None, help="TOML with training arguments (command line wins)")
    # A bare `--output_config` (the sd-scripts form) writes to the --config_file path; a value names the file.
    a("output_config", type=str, nargs="?", const=True, default=None, help="write the given arguments to this TOML and exit (bare: to the --config_file path); refuses to overwrite")


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # fixed tensor addresses: no block swap
_COMPILE_OPTIONS = ("compile_backend", "compile_mode", "compile_dynamic", "compile_cache_size_limit")


def _add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("torch.compile (sd-scripts' per-block compile flags)")
    a = lambda name, **kw: _add(g, parser, name, **kw)  # noqa: E731
    a("compile", action="store_true",
      help="torch.compile each DiT block (forward and backward; LoRA and --fp8_base inside the graph, checkpointing "
      "and block swap around it). Verified on CPU with the eager/aot_eager backends, no graph break inside a "
      "block (tests/test_compile.py); inductor on CUDA is covered by "
      "tests/test_compile.py::test_gpu_inductor_compiled_blocks_match_eager_on_cuda")
    a("compile_backend", type=str, default=None, help="torch.compile backend (default inductor; needs --compile)")
    a("compile_mode", choices=COMPILE_MODES, default=None,
      help="torch.compile mode (default: default; needs --compile); reduce-overhead and max-autotune capture CUDA "
      "graphs and are refused with --blocks_to_swap")
    a("compile_dynamic", choices=["true", "false", "auto"], default=None,
      help="dynamic shapes: true, false or auto (default auto: PyTorch decides; needs --compile)")
    a("compile_fullgraph", action="store_true",
      help="fail instead of splitting a block's graph (needs --compile)")
    a("compile_cache_size_limit", type=int, default=None,
      help="torch._dynamo.config.cache_size_limit, graphs kept per compiled function (default: PyTorch's 8, raised "
      f"to {GRAPHS_PER_BLOCK} per DiT block on PyTorch before {ONE_GRAPH_FOR_ALL_BLOCKS_SINCE}, which compiles every "
      "block on its own; needs --compile)")


def compile_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """torch.compile keyword arguments for the DiT blocks, or None without --compile (after validate_args)."""
    if not args.compile:
        return None
    dynamic = {"true": True, "false": False, "auto": None, None: None}[args.compile_dynamic]
    return {"backend": args.compile_backend or "inductor", "mode": args.compile_mode, "dynamic": dynamic,
            "fullgraph": args.compile_fullgraph, "cache_size_limit": args.compile_cache_size_limit}


def _validate_compile_args(args: argparse.Namespace, reject: Any, warnings: list[str]) -> None:
    dynamo_backend = None if (args.dynamo_backend or "no").lower() == "no" else args.dynamo_backend.lower()
    if args.torch_compile:
        args.compile = True  # accelerate's dynamo plugin would never see the DiT: compile its blocks instead
        if dynamo_backend and args.compile_backend and dynamo_backend != args.compile_backend.lower():
            reject(f"--dynamo_backend {args.dynamo_backend} and --compile_backend {args.compile_backend} disagree; "
                   "keep one")
        args.compile_backend = args.compile_backend or dynamo_backend
        if args.dynamo_backend is None:
            args.dynamo_backend = "inductor"
    elif args.dynamo_backend is not None:
        warnings.append(f"--dynamo_backend {args.dynamo_backend} has no effect without --torch_compile; ignored")
    if not args.compile:
        given = [_flag(name) for name in _COMPILE_OPTIONS if getattr(args, name) is not None]
        given += ["--compile_fullgraph"] if args.compile_fullgraph else []
        if given:
            reject(f"{', '.join(given)} need(s) --compile")
        return
    if args.compile_cache_size_limit is not None and args.compile_cache_size_limit < 1:
        reject(f"--compile_cache_size_limit must be at least 1, got {args.compile_cache_size_limit}")
    if args.blocks_to_swap and args.compile_mode in CUDA_GRAPH_COMPILE_MODES:
        reject(f"--compile_mode {args.compile_mode} captures CUDA graphs (fixed weight addresses), which block swap "
               "changes every step; use --compile_mode default or max-autotune-no-cudagraphs with --blocks_to_swap")
    backend = args.compile_backend or "inductor"
    if args.compile_mode is not None and backend != "inductor":
        reject(f"--compile_mode is an inductor option; the {backend} backend would ignore it")
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        reject(f"--compile_backend {backend}: unknown torch.compile backend; choose one of {', '.join(known)}")


def setup_parser() -> argparse.ArgumentParser:
    """The full trainer parser: dataset flags (from the dataset module) plus every training flag."""
    parser = OneLineErrorParser(
        prog="anima_train_network.py",
        description="Train a LoRA for Anima. Flags marked [GPU only] need a CUDA device.",
    )
    add_dataset_arguments(parser)
    _add_model_arguments(parser)
    _add_anima_arguments(parser)
    _add_network_arguments(parser)
    _add_optimizer_arguments(parser)
    _add_training_arguments(parser)
    _add_compile_arguments(parser)
    _add_saving_arguments(parser)
    _add_sampling_arguments(parser)
    _add_logging_arguments(parser)
    _add_unsupported_arguments(parser)
    _add_config_arguments(parser)
    for name in NO_EFFECT_FLAGS:
        parser._option_string_actions[_flag(name)].help = no_effect_help(name)
    return parser


# --- config files -------------------------------------------------------------------------------------------


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if action.option_strings}


def _config_path(path: str) -> Path:
    return Path(path if path.endswith(".toml") else path + ".toml")


def load_config_defaults(parser: argparse.ArgumentParser, config_file: str) -> dict[str, Any]:
    """Read `--config_file`: every table is flattened; each key must be a known flag with a valid value."""
    path = _config_path(config_file)
    if not path.is_file():
        raise AnimaError(f"--config_file {path}: file not found; give the path of an existing TOML file")
    import toml  # imported when a TOML file is read: GPU-only runs need no toml

    try:
        data = toml.load(path)
    except (toml.TomlDecodeError, UnicodeDecodeError) as exc:
        raise AnimaError(f"--config_file {path}: not valid TOML ({exc}); fix the syntax") from exc

    flat: dict[str, Any] = {}
    for key, value in data.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for sub_key, sub_value in items:
            flat[sub_key] = sub_value

    actions = _actions_by_dest(parser)
    defaults: dict[str, Any] = {}
    for key, value in flat.items():
        action = actions.get(key)
        if action is None or key in ("config_file", "output_config"):
            raise AnimaError(f"--config_file {path}: unknown key '{key}'; remove it or fix the spelling")
        defaults[key] = _convert_config_value(path, action, value)
    return defaults


def _convert_config_value(path: Path, action: argparse.Action, value: Any) -> Any:
    """Apply the flag's own type and choices to a TOML value so the file is checked like the command line."""
    where = f"--config_file {path}: key '{action.dest}'"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise AnimaError(f"{where} must be true or false, got {value!r}")
        return value
    if action.nargs in ("*", "+"):
        values = value if isinstance(value, list) else [value]
        return [_convert_scalar(where, action, v) for v in values]
    if isinstance(value, list):
        raise AnimaError(f"{where} takes a single value, got a list")
    return _convert_scalar(where, action, value)


def _convert_scalar(where: str, action: argparse.Action, value: Any) -> Any:
    if action.type is not None and value is not None:
        try:
            value = action.type(str(value)) if action.type is not float else float(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise AnimaError(f"{where}: invalid value {value!r} ({exc})") from exc
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise AnimaError(f"{where}: invalid value {value!r}; choose one of {choices}")
    return value


def write_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str) -> Path:
    """Write every argument that differs from the parser default to a TOML file (refuses to overwrite)."""
    out = _config_path(path)
    if out.exists():
        raise AnimaError(f"--output_config {out}: file already exists; choose another name or delete it")
    values = {}
    for dest, action in _actions_by_dest(parser).items():
        if dest in _NOT_SAVED_IN_CONFIG:
            continue
        value = getattr(args, dest, None)
        if value is None or value == action.default:
            continue
        values[dest] = value
    import toml

    text = toml.dumps(values)
    return atomic_write(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --- parsing + validation -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Parse the command line (and `--config_file`), normalise aliases, validate.

    Returns (args, warnings). Raises AnimaError on bad input. `--output_config` is handled by the caller
    (`handle_output_config`) so it can exit before any work.
    """
    parser = setup_parser()
    args = parser.parse_args(argv)
    if args.config_file:
        parser.set_defaults(**load_config_defaults(parser, args.config_file))
        args = parser.parse_args(argv)
    warnings = validate_args(args)
    return args, warnings


def handle_output_config(argv: Sequence[str] | None = None) -> Path | None:
    """If `--output_config` is given, write the config and return its path (the caller then exits)."""
    parser = setup_parser()
    args = parser.parse_args(argv)
    if not args.output_config:
        return None
    if args.output_config is True:
        if not args.config_file:
            raise AnimaError("--output_config without a file name writes to --config_file; add --config_file run.toml "
                             "or give the name: --output_config run.toml")
        return write_config(parser, args, args.config_file)
    if args.config_file:
        parser.set_defaults(**load_config_defaults(parser, args.config_file))
        args = parser.parse_args(argv)
    return write_config(parser, args, args.output_config)


def _flag(name: str) -> str:
    return f"--{name}"


def _parser_defaults() -> dict[str, Any]:
    return {action.dest: action.default for action in setup_parser()._actions}


def _untrained_side_lr_warnings(args: argparse.Namespace) -> list[str]:
    """Learning-rate flags that change nothing (sd-scripts accepts them silently): a rate for the side that is not
    trained, and the values of --text_encoder_lr after the first (one per text encoder; Anima has one, Qwen3)."""
    warnings = []
    te_lrs = args.text_encoder_lr or []
    if len(te_lrs) > 1:
        warnings.append(f"--text_encoder_lr {' '.join(f'{lr:g}' for lr in te_lrs)}: Anima has one text encoder "
                        f"(Qwen3); its LoRA uses {te_lrs[0]:g}, the other values have no effect")
    if te_lrs and args.network_train_unet_only:
        warnings.append("--text_encoder_lr has no effect: the Qwen3 LoRA is not trained (--network_train_unet_only"
                        + (", implied by --cache_text_encoder_outputs)" if args.cache_text_encoder_outputs else ")"))
    if args.network_train_text_encoder_only:
        dit_lrs = ["unet_lr", *(f"{c}_lr" for c in ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter"))]
        given = [_flag(name) for name in dit_lrs if getattr(args, name, None) is not None]
        if given:
            warnings.append(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect: the DiT LoRA is not "
                            "trained (--network_train_text_encoder_only)")
    return warnings


def validate_args(args: argparse.Namespace) -> list[str]:
    """Normalise aliases and reject combinations that cannot work. Returns warnings for no-effect flags.

    Everything here runs before any model is loaded, so a bad command line fails in a second.
    """
    warnings: list[str] = []
    reject = _Rejections()

    # Attention mode: --xformers / --sdpa select it only when --attn_mode is absent; sdpa is an alias of torch.
    if args.sdpa and args.xformers:
        reject("--xformers and --sdpa choose different attention; keep one (or use --attn_mode)")
    if args.attn_mode is None:
        args.attn_mode = "xformers" if args.xformers else "torch"
    if args.attn_mode == "sdpa":
        args.attn_mode = "torch"
    if args.attn_mode == "sageattn":
        reject("--attn_mode sageattn is inference only; use torch, flash or xformers for training")
    if args.attn_mode == "xformers" and not args.split_attn:
        reject("--attn_mode xformers (or --xformers) needs --split_attn; add it or use --attn_mode torch")

    if args.fp8_base_unet:
        args.fp8_base = True  # the DiT is the only model --fp8_base stores in float8
    _validate_compile_args(args, reject, warnings)

    # Options that do nothing for Anima: accepted so sd-scripts command lines run, but never silently.
    defaults = _parser_defaults()
    for name in NO_EFFECT_FLAGS:
        value = getattr(args, name)
        if value == defaults[name] or (name == "sample_sampler" and value in EULER_SAMPLERS):
            continue
        warnings.append(f"{_flag(name)} has no effect for Anima ({NO_EFFECT_FLAGS[name]}); ignored")
    for name in ("min_timestep", "max_timestep"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1000:
            reject(f"{_flag(name)} {value}: must be between 0 and 1000")
    if (args.min_timestep or 0) > (1000 if args.max_timestep is None else args.max_timestep):
        reject(f"--min_timestep {args.min_timestep} must not exceed --max_timestep {args.max_timestep or 1000}")

    if args.weighted_captions:
        reject("--weighted_captions is not supported by the Anima tokenizer; remove it")
    reject.check(check_loss_options, args.loss_type, args.huber_schedule, args.huber_c, args.huber_scale)

    # Caching flags: *_to_disk implies the in-memory flag (and the --caption_extention alias).
    normalize_dataset_args(args)
    if args.cache_text_encoder_outputs:
        if args.network_train_text_encoder_only:
            reject("--cache_text_encoder_outputs cannot be combined with --network_train_text_encoder_only "
                   "(the Qwen3 LoRA cannot be trained on cached outputs)")
        elif not args.network_train_unet_only:
            warnings.append("--cache_text_encoder_outputs: the Qwen3 LoRA cannot be trained on cached outputs; "
                            "training the DiT LoRA only (--network_train_unet_only)")
            args.network_train_unet_only = True
        live_caption_flags = [f for f in ("shuffle_caption",) if getattr(args, f, False)]
        live_caption_flags += [f for f in ("caption_tag_dropout_rate", "token_warmup_step")
                               if (getattr(args, f, 0) or 0) > 0]
        if live_caption_flags:
            flags = ", ".join(_flag(f) for f in live_caption_flags)
            reject(f"--cache_text_encoder_outputs cannot be combined with {flags} "
                   "(cached captions are fixed); remove one of them")
    if args.cache_only and not (args.cache_latents_to_disk or args.cache_text_encoder_outputs_to_disk):
        reject("--cache_only writes disk caches: add --cache_latents_to_disk and/or "
               "--cache_text_encoder_outputs_to_disk")
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        reject("--network_train_unet_only and --network_train_text_encoder_only exclude each other; keep one")
    warnings += _untrained_side_lr_warnings(args)

    # Memory features.
    reject.check(checkpoint_offload_mode, args.cpu_offload_checkpointing, args.unsloth_offload_checkpointing,
                 bool(args.blocks_to_swap))
    if args.blocks_to_swap:
        if args.blocks_to_swap != "auto" and not 1 <= args.blocks_to_swap <= MAX_BLOCKS_TO_SWAP:
            reject(f"--blocks_to_swap {args.blocks_to_swap}: must be between 1 and {MAX_BLOCKS_TO_SWAP}")
    if args.cpu_offload_checkpointing and not args.gradient_checkpointing:
        warnings.append("--cpu_offload_checkpointing turns on --gradient_checkpointing")
        args.gradient_checkpointing = True
    if args.unsloth_offload_checkpointing and not args.gradient_checkpointing:
        warnings.append("--unsloth_offload_checkpointing turns on --gradient_checkpointing")
        args.gradient_checkpointing = True

    # Precision.
    if args.full_fp16 and args.mixed_precision != "fp16":
        reject("--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16 and args.mixed_precision != "bf16":
        reject("--full_bf16 needs --mixed_precision bf16")
    if args.full_fp16 and args.full_bf16:
        reject("--full_fp16 and --full_bf16 exclude each other; keep one")

    # Optimizer.
    optimizer_type = reject.check(resolve_optimizer_type, args.optimizer_type, args.use_8bit_adam,
                                  args.use_lion_optimizer)
    if args.full_fp16 and optimizer_type:
        reject.check(check_full_fp16_optimizer, optimizer_type, args.optimizer_args)
    if args.fused_backward_pass:
        reject.check(check_fused_backward_pass, (args.optimizer_type or "").lower() == "adafactor",
                     args.gradient_accumulation_steps)
    if args.ddp_static_graph and args.gradient_accumulation_steps > 1:
        # PyTorch's DDP static graph breaks under no_sync (the accumulation micro-steps): pytorch/pytorch#143580.
        reject("--ddp_static_graph does not work with --gradient_accumulation_steps > 1 (PyTorch DDP limitation); "
               "drop one")
    if args.lr_scheduler in NO_WARMUP_SCHEDULERS or args.lr_scheduler_type:
        reject.check(check_no_warmup, args.lr_scheduler_type or args.lr_scheduler, args.lr_warmup_steps)

    # Numbers that must be positive.
    for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            reject(f"{_flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in ("max_train_epochs", "save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio",
                 "save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state", "save_last_n_steps_state",
                 "qwen3_max_token_length", "t5_max_token_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            reject(f"{_flag(name)} must be at least 1, got {value}")
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            warnings.append(f"{_flag(name)} {value} is not positive; sampling on that schedule is off")
            setattr(args, name, None)
    schedule = [_flag(name) for name in ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")
                if getattr(args, name)]
    if schedule and not args.sample_prompts:
        warnings.append(f"{', '.join(schedule)} {'has' if len(schedule) == 1 else 'have'} no effect without "
                        "--sample_prompts; no sample images are made")
    elif args.sample_prompts and not schedule:
        warnings.append("--sample_prompts has no effect without --sample_every_n_steps, --sample_every_n_epochs or "
                        "--sample_at_first; no sample images are made")
    reject.check(check_flow_matching_options, args.timestep_sampling, args.weighting_scheme,
                 args.discrete_flow_shift, args.logit_std, args.ip_noise_gamma)
    if args.max_nonfinite_steps < 0:
        reject(f"--max_nonfinite_steps must be 0 (never stop) or more, got {args.max_nonfinite_steps}")
    learning_rates = [("learning_rate", args.learning_rate), ("unet_lr", args.unet_lr)]
    learning_rates += [("text_encoder_lr", lr) for lr in (args.text_encoder_lr or [])]
    learning_rates += [(f"{c}_lr", getattr(args, f"{c}_lr", None))
                       for c in ("self_attn", "cross_attn", "mlp", "mod", "llm_adapter")]
    for name, lr in learning_rates:
        if lr is not None and not (math.isfinite(lr) and lr >= 0):
            reject(f"{_flag(name)} must be a finite number >= 0, got {lr}")

    # Logging.
    if args.logging_dir and args.log_with is None:
        args.log_with = "tensorboard"
    if args.log_with in ("tensorboard", "all") and not args.logging_dir:
        reject(f"--log_with {args.log_with} needs --logging_dir")
    if args.log_with not in (None, "all"):
        from accelerate.tracking import get_available_trackers

        if args.log_with not in {str(t.value) for t in get_available_trackers()}:
            reject(f"--log_with {args.log_with}: the {args.log_with} package is not installed; "
                   f"pip install {args.log_with.replace('_', '-')}")
    if args.log_tracker_config:
        if not os.path.isfile(args.log_tracker_config):
            reject(f"--log_tracker_config {args.log_tracker_config}: not found; check the path")
        else:
            read_tracker_config(args.log_tracker_config, reject)
    tracker_flags = [f for f in ("log_prefix", "log_tracker_name", "log_tracker_config", "log_config")
                     if getattr(args, f)]
    if tracker_flags and not args.log_with:
        warnings.append(f"{', '.join(_flag(f) for f in tracker_flags)} have no effect without --log_with "
                        "or --logging_dir")
    if args.max_data_loader_n_workers < 0:
        reject(f"--max_data_loader_n_workers {args.max_data_loader_n_workers} is negative; use 0 (load the batches "
               "in the training process) or more")
    elif args.persistent_data_loader_workers and args.max_data_loader_n_workers == 0:
        warnings.append("--persistent_data_loader_workers has no effect with --max_data_loader_n_workers 0 (no "
                        "worker processes); ignored")
    wandb_flags = [f for f in ("wandb_run_name", "wandb_api_key") if getattr(args, f)]
    if wandb_flags and args.log_with not in ("wandb", "all"):
        warnings.append(f"{', '.join(_flag(f) for f in wandb_flags)} have no effect without --log_with wandb")
    for name, (kwargs, advice) in UNSUPPORTED_FLAGS.items():
        if getattr(args, name, None) != kwargs.get("default", False if kwargs.get("action") else None):
            reject(f"{_flag(name)}: {advice}")

    # A run killed while replacing this state folder left it under its hidden `.old` name: move it back first.
    if args.resume:
        restore_interrupted_dir(Path(args.resume))
    # Files named on the command line must exist (caught before any long work).
    for name in ("pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
                 "t5_tokenizer_path", "network_weights", "sample_prompts", "resume", "dataset_config"):
        path = getattr(args, name, None)
        if path and not os.path.exists(path):
            reject(f"{_flag(name)} {path}: not found; check the path")
    for path in args.base_weights or []:
        if not os.path.exists(path):
            reject(f"--base_weights {path}: not found; check the path")
    if args.metadata_thumbnail:
        try:
            thumbnail_data_url(args.metadata_thumbnail)
        except AnimaError as exc:
            reject(str(exc))
    if args.base_weights_multiplier and len(args.base_weights_multiplier) > len(args.base_weights or []):
        reject("--base_weights_multiplier has more values than --base_weights files")
    if args.sample_prompts and os.path.exists(args.sample_prompts):
        # Read the prompt file now: a mistake in it must not surface only after caching and training.
        from library.training.sampling import load_sample_prompts

        try:
            load_sample_prompts(args.sample_prompts)
        except AnimaError as exc:
            message = str(exc)
            reject(message if message.startswith("--sample_prompts") else f"--sample_prompts {message}")

    reject.raise_if_any()
    return warnings


def read_tracker_config(path: str, reject: Any = None) -> dict[str, dict[str, Any]]:
    """`--log_tracker_config`: a TOML whose top-level tables are keyword arguments of each tracker's init
    (`accelerator.init_trackers(init_kwargs=...)`), e.g. `[wandb]` with `entity`, `tags`, `notes`."""
    def fail(message: str) -> dict[str, dict[str, Any]]:
        if reject is None:
            raise AnimaError(message)
        reject(message)
        return {}

    import toml  # imported when a TOML file is read: GPU-only runs need no toml

    try:
        config = toml.load(path)
    except (toml.TomlDecodeError, OSError) as exc:
        return fail(f"--log_tracker_config {path}: not a readable TOML file ({exc})")
    not_tables = [k for k, v in config.items() if not isinstance(v, dict)]
    if not_tables:
        return fail(f"--log_tracker_config {path}: {', '.join(not_tables)} must be tables named for a tracker, "
                    "e.g. [wandb]")
    return config


class _Rejections:
    """Collect every rejection so the user sees all conflicting flags at once, on one line."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def check(self, rule: Callable[..., Any], *rule_args: Any) -> Any:
        """Run a rule its owner module states (it raises AnimaError) and collect its message. Returns what the
        rule returns, None when it refused."""
        try:
            return rule(*rule_args)
        except AnimaError as exc:
            self.messages.append(str(exc))
            return None

    def raise_if_any(self) -> None:
        if self.messages:
            raise AnimaError("; ".join(self.messages))


def require_training_inputs(args: argparse.Namespace) -> None:
    """Flags a training (or caching) run cannot start without."""
    missing = [_flag(n) for n in ("pretrained_model_name_or_path", "qwen3", "vae") if not getattr(args, n)]
    if not args.cache_only:
        missing += [_flag(n) for n in ("output_dir", "network_module") if not getattr(args, n)]
    if missing:
        raise AnimaError(f"missing required option(s): {', '.join(missing)}")
    if not args.dataset_config and not getattr(args, "train_data_dir", None) and not getattr(args, "in_json", None):
        raise AnimaError("no dataset: give --dataset_config (a dataset TOML) or --train_data_dir")
    if args.network_module:
        from networks import check_network_module

        check_network_module(args.network_module)
