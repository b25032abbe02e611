"""Resolved dataset settings: what one `[[datasets]]` entry and each of its subsets means after the
subset > dataset > [general] > command line > default fallback has been applied.

These plain records are produced by `library.data.config` and consumed by `library.data.datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from library.data import images as image_io
from library.data.captions import CaptionOptions

RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


@dataclass
class SubsetConfig:
    """One `[[datasets.subsets]]` entry, fully resolved."""

    kind: str  # "dreambooth", "finetuning" or "conditioning" (image_dir + conditioning_data_dir, masked loss)
    where: str  # e.g. "ds.toml datasets[0].subsets[1]", for messages
    image_dir: str | None = None
    conditioning_data_dir: str | None = None  # mask images with the same stems as the images
    metadata_file: str | None = None
    is_reg: bool = False
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    cache_info: bool = False
    alpha_mask: bool = False
    num_repeats: int = 1
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    color_aug: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    face_crop_aug_range: tuple[float, float] | None = None  # face size = min(resolution) / r, r in this range
    resize_interpolation: str | None = None
    custom_attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetConfig:
    """One `[[datasets]]` entry, fully resolved."""

    where: str
    is_dreambooth: bool  # DreamBooth: regularization images are balanced against training images
    batch_size: int = 1
    resolution: tuple[int, int] | None = None  # (W, H)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    subsets: list[SubsetConfig] = field(default_factory=list)

Size = tuple[int, int]


@dataclass
class ImageInfo:
    """One training image and what has been cached for it."""

    key: str  # the image path (DreamBooth) or the metadata key (fine-tuning)
    path: Path
    caption: str  # as read from the file / metadata, before any processing
    num_repeats: int
    is_reg: bool
    subset_index: int
    image_size: Size  # (W, H) as shown, after the EXIF orientation
    bucket: Size | None = None
    resized: Size | None = None
    latents: torch.Tensor | None = None  # [16, h, w] float32, memory cache
    latents_flipped: torch.Tensor | None = None
    cached_loss_mask: torch.Tensor | None = None  # [H, W] float32: alpha or conditioning mask, memory cache
    latents_npz: str | None = None  # set when latents are read from a disk cache at train time
    text: dict[str, torch.Tensor] | None = None  # per-sample text-encoder outputs (no batch axis)
    text_npz: str | None = None
    face: image_io.FaceBox | None = None  # from the file name, only when the subset uses face_crop_aug_range
    conditioning_path: Path | None = None  # the mask image of a conditioning_data_dir subset
    orientation: int = 1  # the file's EXIF orientation (image_size already has it applied)
    tags: str | None = None  # a fine-tuning record's tags (what ss_tag_frequency counts there)
