"""The ss_* dataset metadata written into LoRA files (values are strings, JSON where structured)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from library.data.captions import tag_frequency

if TYPE_CHECKING:
    from library.data.datasets import DatasetGroup, ImageDataset


def _subset_name(subset: Any) -> str:
    source = subset.metadata_file if subset.kind == "finetuning" else subset.image_dir
    return os.path.basename(os.path.normpath(source or ""))


def _dataset_tag_frequency(dataset: ImageDataset) -> dict[str, dict[str, int]]:
    frequency: dict[str, dict[str, int]] = {}
    for index, subset in enumerate(dataset.subsets):
        infos = [i for i in dataset.infos if i.subset_index == index]
        # Fine-tuning subsets count their records' tags only, DreamBooth subsets the caption texts (sd-scripts).
        texts = [i.tags for i in infos if i.tags] if subset.kind == "finetuning" else [i.caption for i in infos]
        counts = tag_frequency(texts)
        bucket = frequency.setdefault(_subset_name(subset), {})
        for tag, count in counts.items():
            bucket[tag] = bucket.get(tag, 0) + count
    return frequency


def _dataset_dirs(dataset: ImageDataset) -> dict[str, dict[str, int]]:
    dirs = {}
    for index, subset in enumerate(dataset.subsets):
        count = sum(1 for i in dataset.infos if i.subset_index == index)
        dirs[_subset_name(subset)] = {"n_repeats": subset.num_repeats, "img_count": count}
    return dirs


def _bucket_metadata(dataset: ImageDataset) -> dict[str, Any] | None:
    """The bucket table, or None (JSON null) without bucketing, as sd-scripts records it: every image is then
    scaled and cropped to the one resolution, so there are no buckets to describe."""
    return dataset.bucket_info() if dataset.config.enable_bucket else None


def _subset_metadata(dataset: ImageDataset, index: int) -> dict[str, Any]:
    subset = dataset.subsets[index]
    options = subset.captions
    data: dict[str, Any] = {
        "img_count": sum(1 for i in dataset.infos if i.subset_index == index),
        "num_repeats": subset.num_repeats,
        "color_aug": subset.color_aug,
        "flip_aug": subset.flip_aug,
        "random_crop": subset.random_crop,
        "shuffle_caption": options.shuffle_caption,
        "keep_tokens": options.keep_tokens,
        "keep_tokens_separator": options.keep_tokens_separator,
        "secondary_separator": options.secondary_separator,
        "enable_wildcard": options.enable_wildcard,
        "caption_prefix": options.caption_prefix,
        "caption_suffix": options.caption_suffix,
        "resize_interpolation": subset.resize_interpolation,
        "alpha_mask": subset.alpha_mask,
    }
    if subset.image_dir:
        data["image_dir"] = os.path.basename(os.path.normpath(subset.image_dir))
    if subset.kind == "dreambooth":
        data["class_tokens"] = subset.class_tokens
        data["is_reg"] = subset.is_reg
    elif subset.kind == "conditioning":
        data["conditioning_data_dir"] = os.path.basename(os.path.normpath(subset.conditioning_data_dir or ""))
    else:
        data["metadata_file"] = os.path.basename(subset.metadata_file or "")
    if subset.face_crop_aug_range is not None:
        data["face_crop_aug_range"] = list(subset.face_crop_aug_range)
    return data


def group_metadata(group: DatasetGroup) -> dict[str, str]:
    """ss_datasets etc. with a dataset config; the flat ss_* keys of a command-line dataset otherwise."""
    tag_freq: dict[str, dict[str, int]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for dataset in group.datasets:
        for name, counts in _dataset_tag_frequency(dataset).items():
            merged = tag_freq.setdefault(name, {})
            for tag, count in counts.items():
                merged[tag] = merged.get(tag, 0) + count
        dirs.update(_dataset_dirs(dataset))

    reg_images = sum(dataset.reg_images_with_repeats for dataset in group.datasets)
    counts = {"ss_num_train_images": str(group.num_train_images), "ss_num_reg_images": str(reg_images)}
    if group.from_config:
        datasets = []
        for dataset in group.datasets:
            cfg = dataset.config
            datasets.append({
                "is_dreambooth": cfg.is_dreambooth,
                "batch_size_per_device": cfg.batch_size,
                "num_train_images": dataset.num_train_images,
                "num_reg_images": dataset.reg_images_with_repeats,
                "resolution": list(cfg.resolution or ()),
                "enable_bucket": cfg.enable_bucket,
                "min_bucket_reso": cfg.min_bucket_reso if cfg.enable_bucket else None,
                "max_bucket_reso": cfg.max_bucket_reso if cfg.enable_bucket else None,
                "tag_frequency": _dataset_tag_frequency(dataset),
                "bucket_info": _bucket_metadata(dataset),
                "resize_interpolation": cfg.resize_interpolation,
                "subsets": [_subset_metadata(dataset, i) for i in range(len(dataset.subsets))],
            })
        return {
            **counts,
            "ss_datasets": json.dumps(datasets),
            "ss_tag_frequency": json.dumps(tag_freq),
            "ss_dataset_dirs": json.dumps(dirs),
        }

    dataset = group.datasets[0]
    cfg = dataset.config
    first = dataset.subsets[0] if dataset.subsets else None
    train_dirs = dict(dirs)
    reg_dirs = {}
    for subset in dataset.subsets:
        if subset.is_reg:
            name = _subset_name(subset)
            reg_dirs[name] = train_dirs.pop(name, {"n_repeats": subset.num_repeats, "img_count": 0})
    return {
        **counts,
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_resolution": str(tuple(cfg.resolution or ())),
        "ss_color_aug": str(bool(first and first.color_aug)),
        "ss_flip_aug": str(bool(first and first.flip_aug)),
        "ss_random_crop": str(bool(first and first.random_crop)),
        "ss_shuffle_caption": str(bool(first and first.captions.shuffle_caption)),
        "ss_enable_bucket": str(cfg.enable_bucket),
        "ss_bucket_no_upscale": str(cfg.bucket_no_upscale),
        "ss_min_bucket_reso": str(cfg.min_bucket_reso if cfg.enable_bucket else None),
        "ss_max_bucket_reso": str(cfg.max_bucket_reso if cfg.enable_bucket else None),
        "ss_keep_tokens": str(first.captions.keep_tokens if first else 0),
        "ss_dataset_dirs": json.dumps(train_dirs),
        "ss_reg_dataset_dirs": json.dumps(reg_dirs),
        "ss_tag_frequency": json.dumps(tag_freq),
        "ss_bucket_info": json.dumps(_bucket_metadata(dataset)),
    }
