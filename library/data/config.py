"""Dataset configuration: the command-line flags, the TOML/JSON schema, validation, and building the datasets.

A dataset config (sd-scripts format) has an optional `[general]` table and a `[[datasets]]` array, each dataset
with a `[[datasets.subsets]]` array. Each setting is looked up in the subset, then its dataset, then `[general]`,
then the command line (argparse defaults included), then the built-in default; the first value that is set wins.

Without `--dataset_config`, `--train_data_dir` (and `--reg_data_dir`) folders named `<repeats>_<class tokens>`
become DreamBooth subsets, or `--in_json` makes one fine-tuning subset.

Subsets with `conditioning_data_dir` (all subsets of their dataset, and only with `--masked_loss`) pair each image
with the image of the same stem in that folder; its red channel is the loss mask.

Differences from sd-scripts, on purpose: integers are accepted for float keys (`validation_split = 0`), booleans
are rejected for integer keys, unknown keys name the closest valid key, and every problem is one AnimaError line.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from library.data.buckets import prepare_bucket_range
from library.data.captions import CaptionOptions
from library.data.datasets import (
    ANIMA_BUCKET_MULTIPLE,
    BadImages,
    DatasetGroup,
    ImageDataset,
    ImageInfo,
    balance_regularization,
    collect_subset_images,
    make_dataloader,
    split_train_validation,
)
from library.data.latent_cache import cache_group_latents
from library.data.records import RESIZE_INTERPOLATIONS, DatasetConfig, SubsetConfig
from library.data.text_cache import cache_group_text
from library.errors import AnimaError

logger = logging.getLogger(__name__)

__all__ = ["add_dataset_arguments", "build_dataset_groups", "cache_only_main", "DatasetGroup", "debug_dataset_main",
           "make_dataloader", "normalize_dataset_args", "load_dataset_config", "parse_face_crop_range",
           "resolve_dataset_configs"]

# ---------------------------------------------------------------------------------------------------------------
# Schema: key -> value kind. Kinds: int, float (int accepted), bool, str, resolution, float_pair, table.

DATASET_KEYS = {
    "batch_size": "int", "resolution": "resolution", "enable_bucket": "bool", "min_bucket_reso": "int",
    "max_bucket_reso": "int", "bucket_reso_steps": "int", "bucket_no_upscale": "bool", "validation_split": "float",
    "validation_seed": "int", "network_multiplier": "float", "resize_interpolation": "str",
}
SUBSET_KEYS = {
    "num_repeats": "int", "shuffle_caption": "bool", "caption_separator": "str", "keep_tokens": "int",
    "keep_tokens_separator": "str", "secondary_separator": "str", "enable_wildcard": "bool", "color_aug": "bool",
    "flip_aug": "bool", "face_crop_aug_range": "float_pair", "random_crop": "bool", "caption_prefix": "str",
    "caption_suffix": "str", "token_warmup_min": "int", "token_warmup_step": "float", "custom_attributes": "table",
    "resize_interpolation": "str", "caption_dropout_rate": "float", "caption_dropout_every_n_epochs": "int",
    "caption_tag_dropout_rate": "float",
}
DREAMBOOTH_SHARED_KEYS = {"caption_extension": "str", "class_tokens": "str", "cache_info": "bool"}
DREAMBOOTH_SUBSET_KEYS = {"image_dir": "str", "is_reg": "bool", "alpha_mask": "bool"}
FINETUNING_SUBSET_KEYS = {"metadata_file": "str", "image_dir": "str", "alpha_mask": "bool"}
CONDITIONING_SUBSET_KEYS = {"image_dir": "str", "conditioning_data_dir": "str"}
COMMAND_LINE_ONLY = {"prior_loss_weight", "debug_dataset", "max_token_length", "train_batch_size",
                     "dataset_repeats"}
ALL_KEYS = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_SHARED_KEYS, **DREAMBOOTH_SUBSET_KEYS,
            **FINETUNING_SUBSET_KEYS, **CONDITIONING_SUBSET_KEYS, "subsets": "list"}

# The one place for defaults; the command-line flags use these too.
DEFAULTS: dict[str, Any] = {
    "batch_size": 1, "resolution": None, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False, "validation_split": 0.0, "validation_seed": None,
    "network_multiplier": 1.0, "resize_interpolation": None,
    "num_repeats": 1, "shuffle_caption": False, "caption_separator": ",", "keep_tokens": 0,
    "keep_tokens_separator": "", "secondary_separator": None, "enable_wildcard": False, "color_aug": False,
    "flip_aug": False, "face_crop_aug_range": None, "random_crop": False, "caption_prefix": None,
    "caption_suffix": None, "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None,
    "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
    "caption_extension": ".caption", "class_tokens": None, "cache_info": False,
    "image_dir": None, "is_reg": False, "alpha_mask": False, "metadata_file": None,
}
# Config key -> command-line flag, where the names differ.
CLI_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
NO_CLI_FALLBACK = {"network_multiplier", "custom_attributes", "class_tokens", "image_dir", "is_reg", "metadata_file"}
DEBUG_DATASET_BATCHES = 4  # batches --debug_dataset prints


# ---------------------------------------------------------------------------------------------------------------
# Command line


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Every dataset and caching flag (names and defaults as in sd-scripts, plus --strict_images)."""
    g = parser.add_argument_group("dataset and caching")
    d = DEFAULTS
    g.add_argument("--dataset_config", type=str, default=None,
                   help="dataset config (.toml or .json); then --train_data_dir/--reg_data_dir/--in_json are ignored")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="folder of `<repeats>_<class tokens>` sub-folders of training images")
    g.add_argument("--reg_data_dir", type=str, default=None, help="the same for regularization images")
    g.add_argument("--in_json", type=str, default=None, help="fine-tuning metadata JSON (images in --train_data_dir)")
    g.add_argument("--dataset_repeats", type=int, default=d["num_repeats"], help="repeats for --in_json datasets")
    g.add_argument("--resolution", type=str, default=None, help='training resolution: "S" or "W,H"')
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=d["min_bucket_reso"], help="smallest bucket side")
    g.add_argument("--max_bucket_reso", type=int, default=d["max_bucket_reso"], help="largest bucket side")
    g.add_argument("--bucket_reso_steps", type=int, default=d["bucket_reso_steps"],
                   help="bucket side granularity (a multiple of 16 for Anima)")
    g.add_argument("--bucket_no_upscale", action="store_true", help="per-image buckets; never enlarge images")
    g.add_argument("--resize_interpolation", type=str, default=None, choices=list(RESIZE_INTERPOLATIONS),
                   help="resize filter, as in sd-scripts: lanczos/box by Pillow, the others by OpenCV (default: "
                        "area when no side grows, else lanczos)")
    g.add_argument("--caption_extension", type=str, default=d["caption_extension"],
                   help="caption file extension (default .caption)")
    g.add_argument("--caption_extention", type=str, default=None, help="legacy spelling of --caption_extension")
    g.add_argument("--shuffle_caption", action="store_true", help="shuffle the comma-separated tags")
    g.add_argument("--caption_separator", type=str, default=d["caption_separator"], help="tag separator")
    g.add_argument("--keep_tokens", type=int, default=d["keep_tokens"], help="keep the first N tags in place")
    g.add_argument("--keep_tokens_separator", type=str, default=d["keep_tokens_separator"],
                   help="tags before this separator stay in place (e.g. |||)")
    g.add_argument("--secondary_separator", type=str, default=None,
                   help="joins tags that move/drop together; replaced by the tag separator")
    g.add_argument("--enable_wildcard", action="store_true", help="{a|b} choices and multi-line captions")
    g.add_argument("--caption_prefix", type=str, default=None, help="text put before every caption")
    g.add_argument("--caption_suffix", type=str, default=None, help="text put after every caption")
    g.add_argument("--caption_dropout_rate", type=float, default=d["caption_dropout_rate"],
                   help="probability of training a sample with an empty caption")
    g.add_argument("--caption_dropout_every_n_epochs", type=int, default=d["caption_dropout_every_n_epochs"],
                   help="drop every caption in epochs divisible by N")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=d["caption_tag_dropout_rate"],
                   help="probability of dropping each tag")
    g.add_argument("--token_warmup_min", type=int, default=d["token_warmup_min"], help="tags kept at step 0")
    g.add_argument("--token_warmup_step", type=float, default=d["token_warmup_step"],
                   help="steps (or fraction of the run if < 1) until all tags are used")
    g.add_argument("--color_aug", action="store_true",
                   help="sd-scripts' colour augmentation: a hue shift or a gamma on 0-255 values, a third of the time")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flips")
    g.add_argument("--face_crop_aug_range", type=str, default=None,
                   help='"a,b": crop around the face named in the file (name_cx_cy_w_h) so its size is '
                        "min(resolution)/r, r random in [a, b]; only without bucketing, not with --cache_latents")
    g.add_argument("--random_crop", action="store_true", help="random instead of centred crops")
    g.add_argument("--alpha_mask", action="store_true", help="use the image alpha channel as the loss mask")
    g.add_argument("--conditioning_data_dir", type=str, default=None,
                   help="with --train_data_dir and --masked_loss: folder of mask images named like the images "
                        "(red channel: 0 = ignore, 255 = full loss)")
    g.add_argument("--debug_dataset", action="store_true",
                   help="print the buckets and the first batches (image keys, captions, masks) and exit; writes "
                        "nothing")
    g.add_argument("--cache_info", action="store_true", help="keep image sizes in metadata_cache.json per folder")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    g.add_argument("--validation_split", type=float, default=d["validation_split"],
                   help="fraction of the images held out for validation")
    g.add_argument("--validation_seed", type=int, default=None, help="seed of the validation split (default --seed)")
    g.add_argument("--strict_images", action="store_true",
                   help="stop on a corrupt/truncated image instead of skipping it with a warning")
    g.add_argument("--cache_latents", action="store_true", help="encode all images with the VAE once, in memory")
    g.add_argument("--cache_latents_to_disk", action="store_true",
                   help="cache latents in *_anima.npz files beside the images (implies --cache_latents)")
    g.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call while caching")
    g.add_argument("--skip_cache_check", action="store_true",
                   help="reuse any cache file that has the needed keys, without checking what produced it")
    g.add_argument("--cache_text_encoder_outputs", action="store_true",
                   help="encode all captions once (needs --network_train_unet_only)")
    g.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true",
                   help="cache text outputs in *_anima_te.npz files (implies --cache_text_encoder_outputs)")
    g.add_argument("--text_encoder_batch_size", type=int, default=None,
                   help="captions per text-encoder call while caching (default: the dataset batch size)")
    g.add_argument("--max_data_loader_n_workers", type=int, default=8, help="data loader workers (capped by CPUs)")
    g.add_argument("--persistent_data_loader_workers", action="store_true",
                   help="keep data loader workers alive between epochs")


