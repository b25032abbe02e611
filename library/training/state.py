"""The state folder written by --save_state (and by Ctrl-C and the non-finite guard) and read by --resume.

A state folder holds:
  network.safetensors   the LoRA parameters (fp32/trained dtype, not the --save_precision copy)
  optimizer.pt          the optimizer state dict (loaded with weights_only=True)
  scheduler.pt          the LR scheduler state dict
  rng_<rank>.pt         the Python, NumPy, torch (and CUDA) random states of every process
  train_state.json      sd-scripts' counters (current_epoch: the 1-based epoch of the last step, current_step:
                        the optimizer steps), the exact position (epoch in progress, batches of it done, optimizer
                        steps done), the seed, what the data order depends on (batches per epoch, a dataset
                        fingerprint, the number of processes) and the run's settings, so that a resume can list
                        every change.

`validate_state_folder` checks all of it (presence, weights_only loading, shapes against the network) before any
dataset, model or cache is touched; `compare_settings` lists what differs from the new command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.errors import AnimaError
from library.training.schedule import Position

TRAIN_STATE_FILE = "train_state.json"
NETWORK_STATE_FILE = "network.safetensors"
OPTIMIZER_STATE_FILE = "optimizer.pt"
SCHEDULER_STATE_FILE = "scheduler.pt"
# The fp16 loss scaler's scale and growth counter (CUDA fp16 runs): without it a resumed run would start from the
# initial scale again and skip steps that the uninterrupted run made.
SCALER_STATE_FILE = "scaler.pt"
STATE_FORMAT = 3

# Why a state was written (recorded, shown on resume).
PERIODIC, END_OF_RUN, INTERRUPTED, NONFINITE = "periodic", "end of run", "interrupted", "non-finite guard"


def rng_file_name(rank: int) -> str:
    return f"rng_{rank}.pt"


# --- random states ------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every random state a step consumes, as plain tensors/lists (loadable with weights_only=True)."""
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


def restore_rng(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # One generator per visible GPU when saved; a machine that shows fewer takes those it has (a state from
        # 8 visible GPUs resumed with 1 would otherwise fail on device 1).
        for index, generator_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state, index)


# --- what a resume compares ---------------------------------------------------------------------------------

# Flags that cannot change what is trained (where files go, how often things are written or logged, loader
# parallelism, cache storage, this very machinery): not recorded, never compared.
NOT_COMPARED = frozenset({
    "output_dir", "output_name", "resume", "resume_allow_changes", "dry_run", "config_file", "output_config",
    "save_precision", "save_model_as", "lora_format", "save_every_n_epochs", "save_every_n_steps",
    "save_n_epoch_ratio", "save_last_n_epochs", "save_last_n_steps", "save_last_n_epochs_state",
    "save_last_n_steps_state", "save_state", "save_state_on_train_end", "no_metadata", "training_comment",
    "metadata_title", "metadata_author", "metadata_description", "metadata_license", "metadata_tags",
    "logging_dir", "log_with", "log_prefix", "log_tracker_name", "log_tracker_config", "log_config",
    "console_log_level", "console_log_file", "console_log_simple", "max_data_loader_n_workers",
    "persistent_data_loader_workers", "cache_latents_to_disk", "cache_text_encoder_outputs_to_disk",
    "vae_batch_size", "text_encoder_batch_size", "skip_cache_check", "max_nonfinite_steps", "seed",
    "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "sample_at_first", "sample_sampler",
})

# Settings whose change makes the saved position, tensors or random states mean something else, so the
# continuation cannot be exact: refused unless --resume_allow_changes.
BREAKS_CONTINUATION = frozenset({
    "train_batch_size", "gradient_accumulation_steps", "network_module", "network_dim", "network_alpha",
    "network_args", "network_dropout", "network_train_unet_only", "network_train_text_encoder_only",
    "base_weights", "base_weights_multiplier", "optimizer_type",
    "optimizer_args", "use_8bit_adam", "use_lion_optimizer", "mixed_precision", "full_fp16", "full_bf16",
    "resolution", "enable_bucket",
    "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale", "caption_extension",
    "shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate", "token_warmup_step", "token_warmup_min", "flip_aug", "color_aug",
    "random_crop", "face_crop_aug_range", "validation_split", "validation_seed", "cache_latents",
    "cache_text_encoder_outputs", "fused_backward_pass",
})

# Recorded beside the flags: the seed actually used, and what the data order depends on.
SEED, NUM_PROCESSES, BATCHES_PER_EPOCH, DATASET_FINGERPRINT = (
    "seed", "num_processes", "batches_per_epoch", "dataset_fingerprint")
RUN_FACTS_BREAKING = (SEED, NUM_PROCESSES, BATCHES_PER_EPOCH, DATASET_FINGERPRINT)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


# Flags naming files or folders: recorded as absolute paths, so that a resume from another working folder
# compares the same files. (The dataset's content is compared through its fingerprint; --network_weights only
# sets the starting weights, which the state replaces.)
PATH_FLAGS = frozenset({"pretrained_model_name_or_path", "qwen3", "vae", "llm_adapter_path", "qwen3_tokenizer_path",
                        "t5_tokenizer_path", "network_weights", "base_weights", "dataset_config", "train_data_dir",
                        "reg_data_dir", "in_json", "conditioning_data_dir"})


