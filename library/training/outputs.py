"""Where and how training outputs are written: file names, atomic writes, pruning, metadata, state folders.

Every write goes to a temporary name in the destination folder and is then moved into place with
`os.replace`, so an interrupted run never leaves a half-written LoRA or state folder under the final name.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from library.errors import AnimaError

TRAIN_STATE_FILE = "train_state.json"
NETWORK_STATE_FILE = "network.safetensors"

MODEL_SPEC_VERSION = "1.0.1"
MODEL_SPEC_ARCHITECTURE = "anima-preview/lora"
MODEL_SPEC_IMPLEMENTATION = "https://huggingface.co/circlestone-labs/Anima"
BASE_MODEL_VERSION = "anima"


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


def remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- atomic writes ------------------------------------------------------------------------------------------


def check_writable_dir(path: str | os.PathLike, flag: str) -> None:
    """Fail now, not at the first save: `path` must be a folder, or creatable in a writable one. Creates nothing."""
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise AnimaError(f"{flag} {path}: {existing} is a file, not a folder; choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AnimaError(f"{flag} {path}: {existing} is not writable; choose a folder you can write to")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` with a temporary path next to `path` (same suffix), then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        # Some writers (safetensors) create files as 0600; give the file the user's normal permissions so
        # another account (e.g. a ComfyUI service) can read it.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary folder with `write(tmp_dir)`, then swap it in place of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    remove_path(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    finally:
        remove_path(tmp)
    return path


# --- hashes -------------------------------------------------------------------------------------------------


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a LoRA: computed on a serialisation holding only ss_* metadata.

    model hash = SHA-256 of the tensor-data section; legacy hash = first 8 hex digits of the SHA-256 of the
    64 KiB at offset 1 MiB of that serialisation (what image UIs show).
    """
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, ss_only)
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(path: str) -> tuple[str, str]:
    """(old 8-hex hash of 64 KiB at 1 MiB, full-file SHA-256) of a model file, as written into ss_* metadata."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return legacy, file_sha256(path)


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
    for field in ("description", "author", "license", "tags"):
        value = getattr(args, f"metadata_{field}", None)
        if value:
            spec[f"modelspec.{field}"] = value
    if args.min_timestep is not None or args.max_timestep is not None:
        spec["modelspec.timestep_range"] = f"{args.min_timestep or 0},{args.max_timestep or 1000}"
    return spec


# Keys kept by --no_metadata.
MINIMAL_METADATA_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                         "ss_network_alpha", "ss_network_args")


def training_metadata(
    args: argparse.Namespace,
    *,
    session_id: int,
    training_started_at: float,
    num_train_images: int,
    num_reg_images: int,
    num_validation_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    optimizer_name: str,
    network_args: dict[str, Any] | None,
    dataset_metadata: dict[str, str] | None,
) -> dict[str, str]:
    """ss_* metadata describing the run (all values are strings, as in sd-scripts files)."""
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
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": args.full_fp16,
        "ss_v2": args.v2,
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": args.cache_latents,
        "ss_seed": args.seed,
        "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
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