def parse_resolution(value: Any, where: str) -> tuple[int, int] | None:
    """"S" / "W,H" / int / [W, H] -> (W, H)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parts = [int(p) for p in value.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise AnimaError(f"{where}: resolution {value!r} is not \"S\" or \"W,H\" with whole numbers") from None
        value = parts if len(parts) != 1 else parts[0]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise AnimaError(f"{where}: resolution must be one integer or [width, height], got {value!r}")
    if min(value) <= 0:
        raise AnimaError(f"{where}: resolution sides must be positive, got {value!r}")
    return int(value[0]), int(value[1])


def parse_face_crop_range(value: Any, where: str) -> tuple[float, float] | None:
    """"a,b" / [a, b] -> (a, b) with 0 < a <= b."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [float(p) for p in value.split(",")]
        except ValueError:
            raise AnimaError(f'{where}: face_crop_aug_range {value!r} must be two numbers "a,b", e.g. "2.0,4.0"'
                             ) from None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise AnimaError(f"{where}: face_crop_aug_range must be two numbers [a, b], got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not 0 < low <= high:
        raise AnimaError(f"{where}: face_crop_aug_range [{low}, {high}] must satisfy 0 < a <= b (a = the largest "
                         "face, b = the smallest, as fractions min(resolution) / face size)")
    return low, high


def normalize_dataset_args(args: argparse.Namespace) -> None:
    """The legacy --caption_extention alias, and the in-memory caching flags each *_to_disk flag implies; in
    place and idempotent (the trainer's flag parsing runs it; the dataset builders run it for direct callers)."""
    if getattr(args, "caption_extention", None) and args.caption_extension in (None, DEFAULTS["caption_extension"]):
        args.caption_extension = args.caption_extention
    if getattr(args, "cache_latents_to_disk", False):
        args.cache_latents = True
    if getattr(args, "cache_text_encoder_outputs_to_disk", False):
        args.cache_text_encoder_outputs = True


# ---------------------------------------------------------------------------------------------------------------
# Loading and validating a config file


def load_dataset_config(path: str | Path) -> dict[str, Any]:
    """Read a .toml or .json dataset config; AnimaError for a missing file, another extension or a parse error."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".toml", ".json"))
        hint = f" (it holds {', '.join(inside[:3])})" if inside else ""
        raise AnimaError(f"--dataset_config {path} is a folder; give the dataset config file itself, a .toml or .json "
                         f"file{hint}")
    if not path.is_file():
        raise AnimaError(f"--dataset_config {path} not found; fix the path")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise AnimaError(f"--dataset_config {path}: use a .toml or .json file")
    if suffix == ".toml":
        import toml  # imported only for a TOML file: a JSON config (or none) needs no toml, e.g. on the GPU image

        loads, errors = toml.loads, (toml.TomlDecodeError, UnicodeDecodeError)
    else:
        loads, errors = json.loads, (json.JSONDecodeError, UnicodeDecodeError)
    try:
        return loads(path.read_text(encoding="utf-8"))
    except errors as exc:
        raise AnimaError(f"--dataset_config {path} cannot be parsed: {str(exc).splitlines()[0]}") from exc


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "table":
        return isinstance(value, dict)
    if kind == "float_pair":
        return isinstance(value, list) and len(value) == 2 and all(_type_ok("float", v) for v in value)
    if kind == "resolution":
        return _type_ok("int", value) or (isinstance(value, list) and len(value) == 2
                                          and all(_type_ok("int", v) for v in value))
    return False


_KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "table": "a table", "float_pair": "a list of two numbers",
               "resolution": "an integer or [width, height]"}


def _check_table(table: Any, allowed: dict[str, str], where: str, scope: str) -> None:
    if not isinstance(table, dict):
        raise AnimaError(f"{where}: expected a table, got {type(table).__name__}")
    for key, value in table.items():
        if key == "subsets" and scope == "[[datasets]]":
            continue
        if key not in allowed:
            raise AnimaError(f"{where}: {_unknown_key_message(key, scope)}")
        kind = allowed[key]
        if not _type_ok(kind, value):
            raise AnimaError(f"{where}: {key} must be {_KIND_WORDS[kind]}, got {value!r}")


def _unknown_key_message(key: str, scope: str) -> str:
    if key in COMMAND_LINE_ONLY:
        return f"{key!r} is a command-line option (--{key}), not a dataset config key; remove it"
    if key in ALL_KEYS:
        if key in DATASET_KEYS:
            place = "[[datasets]] or [general]"
        elif key in DREAMBOOTH_SUBSET_KEYS or key in FINETUNING_SUBSET_KEYS or key in CONDITIONING_SUBSET_KEYS:
            place = "[[datasets.subsets]]"
        elif key in DREAMBOOTH_SHARED_KEYS:
            place = "a DreamBooth (image_dir) dataset; fine-tuning (metadata_file) datasets do not use it"
        else:
            place = "another table"
        return f"key {key!r} is not allowed in {scope}; it belongs in {place}"
    close = difflib.get_close_matches(key, list(ALL_KEYS) + ["datasets", "general"], n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "; remove it"
    return f"unknown key {key!r} in {scope}{hint}"


def _subset_kind(dataset: dict[str, Any], where: str) -> str:
    subsets = dataset.get("subsets")
    if not isinstance(subsets, list) or not subsets:
        raise AnimaError(f"{where}: a dataset needs at least one [[datasets.subsets]] table")
    has_metadata = [isinstance(s, dict) and "metadata_file" in s for s in subsets]
    has_conditioning = [isinstance(s, dict) and "conditioning_data_dir" in s for s in subsets]
    if any(has_conditioning):
        if not all(has_conditioning) or any(has_metadata):
            raise AnimaError(f"{where}: either every subset of a dataset has conditioning_data_dir (masked loss) or "
                             "none has; put the other subsets in a separate [[datasets]]")
        return "conditioning"
    if all(has_metadata):
        return "finetuning"
    if any(has_metadata):
        raise AnimaError(f"{where}: DreamBooth subsets (image_dir) and fine-tuning subsets (metadata_file) cannot be "
                         "mixed in one dataset; put them in separate [[datasets]]")
    return "dreambooth"


def validate_user_config(config: dict[str, Any], source: str) -> None:
    """Check every key's place and type; raises AnimaError naming the location and the fix."""
    for key in config:
        if key not in ("general", "datasets"):
            raise AnimaError(f"{source}: {_unknown_key_message(key, 'the top level')} (only [general] and "
                             "[[datasets]] are allowed there)")
    general_allowed = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_SHARED_KEYS}
    _check_table(config.get("general", {}), general_allowed, f"{source} [general]", "[general]")
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list):
        raise AnimaError(f"{source}: datasets must be an array of tables ([[datasets]])")
    for i, dataset in enumerate(datasets):
        where = f"{source} datasets[{i}]"
        if not isinstance(dataset, dict):
            raise AnimaError(f"{where}: expected a table")
        kind = _subset_kind(dataset, where)
        if kind == "dreambooth":
            dataset_allowed = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_SHARED_KEYS}
            subset_allowed = {**SUBSET_KEYS, **DREAMBOOTH_SHARED_KEYS, **DREAMBOOTH_SUBSET_KEYS}
        elif kind == "conditioning":
            dataset_allowed = {**DATASET_KEYS, **SUBSET_KEYS, **DREAMBOOTH_SHARED_KEYS}
            subset_allowed = {**SUBSET_KEYS, **DREAMBOOTH_SHARED_KEYS, **CONDITIONING_SUBSET_KEYS}
        else:
            dataset_allowed = {**DATASET_KEYS, **SUBSET_KEYS}
            subset_allowed = {**SUBSET_KEYS, **FINETUNING_SUBSET_KEYS}
        _check_table(dataset, dataset_allowed, where, "[[datasets]]")
        for j, subset in enumerate(dataset["subsets"]):
            subset_where = f"{where}.subsets[{j}]"
            if kind == "conditioning":
                for key in ("is_reg", "alpha_mask"):
                    if isinstance(subset, dict) and key in subset:
                        raise AnimaError(f"{subset_where}: {key} cannot be used with conditioning_data_dir (the "
                                         "conditioning images are the loss masks); remove it")
            _check_table(subset, subset_allowed, subset_where, "[[datasets.subsets]]")
            required = "metadata_file" if kind == "finetuning" else "image_dir"
            if required not in subset:
                raise AnimaError(f"{subset_where}: required key {required!r} is missing")