def _absolute(value: Any) -> Any:
    if isinstance(value, str) and value:
        return os.path.abspath(value)
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    return value


def recorded_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The flags a resume compares: every parsed option except those in NOT_COMPARED."""
    return {k: _jsonable(_absolute(v) if k in PATH_FLAGS else v) for k, v in sorted(vars(args).items())
            if k not in NOT_COMPARED}


def dataset_fingerprint(group: Any, dataset_config: str | None) -> str:
    """SHA-256 over what the data order and content depend on: per dataset its batch size and every image's
    key, caption, repeats, size and bucket, plus the dataset TOML text. `group` is a data.DatasetGroup."""
    digest = hashlib.sha256()
    for index, dataset in enumerate(group.datasets):
        digest.update(f"dataset {index} batch {dataset.config.batch_size}\n".encode())
        for info in dataset.infos:
            digest.update(json.dumps([info.key, info.caption, info.num_repeats, info.is_reg,
                                      list(info.image_size), list(info.bucket or ())]).encode())
    if dataset_config and Path(dataset_config).is_file():
        digest.update(Path(dataset_config).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SettingChange:
    name: str  # a flag name, or one of the recorded facts (seed, dataset_fingerprint, ...)
    saved: Any
    current: Any
    breaks_continuation: bool

    def describe(self) -> str:
        label = self.name if self.name in RUN_FACTS_BREAKING else f"--{self.name}"
        return f"{label}: {self.saved!r} in the state, {self.current!r} now"


def compare_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[SettingChange]:
    """Every recorded setting that differs (keys missing on one side count as None)."""
    changes = []
    for name in sorted(set(saved) | set(current)):
        old, new = saved.get(name), current.get(name)
        if old != new:
            breaking = name in BREAKS_CONTINUATION or name in RUN_FACTS_BREAKING
            changes.append(SettingChange(name, old, new, breaking))
    return changes


# --- train_state.json ---------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """The contents of train_state.json."""

    position: Position
    seed: int | None = None
    kind: str = PERIODIC
    facts: dict[str, Any] = field(default_factory=dict)  # num_processes, batches_per_epoch, dataset_fingerprint
    settings: dict[str, Any] | None = None  # None: a state written before settings were recorded

    @property
    def global_step(self) -> int:
        return self.position.global_step


def sd_scripts_epoch(position: Position) -> int:
    """sd-scripts' `current_epoch` of a state at `position`: the 1-based epoch its last step belongs to (a state
    written at an epoch's end, holding the next epoch with no batches done, names the epoch that ended)."""
    return position.epoch + 1 if position.batches_done else position.epoch


def write_train_state(folder: Path, state: TrainState) -> None:
    position = state.position
    data = {"format": STATE_FORMAT, "kind": state.kind,
            # sd-scripts' two counters with its values (what tools reading its train_state.json expect) ...
            "current_epoch": sd_scripts_epoch(position), "current_step": position.global_step,
            # ... and the exact position: the epoch in progress (0-based), its batches done, the optimizer steps.
            "epoch_in_progress": position.epoch, "epoch_step": position.batches_done,
            "global_step": position.global_step,
            "seed": state.seed, "facts": state.facts, "settings": state.settings}
    (Path(folder) / TRAIN_STATE_FILE).write_text(json.dumps(data, indent=1), encoding="utf-8")


def read_train_state(folder: Path) -> TrainState:
    path = Path(folder) / TRAIN_STATE_FILE
    if not path.is_file():
        raise AnimaError(f"--resume {folder}: {TRAIN_STATE_FILE} not found; give a folder written by --save_state")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "format" not in data and "current_step" in data:
            raise AnimaError(f"--resume {folder}: a state folder written by sd-scripts (accelerate's files), which "
                             "this trainer cannot continue; start a new run from its LoRA weights with "
                             f"--network_weights {Path(folder) / 'model.safetensors'}")
        # Format 2 (before sd-scripts' counters were written) kept the epoch in progress in current_epoch.
        epoch = data["epoch_in_progress"] if int(data.get("format", 0)) >= 3 else data["current_epoch"]
        position = Position(epoch=int(epoch), batches_done=int(data.get("epoch_step", 0)),
                            global_step=int(data["global_step"]))
        seed = data.get("seed")
        settings = data.get("settings")
        facts = data.get("facts") or {}
        if (seed is not None and not isinstance(seed, int)) or not isinstance(facts, dict) \
                or (settings is not None and not isinstance(settings, dict)):
            raise ValueError("seed, facts or settings of the wrong type")
        if min(position.epoch, position.batches_done, position.global_step) < 0:
            raise ValueError("negative counter")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AnimaError(f"--resume {folder}: {TRAIN_STATE_FILE} is damaged ({exc}); use another state folder") \
            from exc
    return TrainState(position=position, seed=seed, kind=str(data.get("kind", PERIODIC)), facts=facts,
                      settings=settings)


