"""Training outputs: file names of models and states, pruning of old saves, ss_* and model-spec metadata."""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import mimetypes
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from library.errors import AnimaError
from library.io.files import file_hashes, remove_leftovers
from library.io.run_lock import RunLock, acquire_run_lock

MODEL_SPEC_VERSION = "1.0.1"
MODEL_SPEC_ARCHITECTURE = "anima-preview/lora"
MODEL_SPEC_IMPLEMENTATION = "https://huggingface.co/circlestone-labs/Anima"
BASE_MODEL_VERSION = "anima"

# The free-text model-spec fields, each set by --metadata_<field> and written as modelspec.<field> the way
# sd-scripts writes them (the given text; --metadata_title is separate because it has a default).
MODEL_SPEC_TEXT_FIELDS: dict[str, str] = {
    "author": "author name",
    "description": "description",
    "license": "license",
    "tags": "tags, separated by commas",
    "usage_hint": "very short hint on how to use the model",
    "thumbnail": "thumbnail image: a data: URL, or an image file (written as a base64 data URL)",
    "merged_from": "source models the model was merged from",
    "trigger_phrase": "trigger phrase",
    "preprocessor": "preprocessor used",
    "is_negative_embedding": "whether the model is a negative embedding",
}


# --- the run's claim on its output ------------------------------------------------------------------------


MULTIRES_NOISE_DISCOUNT_DEFAULT = 0.3  # sd-scripts' default for --multires_noise_discount


def claim_output(args: argparse.Namespace) -> RunLock | None:
    """Take the run lock of (--output_dir, --output_name) and remove what killed runs left in --output_dir.

    Only the main process of a launch (RANK 0 or unset) locks; the other processes write nothing there. A
    `--cache_only` run writes no output files and takes no lock (None).
    """
    if args.cache_only or not args.output_dir or os.environ.get("RANK", "0") != "0":
        return None
    lock = acquire_run_lock(args.output_dir, _last_stem(args))
    remove_leftovers(args.output_dir)
    return lock


# --- names --------------------------------------------------------------------------------------------------


def model_extension(args: argparse.Namespace) -> str:
    return "." + (args.save_model_as or "safetensors")


def _epoch_stem(args: argparse.Namespace, epoch: int) -> str:
    return f"{args.output_name or 'epoch'}-{epoch:06d}"


def _step_stem(args: argparse.Namespace, step: int) -> str:
    return f"{args.output_name or 'at'}-step{step:08d}"


def _last_stem(args: argparse.Namespace) -> str:
    return args.output_name or "last"


def epoch_model_name(args: argparse.Namespace, epoch: int) -> str:
    return _epoch_stem(args, epoch) + model_extension(args)


def step_model_name(args: argparse.Namespace, step: int) -> str:
    return _step_stem(args, step) + model_extension(args)


def last_model_name(args: argparse.Namespace) -> str:
    return _last_stem(args) + model_extension(args)


def epoch_state_name(args: argparse.Namespace, epoch: int) -> str:
    return _epoch_stem(args, epoch) + "-state"


def step_state_name(args: argparse.Namespace, step: int) -> str:
    return _step_stem(args, step) + "-state"


def last_state_name(args: argparse.Namespace) -> str:
    return _last_stem(args) + "-state"


# --- pruning ------------------------------------------------------------------------------------------------


def step_to_prune(step: int, save_every_n_steps: int | None, keep_last_n_steps: int | None) -> int | None:
    """Step number of the step checkpoint that falls out of the `keep_last_n_steps` window after saving `step`."""
    if not save_every_n_steps or not keep_last_n_steps:
        return None
    old = step - keep_last_n_steps - 1
    old -= old % save_every_n_steps  # align to an actual save point
    return old if old > 0 else None


def epoch_to_prune(epoch: int, save_every_n_epochs: int | None, keep_last_n_epochs: int | None) -> int | None:
    """Epoch number of the epoch checkpoint that falls out of the window after saving `epoch`."""
    if not save_every_n_epochs or not keep_last_n_epochs:
        return None
    old = epoch - save_every_n_epochs * keep_last_n_epochs
    return old if old > 0 else None


# --- metadata -----------------------------------------------------------------------------------------------


def project_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or "(unknown)"
    except (OSError, subprocess.SubprocessError):
        return "(unknown)"


def model_spec(args: argparse.Namespace, timestamp: float) -> dict[str, str]:
    """The model-spec (modelspec.*) keys that UIs read to recognise an Anima LoRA."""
    if args.resolution:
        parts = [int(p) for p in str(args.resolution).replace("x", ",").split(",") if p.strip()]
        width, height = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        resolution = f"{width}x{height}"
    else:
        resolution = "1024x1024"
    commit = project_commit()
    spec = {
        "modelspec.sai_model_spec": MODEL_SPEC_VERSION,
        "modelspec.architecture": MODEL_SPEC_ARCHITECTURE,
        "modelspec.implementation": MODEL_SPEC_IMPLEMENTATION,
        "modelspec.title": args.metadata_title or args.output_name or f"LoRA@{int(timestamp)}",
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.fromtimestamp(timestamp).replace(microsecond=0).isoformat(),
        # Kept as sd-scripts writes it so tools that filter on it behave the same; Anima is flow matching.
        "modelspec.prediction_type": "epsilon",
        "modelspec.implementation_version": f"anima-lora-trainer/{commit if commit != '(unknown)' else 'unknown'}",
    }
    for field in MODEL_SPEC_TEXT_FIELDS:
        value = getattr(args, f"metadata_{field}", None)
        if value:
            spec[f"modelspec.{field}"] = thumbnail_data_url(value) if field == "thumbnail" else value
    if args.min_timestep is not None or args.max_timestep is not None:
        spec["modelspec.timestep_range"] = f"{args.min_timestep or 0},{args.max_timestep or 1000}"
    return spec