# ---------------------------------------------------------------------------------------------------------------
# Resolving the fallback chain


def resolve_dataset_configs(config: dict[str, Any], args: argparse.Namespace, source: str) -> list[DatasetConfig]:
    """Apply subset > dataset > [general] > command line > default to every key; check values."""
    general = config.get("general", {})
    results = []
    for i, dataset in enumerate(config.get("datasets", [])):
        where = f"{source} datasets[{i}]"
        kind = _subset_kind(dataset, where)

        def pick(key: str, *tables: dict[str, Any]) -> Any:
            return _pick(key, args, *tables)

        dataset_config = DatasetConfig(
            where=where, is_dreambooth=kind == "dreambooth",
            batch_size=pick("batch_size", dataset, general),
            resolution=parse_resolution(pick("resolution", dataset, general), where),
            enable_bucket=bool(pick("enable_bucket", dataset, general)),
            min_bucket_reso=pick("min_bucket_reso", dataset, general),
            max_bucket_reso=pick("max_bucket_reso", dataset, general),
            bucket_reso_steps=pick("bucket_reso_steps", dataset, general),
            bucket_no_upscale=bool(pick("bucket_no_upscale", dataset, general)),
            validation_split=float(pick("validation_split", dataset, general)),
            validation_seed=pick("validation_seed", dataset, general),
            network_multiplier=float(pick("network_multiplier", dataset, general)),
            resize_interpolation=pick("resize_interpolation", dataset, general),
        )
        _check_dataset_values(dataset_config)
        if kind == "conditioning" and not getattr(args, "masked_loss", False):
            raise AnimaError(f"{where}: conditioning_data_dir gives loss masks, which need --masked_loss; add "
                             "--masked_loss or remove conditioning_data_dir")
        for j, subset in enumerate(dataset["subsets"]):
            subset_where = f"{where}.subsets[{j}]"

            def sub(key: str, subset: dict[str, Any] = subset, dataset: dict[str, Any] = dataset) -> Any:
                return _pick(key, args, subset, dataset, general)

            captions = CaptionOptions(
                shuffle_caption=bool(sub("shuffle_caption")), caption_separator=sub("caption_separator"),
                keep_tokens=sub("keep_tokens"), keep_tokens_separator=sub("keep_tokens_separator") or "",
                secondary_separator=sub("secondary_separator"), enable_wildcard=bool(sub("enable_wildcard")),
                caption_prefix=sub("caption_prefix"), caption_suffix=sub("caption_suffix"),
                caption_dropout_rate=float(sub("caption_dropout_rate")),
                caption_dropout_every_n_epochs=sub("caption_dropout_every_n_epochs"),
                caption_tag_dropout_rate=float(sub("caption_tag_dropout_rate")),
                token_warmup_min=sub("token_warmup_min"), token_warmup_step=sub("token_warmup_step"),
            )
            extension = sub("caption_extension") or DEFAULTS["caption_extension"]
            if not extension.startswith("."):
                extension = "." + extension
            face_range = parse_face_crop_range(sub("face_crop_aug_range"), subset_where)
            if face_range is not None and dataset_config.enable_bucket:
                logger.warning("%s: face_crop_aug_range only applies without bucketing; with enable_bucket the "
                               "images are cropped to their bucket and the face boxes are ignored", subset_where)
            alpha_mask = bool(sub("alpha_mask"))
            if kind == "conditioning" and alpha_mask:
                raise AnimaError(f"{subset_where}: --alpha_mask cannot be combined with conditioning_data_dir (both "
                                 "give the loss mask); drop --alpha_mask or the conditioning_data_dir")
            subset_config = SubsetConfig(
                kind=kind, where=subset_where,
                image_dir=subset.get("image_dir"), metadata_file=subset.get("metadata_file"),
                conditioning_data_dir=subset.get("conditioning_data_dir"),
                is_reg=bool(subset.get("is_reg", False)), class_tokens=pick("class_tokens", subset, dataset, general),
                caption_extension=extension, cache_info=bool(sub("cache_info")), alpha_mask=alpha_mask,
                num_repeats=sub("num_repeats"), captions=captions, color_aug=bool(sub("color_aug")),
                flip_aug=bool(sub("flip_aug")), random_crop=bool(sub("random_crop")),
                face_crop_aug_range=face_range,
                resize_interpolation=sub("resize_interpolation") if subset.get("resize_interpolation") else None,
                custom_attributes=dict(sub("custom_attributes") or {}),
            )
            _check_subset_values(subset_config)
            dataset_config.subsets.append(subset_config)
        results.append(dataset_config)
    return results