# --- the whole folder ---------------------------------------------------------------------------------------


def write_state_files(folder: Path, *, network: dict[str, torch.Tensor], optimizer: dict[str, Any],
                      scheduler: dict[str, Any], rng_states: list[dict[str, Any]], train_state: TrainState,
                      scaler: dict[str, Any] | None = None) -> None:
    """Fill `folder` (a temporary folder that files.atomic_write_dir then moves into place); `scaler`: the fp16
    loss scaler's state, where the run has one."""
    import safetensors.torch

    weights = {k: v.detach().cpu().contiguous() for k, v in network.items()}
    safetensors.torch.save_file(weights, str(folder / NETWORK_STATE_FILE))
    torch.save(optimizer, folder / OPTIMIZER_STATE_FILE)
    torch.save(scheduler, folder / SCHEDULER_STATE_FILE)
    if scaler is not None:
        torch.save(scaler, folder / SCALER_STATE_FILE)
    for rank, rng in enumerate(rng_states):
        torch.save(rng, folder / rng_file_name(rank))
    write_train_state(folder, train_state)


@dataclass
class LoadedState:
    """A validated state folder, read once (a LoRA's optimizer state is small)."""

    folder: Path
    train_state: TrainState
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_states: list[dict[str, Any]]
    scaler: dict[str, Any] | None = None  # the fp16 loss scaler's state, in states of runs that had one


def _load_pt(folder: Path, name: str) -> Any:
    try:
        return torch.load(folder / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zips, foreign pickles (refused by weights_only), ... come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AnimaError(f"--resume {folder}: {name} cannot be read safely ({type(exc).__name__}: {first[:200]}); "
                         "the file is damaged or not written by --save_state; use another state folder") from None


def validate_state_folder(folder: Path, network_shapes: dict[str, tuple[int, ...]]) -> LoadedState:
    """Read and check a state folder completely; `network_shapes` is the state dict of the network this run
    builds (keys -> shapes). One AnimaError line for the first problem found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnimaError(f"--resume {folder}: not a folder; give a *-state folder written by --save_state")
    train_state = read_train_state(folder)
    num_processes = int(train_state.facts.get(NUM_PROCESSES, 1))
    needed = [NETWORK_STATE_FILE, OPTIMIZER_STATE_FILE, SCHEDULER_STATE_FILE,
              *(rng_file_name(rank) for rank in range(num_processes))]
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise AnimaError(f"--resume {folder}: missing {', '.join(missing)}; give a complete folder written by "
                         "--save_state")

    from library.io.checkpoints import open_checkpoint

    with open_checkpoint(folder / NETWORK_STATE_FILE, "--resume", "a state folder's network.safetensors") as ckpt:
        saved_shapes = ckpt.shapes()
        missing_keys = sorted(set(network_shapes) - set(saved_shapes))
        unexpected = sorted(set(saved_shapes) - set(network_shapes))
        wrong = sorted(k for k in set(saved_shapes) & set(network_shapes) if saved_shapes[k] != network_shapes[k])
        if missing_keys or unexpected or wrong:
            detail = "; ".join(part for part in (
                f"missing {missing_keys[:3]}" if missing_keys else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                (f"shape of {wrong[0]} is {list(saved_shapes[wrong[0]])}, the network has "
                 f"{list(network_shapes[wrong[0]])}") if wrong else "") if part)
            raise AnimaError(f"--resume {folder}: the saved network does not match this one ({detail}); use the same "
                             "--network_dim/--network_alpha/--network_args as the saved run")
        network = ckpt.read()  # the checkpoint reader refuses non-finite tensors

    optimizer = _load_pt(folder, OPTIMIZER_STATE_FILE)
    if not isinstance(optimizer, dict) or "state" not in optimizer or "param_groups" not in optimizer:
        raise AnimaError(f"--resume {folder}: {OPTIMIZER_STATE_FILE} is not an optimizer state; use another state "
                         "folder")
    scheduler = _load_pt(folder, SCHEDULER_STATE_FILE)
    if not isinstance(scheduler, dict):
        raise AnimaError(f"--resume {folder}: {SCHEDULER_STATE_FILE} is not a scheduler state; use another state "
                         "folder")
    rng_states = []
    for rank in range(num_processes):
        rng = _load_pt(folder, rng_file_name(rank))
        if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
            raise AnimaError(f"--resume {folder}: {rng_file_name(rank)} is not a random state; use another state "
                             "folder")
        rng_states.append(rng)
    scaler = None
    if (folder / SCALER_STATE_FILE).is_file():
        scaler = _load_pt(folder, SCALER_STATE_FILE)
        if not isinstance(scaler, dict) or "scale" not in scaler:
            raise AnimaError(f"--resume {folder}: {SCALER_STATE_FILE} is not a loss-scaler state; use another state "
                             "folder")
    return LoadedState(folder=folder, train_state=train_state, network=network, optimizer=optimizer,
                       scheduler=scheduler, rng_states=rng_states, scaler=scaler)