def thumbnail_data_url(value: str, flag: str = "--metadata_thumbnail") -> str:
    """A ``data:`` URL as given, or an image file read into ``data:<mime>;base64,<bytes>`` (as sd-scripts
    embeds it). A missing or non-image file is an error (sd-scripts drops it with a warning)."""
    if value.startswith("data:"):
        return value
    if not os.path.isfile(value):
        raise AnimaError(f"{flag} {value}: not found; pass an image file or a data: URL")
    mime_type, _ = mimetypes.guess_type(value)
    if mime_type is None or not mime_type.startswith("image/"):
        raise AnimaError(f"{flag} {value}: not an image file (.png, .jpg, .webp ...); pass an image or a data: URL")
    with open(value, "rb") as f:
        encoded = base64.b64encode(f.read()).decode("ascii")
    return f"data:{mime_type};base64,{encoded}"


# Keys kept by --no_metadata.
MINIMAL_METADATA_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                         "ss_network_alpha", "ss_network_args")


def training_metadata(
    args: argparse.Namespace,
    *,
    session_id: int,
    training_started_at: float,
    seed: int,
    num_train_images: int,
    num_reg_images: int,
    num_validation_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    optimizer_name: str,
    network_args: dict[str, Any] | None,
    dataset_metadata: dict[str, str] | None,
    max_train_steps: int | None = None,
    network_dim: int | None = None,
    network_alpha: float | None = None,
) -> dict[str, str]:
    """ss_* metadata describing the run (all values are strings, as in sd-scripts files). max_train_steps: the
    run's step count when --max_train_epochs set it (default --max_train_steps)."""
    m: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_validation_images": num_validation_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps if max_train_steps is not None else args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        # The trained network's rank and alpha (the flags may be unset: defaults, or --dim_from_weights).
        "ss_network_dim": network_dim if network_dim is not None else args.network_dim,
        "ss_network_alpha": network_alpha if network_alpha is not None else args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": args.full_fp16,
        "ss_v2": args.v2,
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": args.cache_latents,
        "ss_seed": seed,
        "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        # Unset, it records the flag's sd-scripts default (0.3), as sd-scripts files do; the flag has no effect here.
        "ss_multires_noise_discount": (MULTIRES_NOISE_DISCOUNT_DEFAULT if args.multires_noise_discount is None
                                       else args.multires_noise_discount),
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": project_commit(),
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_caption_dropout_rate": getattr(args, "caption_dropout_rate", None),
        "ss_caption_dropout_every_n_epochs": getattr(args, "caption_dropout_every_n_epochs", None),
        "ss_caption_tag_dropout_rate": getattr(args, "caption_tag_dropout_rate", None),
        "ss_face_crop_aug_range": getattr(args, "face_crop_aug_range", None),
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_fp8_base": bool(args.fp8_base),
        "ss_fp8_base_unet": bool(args.fp8_base_unet),
        "ss_validation_seed": args.validation_seed,
        "ss_validation_split": getattr(args, "validation_split", None),
        "ss_max_validation_steps": args.max_validation_steps,
        "ss_validate_every_n_epochs": args.validate_every_n_epochs,
        "ss_validate_every_n_steps": args.validate_every_n_steps,
        "ss_resize_interpolation": getattr(args, "resize_interpolation", None),
    }
    if dataset_metadata:
        m.update(dataset_metadata)
    if network_args:
        m["ss_network_args"] = json.dumps(network_args)
    for arg_name, key in (("pretrained_model_name_or_path", "sd_model"), ("vae", "vae")):
        path = getattr(args, arg_name)
        if not path:
            continue
        m[f"ss_{key}_name"] = os.path.basename(path)
        if os.path.isfile(path):
            legacy, full = file_hashes(path)
            m[f"ss_{key}_hash"] = legacy
            m[f"ss_new_{key}_hash"] = full
    metadata = {k: str(v) for k, v in m.items()}
    if args.no_metadata:
        metadata = {k: metadata[k] for k in MINIMAL_METADATA_KEYS if k in metadata}
    return metadata


def metadata_for_save(base: dict[str, str], spec: dict[str, str], *, steps: int, epoch: int,
                      no_metadata: bool) -> dict[str, str]:
    """Per-save metadata: the run's keys plus finish time, step and epoch, plus model spec."""
    metadata = dict(base)
    if not no_metadata:
        metadata["ss_training_finished_at"] = str(time.time())
        metadata["ss_steps"] = str(steps)
        metadata["ss_epoch"] = str(epoch)
    metadata.update(spec)
    return metadata