def _pick(key: str, args: argparse.Namespace, *tables: dict[str, Any]) -> Any:
    """The first value that is set: the given tables in order, then the command line, then DEFAULTS."""
    for table in tables:
        if table.get(key) is not None:
            return table[key]
    if key not in NO_CLI_FALLBACK:
        value = getattr(args, CLI_NAMES.get(key, key), None)
        if value is not None:
            return value
    return DEFAULTS.get(key)


def _check_dataset_values(config: DatasetConfig) -> None:
    where = config.where
    if config.batch_size < 1:
        raise AnimaError(f"{where}: batch_size must be at least 1, got {config.batch_size}")
    if config.resolution is None:
        raise AnimaError(f"{where}: resolution is required; set resolution in the dataset config or --resolution")
    if config.resize_interpolation is not None and config.resize_interpolation not in RESIZE_INTERPOLATIONS:
        raise AnimaError(f"{where}: resize_interpolation {config.resize_interpolation!r} is not one of "
                         f"{', '.join(RESIZE_INTERPOLATIONS)}")
    if not 0.0 <= config.validation_split <= 1.0:
        raise AnimaError(f"{where}: validation_split must be between 0 and 1, got {config.validation_split}")
    if config.enable_bucket:
        if config.bucket_reso_steps % ANIMA_BUCKET_MULTIPLE != 0:
            raise AnimaError(f"{where}: bucket_reso_steps must be a multiple of {ANIMA_BUCKET_MULTIPLE} for Anima "
                             f"(got {config.bucket_reso_steps}); use 16, 32 or 64")
        if config.bucket_no_upscale:
            if (config.min_bucket_reso, config.max_bucket_reso) != (DEFAULTS["min_bucket_reso"],
                                                                    DEFAULTS["max_bucket_reso"]):
                logger.warning("%s: min/max_bucket_reso are ignored with bucket_no_upscale", where)
        else:
            config.min_bucket_reso, config.max_bucket_reso = prepare_bucket_range(
                config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps, where)
    elif any(side % ANIMA_BUCKET_MULTIPLE for side in config.resolution):
        raise AnimaError(f"{where}: without bucketing, resolution sides must be multiples of {ANIMA_BUCKET_MULTIPLE} "
                         f"for Anima (got {config.resolution[0]}x{config.resolution[1]})")


def _check_subset_values(subset: SubsetConfig) -> None:
    where = subset.where
    if subset.num_repeats < 0:
        raise AnimaError(f"{where}: num_repeats must be at least 1 (0 skips the subset), got {subset.num_repeats}")
    if subset.resize_interpolation is not None and subset.resize_interpolation not in RESIZE_INTERPOLATIONS:
        raise AnimaError(f"{where}: resize_interpolation {subset.resize_interpolation!r} is not one of "
                         f"{', '.join(RESIZE_INTERPOLATIONS)}")
    options = subset.captions
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(options, name) <= 1.0:
            raise AnimaError(f"{where}: {name} must be between 0 and 1, got {getattr(options, name)}")
    for name in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
        if getattr(options, name) < 0:
            raise AnimaError(f"{where}: {name} must not be negative, got {getattr(options, name)}")
    if options.token_warmup_step < 0:
        raise AnimaError(f"{where}: token_warmup_step must not be negative, got {options.token_warmup_step}")
    if not options.caption_separator:
        raise AnimaError(f"{where}: caption_separator must not be empty")


# ---------------------------------------------------------------------------------------------------------------
# Configs synthesized from the command line

def _parse_repeats_folder(name: str) -> tuple[int, str] | None:
    """(repeats, class tokens) of a folder named `<repeats>_<class tokens>` or just `<repeats>`, read as sd-scripts
    reads it: the text before the first "_" is an integer in Python's int() syntax ("05", "+3", " 5"), the rest
    (possibly empty, underscores kept) the class tokens; None when the first part is not an integer."""
    head, _, class_tokens = name.partition("_")
    try:
        return int(head), class_tokens
    except ValueError:
        return None


def _dreambooth_subsets_from_folder(parent: str, is_reg: bool, flag: str) -> list[dict[str, Any]]:
    root = Path(parent)
    if not root.is_dir():
        raise AnimaError(f"{flag} {root} does not exist or is not a folder; fix the path")
    subsets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        parsed = _parse_repeats_folder(folder.name)
        if parsed is None:
            logger.warning("%s: folder %s is skipped: its name must be <repeats>_<class tokens> (e.g. 10_sks girl) "
                           "or just <repeats>", flag, folder.name)
            continue
        repeats, class_tokens = parsed
        if repeats < 1:
            logger.warning("%s: folder %s is skipped: repeats must be at least 1", flag, folder.name)
            continue
        subsets.append({"image_dir": str(folder), "num_repeats": repeats, "class_tokens": class_tokens,
                        "is_reg": is_reg})
    return subsets


def config_from_command_line(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The user config implied by --train_data_dir/--reg_data_dir (DreamBooth) or --in_json (fine-tuning).

    With --conditioning_data_dir every --train_data_dir sub-folder takes its mask images from that folder.
    """
    conditioning_dir = getattr(args, "conditioning_data_dir", None)
    if conditioning_dir and (getattr(args, "in_json", None) or getattr(args, "reg_data_dir", None)):
        raise AnimaError("--conditioning_data_dir works with --train_data_dir alone (no --in_json, no "
                         "--reg_data_dir); use a dataset config for other layouts")
    if getattr(args, "in_json", None):
        subset = {"metadata_file": args.in_json}
        if getattr(args, "train_data_dir", None):
            subset["image_dir"] = args.train_data_dir
        return {"datasets": [{"subsets": [subset]}]}, "--in_json"
    if not getattr(args, "train_data_dir", None):
        raise AnimaError("no dataset: give --dataset_config (a dataset TOML) or --train_data_dir")
    subsets = _dreambooth_subsets_from_folder(args.train_data_dir, False, "--train_data_dir")
    if not subsets:
        raise AnimaError(f"--train_data_dir {args.train_data_dir} has no <repeats>_<class tokens> sub-folder "
                         "(e.g. 10_sks girl); put the images in such a folder")
    if conditioning_dir:
        for subset in subsets:
            subset["conditioning_data_dir"] = conditioning_dir
            del subset["is_reg"]
    if getattr(args, "reg_data_dir", None):
        subsets += _dreambooth_subsets_from_folder(args.reg_data_dir, True, "--reg_data_dir")
    return {"datasets": [{"subsets": subsets}]}, "--train_data_dir"


# ---------------------------------------------------------------------------------------------------------------
# Building the dataset groups


def build_dataset_groups(args: argparse.Namespace, seed: int | None = None
                         ) -> tuple[DatasetGroup, DatasetGroup | None]:
    """(training group, validation group or None) from --dataset_config or the command-line dataset flags.

    Everything is validated (config keys, values, folders, captions, image headers, caching options) before any
    image is decoded.
    """
    normalize_dataset_args(args)
    if getattr(args, "dataset_repeats", 1) < 0:
        raise AnimaError(f"--dataset_repeats must be at least 1 (0 skips the subset), got {args.dataset_repeats}")
    if getattr(args, "dataset_config", None):
        for flag in ("train_data_dir", "reg_data_dir", "in_json", "conditioning_data_dir"):
            if getattr(args, flag, None):
                logger.warning("--%s is ignored because --dataset_config is given", flag)
        source = str(args.dataset_config)
        user_config = load_dataset_config(args.dataset_config)
    else:
        user_config, source = config_from_command_line(args)
    validate_user_config(user_config, source)
    # Parse --resolution once so the fallback sees (W, H).
    cli = copy.copy(args)  # the fallback values; resolution parsed once below
    cli.resolution = parse_resolution(getattr(args, "resolution", None), "--resolution")
    cli.face_crop_aug_range = parse_face_crop_range(getattr(args, "face_crop_aug_range", None),
                                                    "--face_crop_aug_range")
    dataset_configs = resolve_dataset_configs(user_config, cli, source)
    if getattr(args, "masked_loss", False) and not any(s.alpha_mask or s.conditioning_data_dir
                                                       for c in dataset_configs for s in c.subsets):
        logger.warning("--masked_loss is on but no subset has conditioning_data_dir or alpha_mask, so the loss "
                       "is not masked")

    if seed is None:  # the run's seed (default --seed); without one, the split and the order are random
        seed = getattr(args, "seed", None)
    if seed is None:
        seed = random.randint(0, 2**31)
    dataset_seed = random.Random(seed).randint(0, 2**31)
    prior_loss_weight = getattr(args, "prior_loss_weight", None)  # 0 is a weight (reg images add no loss)
    prior_loss_weight = 1.0 if prior_loss_weight is None else float(prior_loss_weight)
    strict = bool(getattr(args, "strict_images", False))
    bad_images = BadImages(strict)

    zero_repeats = [s.where for c in dataset_configs for s in c.subsets if s.num_repeats == 0 and not s.is_reg]
    train_datasets, val_datasets = [], []
    write_cache_info = not getattr(args, "debug_dataset", False)  # --debug_dataset writes nothing
    # Validation splits without a validation_seed: sd-scripts shuffles the DreamBooth subsets one after another
    # with its global generator, seeded with the run's seed just before; one generator here gives those shuffles.
    split_stream = random.Random(seed)
    for config in dataset_configs:
        train, val = _build_dataset(config, bad_images, seed, dataset_seed, prior_loss_weight, write_cache_info,
                                    split_stream)
        if train is not None:
            train_datasets.append(train)
        if val is not None:
            val_datasets.append(val)
    bad_images.report()
    if not train_datasets or sum(d.num_train_images for d in train_datasets) == 0:
        if zero_repeats:
            raise AnimaError(f"no training images: num_repeats = 0 skips {', '.join(zero_repeats)} and no other subset "
                             "has images; set num_repeats to 1 or more")
        searched = ", ".join(sorted({str(s.image_dir or s.metadata_file) for c in dataset_configs for s in c.subsets
                                     if not s.is_reg})) or "no training subset"
        raise AnimaError(f"{source}: no training images found in {searched}; check image_dir / metadata_file and the "
                         "image extensions (.png .jpg .jpeg .webp .bmp)")

    if prior_loss_weight != 1.0 and not any(d.num_reg_images for d in train_datasets):
        logger.warning("--prior_loss_weight %g has no effect: no dataset has regularization images (is_reg = "
                       "true or --reg_data_dir)", prior_loss_weight)
    from_config = bool(getattr(args, "dataset_config", None))
    train_group = DatasetGroup(train_datasets, seed=dataset_seed, from_config=from_config, strict_images=strict)
    val_group = (DatasetGroup(val_datasets, seed=dataset_seed, from_config=from_config, is_validation=True,
                              strict_images=strict) if val_datasets else None)
    _log_summary(train_group, val_group)
    for group in (train_group, val_group):
        if group is not None:
            group.check_caching_options(bool(getattr(args, "cache_latents", False)),
                                        bool(getattr(args, "cache_text_encoder_outputs", False)))
    return train_group, val_group


def _build_dataset(config: DatasetConfig, bad_images: BadImages, seed: int, dataset_seed: int,
                   prior_loss_weight: float, write_cache_info: bool, split_stream: random.Random
                   ) -> tuple[ImageDataset | None, ImageDataset | None]:
    train_infos: list[ImageInfo] = []
    reg_infos: list[ImageInfo] = []
    val_infos: list[ImageInfo] = []
    seen: set[str] = set()
    used_subsets: list[SubsetConfig] = []
    for subset in config.subsets:
        if subset.num_repeats < 1:
            logger.warning("%s: num_repeats = 0, this subset is skipped", subset.where)
            continue
        identity = str(Path(subset.metadata_file if subset.kind == "finetuning" else subset.image_dir or "")
                       .resolve())
        if identity in seen:
            logger.warning("%s: the same folder/metadata is already a subset of this dataset; skipped", subset.where)
            continue
        seen.add(identity)
        index = len(used_subsets)
        used_subsets.append(subset)
        infos = collect_subset_images(subset, index, bad_images, write_cache_info=write_cache_info)
        if subset.is_reg:
            reg_infos.extend(infos)
            continue
        if config.validation_split > 0 and infos:
            if config.validation_seed is not None:  # each subset shuffled afresh with it
                split_rng = random.Random(config.validation_seed)
            elif config.is_dreambooth:
                split_rng = split_stream
            else:  # sd-scripts does not split fine-tuning datasets, so they leave the shared stream alone
                split_rng = random.Random(seed)
            infos, held_out = split_train_validation(infos, config.validation_split, split_rng)
            for info in held_out:
                info.num_repeats = 1
            val_infos.extend(held_out)
        train_infos.extend(infos)
    config.subsets = used_subsets
    if config.is_dreambooth:
        if any(s.is_reg for s in used_subsets) and not reg_infos:
            logger.warning("%s: no regularization images found", config.where)
        reg_infos = balance_regularization(train_infos, reg_infos)
    train = ImageDataset(config, train_infos + reg_infos, prior_loss_weight=prior_loss_weight,
                         seed=dataset_seed) if train_infos else None
    val = ImageDataset(config, val_infos, prior_loss_weight=prior_loss_weight, seed=dataset_seed,
                       is_validation=True) if val_infos else None
    return train, val


def _log_summary(train: DatasetGroup, val: DatasetGroup | None) -> None:
    for i, dataset in enumerate(train.datasets):
        cfg = dataset.config
        logger.info("dataset %d: %d train samples (%d reg) in %d batches of up to %d, resolution %s, buckets %s",
                    i, dataset.num_train_images, dataset.num_reg_images, len(dataset), cfg.batch_size,
                    cfg.resolution, ", ".join(f"{w}x{h}" for w, h in dataset.bucket_sizes))
    if val is not None:
        logger.info("validation: %d images in %d batches", val.num_train_images, len(val))


# ---------------------------------------------------------------------------------------------------------------
# Cache-only mode


def text_encoder_batch_size(args: argparse.Namespace, group: DatasetGroup) -> int:
    """Captions per text-encoder call while caching: --text_encoder_batch_size, else the dataset batch size (the
    largest of the group's datasets), as in sd-scripts."""
    return getattr(args, "text_encoder_batch_size", None) or max(d.config.batch_size for d in group.datasets)


def cache_only_main(args: argparse.Namespace, *, load_vae: Callable[[], tuple[Any, str]] | None = None,
                    load_text_encoding: Callable[[], Any] | None = None,
                    is_main_process: bool = True) -> tuple[DatasetGroup, DatasetGroup | None]:
    """Build the datasets and write the disk caches, then return (the trainer's `--cache_only`).

    `load_vae()` returns (vae, vae_identity); `load_text_encoding()` returns the text encoding object. They are
    only called when that cache is asked for, so a run caching latents never loads the text encoder.
    """
    normalize_dataset_args(args)
    want_latents = bool(getattr(args, "cache_latents_to_disk", False))
    want_text = bool(getattr(args, "cache_text_encoder_outputs_to_disk", False))
    if not (want_latents or want_text):
        raise AnimaError("--cache_only writes disk caches: add --cache_latents_to_disk and/or "
                         "--cache_text_encoder_outputs_to_disk")
    train, val = build_dataset_groups(args)
    groups = [g for g in (train, val) if g is not None]
    skip_check = bool(getattr(args, "skip_cache_check", False))
    if want_latents:
        if load_vae is None:
            raise AnimaError("--cache_latents_to_disk needs the VAE: give --vae")
        vae, identity = load_vae()
        for group in groups:
            cache_group_latents(group, vae, identity, batch_size=int(getattr(args, "vae_batch_size", 1) or 1),
                                to_disk=True, skip_check=skip_check, is_main_process=is_main_process)
        del vae
    if want_text:
        if load_text_encoding is None:
            raise AnimaError("--cache_text_encoder_outputs_to_disk needs the text encoder: give --qwen3")
        text_encoding = load_text_encoding()
        for group in groups:
            cache_group_text(group, text_encoding, batch_size=text_encoder_batch_size(args, group), to_disk=True,
                             skip_check=skip_check, is_main_process=is_main_process)
    return train, val


# ---------------------------------------------------------------------------------------------------------------
# --debug_dataset


def debug_dataset_main(args: argparse.Namespace, *, num_batches: int = DEBUG_DATASET_BATCHES,
                       write: Callable[[str], None] = print) -> tuple[DatasetGroup, DatasetGroup | None]:
    """`--debug_dataset`: build the datasets, then print the buckets and the first batches of epoch 1.

    Each batch line names its dataset, bucket and images with the caption the model would see and, where the
    dataset has loss masks, the masked fraction. Nothing is written: no metadata_cache.json, no caches.
    """
    train, val = build_dataset_groups(args)
    for index, dataset in enumerate(train.datasets):
        config = dataset.config
        write(f"dataset {index}: {dataset.num_train_images} train + {dataset.num_reg_images} reg samples, "
              f"{len(dataset)} batches of up to {config.batch_size}, resolution {config.resolution}")
        for bucket in dataset.bucket_info()["buckets"].values():
            width, height = bucket["resolution"]
            write(f"  bucket {width}x{height}: {bucket['count']} samples")
    if val is not None:
        write(f"validation: {val.num_train_images} samples in {len(val)} batches")
    train.set_current_epoch(1)
    for index in range(min(num_batches, len(train))):
        batch = train[index]
        pixels = batch["images"] if batch["images"] is not None else batch["latents"]
        height, width = pixels.shape[-2:]
        write(f"batch {index}: {len(batch['image_keys'])} image(s), tensor {width}x{height}")
        masks = batch["loss_masks"]
        for row, (key, caption) in enumerate(zip(batch["image_keys"], batch["captions"])):
            masked = f", masked {1.0 - float(masks[row].mean()):.0%}" if masks is not None else ""
            write(f"  {key}{masked}: {caption!r}")
    return train, val
