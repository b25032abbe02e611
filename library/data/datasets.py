"""Datasets of images: collecting images and captions for a subset, buckets and batches, the DatasetGroup.

Every item of a dataset is one whole batch (images of one bucket), as in sd-scripts; the DataLoader therefore
runs with batch_size=1 and `make_dataloader`'s collate function unwraps the single item.

Randomness (flip, crop, colour, caption choices) is drawn from a generator seeded by (seed, epoch, dataset,
batch slot), so a run is reproducible whatever the number of DataLoader workers.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import multiprocessing
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from library.data import images as image_io
from library.data.buckets import BucketManager, prepare_bucket_range
from library.data.cache_files import load_cached_latents, load_cached_text, loss_mask_key
from library.data.captions import (
    cached_caption_text,
    caption_file_candidates,
    is_caption_dropped,
    process_caption,
    read_caption_file,
)
from library.data.records import DatasetConfig, ImageInfo, Size, SubsetConfig
from library.errors import AnimaError
from library.io.files import atomic_write

logger = logging.getLogger(__name__)

ANIMA_BUCKET_MULTIPLE = 16  # DiT patch size 2 x VAE stride 8
# Warn about images enlarged more than this per side to fill their bucket (under 1/4 of its area) ...
UPSCALE_WARN_FACTOR = 2.0
# ... or losing more than this fraction of the picture to the bucket crop.
CROP_WARN_FRACTION = 0.5
OTHER_CAPTION_EXTENSIONS = (".txt", ".caption", ".tags")


class BadImages:
    """Collects unusable images so they are reported together (or raised at once under --strict_images)."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.items: list[tuple[str, str]] = []

    def add(self, path: Path | str, reason: str) -> None:
        if self.strict:
            raise AnimaError(f"bad image {path}: {reason}; fix or remove it (or drop --strict_images to skip it)")
        self.items.append((str(path), reason))

    def report(self) -> None:
        if self.items:
            described = "; ".join(f"{p} ({r})" for p, r in self.items)
            logger.warning("skipped %d unusable image(s) (use --strict_images to stop instead): %s",
                           len(self.items), described)


# ---------------------------------------------------------------------------------------------------------------
# Collecting images and captions


def collect_subset_images(subset: SubsetConfig, subset_index: int, bad_images: BadImages, *,
                          write_cache_info: bool = True) -> list[ImageInfo]:
    """The images of one subset with their captions and sizes (empty, with a warning, if there are none).

    `write_cache_info=False` never writes metadata_cache.json (the --debug_dataset dry run).
    """
    if subset.kind == "finetuning":
        return _collect_finetuning(subset, subset_index, bad_images)
    return _collect_dreambooth(subset, subset_index, bad_images, write_cache_info)


def _collect_dreambooth(subset: SubsetConfig, subset_index: int, bad_images: BadImages,
                        write_cache_info: bool) -> list[ImageInfo]:
    image_dir = Path(subset.image_dir or "")
    if not image_dir.is_dir():
        raise AnimaError(f"{subset.where}: image_dir {image_dir} does not exist or is not a folder; fix the path")
    paths = image_io.list_images(image_dir)
    if not paths:
        logger.warning("%s: no images in %s; this subset is skipped", subset.where, image_dir)
        return []

    known_headers = _read_cache_info(image_dir) if subset.cache_info else {}
    infos: list[ImageInfo] = []
    missing_captions: list[str] = []
    for path in paths:
        header = known_headers.get(str(path))
        if header is None:
            try:
                header = image_io.read_image_header(path)
            except image_io.BadImageError as exc:
                bad_images.add(path, str(exc))
                continue
        caption = _read_caption(path, subset)
        if caption is None:
            missing_captions.append(path.name)
            caption = subset.class_tokens or ""
        infos.append(ImageInfo(key=str(path), path=path.resolve(), caption=caption, num_repeats=subset.num_repeats,
                               is_reg=subset.is_reg, subset_index=subset_index, image_size=header.size,
                               orientation=header.orientation))

    if missing_captions:
        _warn_missing_captions(subset, image_dir, missing_captions)
    if subset.cache_info and not known_headers and infos and write_cache_info:
        _write_cache_info(image_dir, infos)
    if subset.conditioning_data_dir:
        infos = _attach_conditioning_images(subset, infos, bad_images)
    _attach_face_boxes(subset, infos)
    return infos


def _attach_face_boxes(subset: SubsetConfig, infos: list[ImageInfo]) -> None:
    """Read `name_cx_cy_w_h` face boxes when the subset uses face_crop_aug_range; warn about names without one."""
    if subset.face_crop_aug_range is None:
        return
    without = []
    for info in infos:
        info.face = image_io.face_box_from_stem(info.path.stem)
        if info.face is None:
            without.append(info.path.name)
    if without:
        logger.warning("%s: %d image(s) have no face box in their name (name_cx_cy_w_h) and are cropped as if "
                       "face_crop_aug_range were off: %s", subset.where, len(without), listing(without, 5))


def _attach_conditioning_images(subset: SubsetConfig, infos: list[ImageInfo],
                                bad_images: BadImages) -> list[ImageInfo]:
    """Pair every image with the conditioning image of the same stem; AnimaError if one is missing."""
    image_dir = Path(subset.image_dir or "")
    conditioning_dir = Path(subset.conditioning_data_dir or "")
    if not conditioning_dir.is_dir():
        raise AnimaError(f"{subset.where}: conditioning_data_dir {conditioning_dir} does not exist or is not a "
                         "folder; fix the path")
    if conditioning_dir.resolve() == image_dir.resolve():
        raise AnimaError(f"{subset.where}: conditioning_data_dir is the same folder as image_dir ({image_dir}); put "
                         "the mask images in their own folder")
    by_stem: dict[str, Path] = {}
    for path in image_io.list_images(conditioning_dir):
        other = by_stem.setdefault(path.stem, path)
        if other != path:
            raise AnimaError(f"{subset.where}: {other} and {path} are both conditioning images for stem "
                             f"{path.stem!r}; keep one")
    missing = [info for info in infos if info.path.stem not in by_stem]
    if missing:
        first = missing[0].path
        more = f" (and {len(missing) - 1} more image(s))" if len(missing) > 1 else ""
        raise AnimaError(f"{subset.where}: no conditioning image for {first}: expected {conditioning_dir / first.stem}"
                         f".png (or another image extension){more}; add the mask image(s) or remove the image(s)")
    paired = []
    for info in infos:
        conditioning_path = by_stem[info.path.stem]
        try:
            size = image_io.check_image_file(conditioning_path)
        except image_io.BadImageError as exc:
            bad_images.add(conditioning_path, f"conditioning image of {info.path}: {exc}")
            continue
        if not image_io.same_aspect(size, info.image_size):
            raise AnimaError(f"{subset.where}: conditioning image {conditioning_path} is {size[0]}x{size[1]} but "
                             f"{info.path} is {info.image_size[0]}x{info.image_size[1]}; the mask must have the "
                             "image's aspect ratio (ideally its size)")
        info.conditioning_path = conditioning_path.resolve()
        paired.append(info)
    return paired


def _read_caption(image_path: Path, subset: SubsetConfig) -> str | None:
    for candidate in caption_file_candidates(image_path, subset.caption_extension):
        if candidate.is_file():
            return read_caption_file(candidate, subset.captions.enable_wildcard)
    return None


def _warn_missing_captions(subset: SubsetConfig, image_dir: Path, missing: list[str]) -> None:
    used = f"class_tokens {subset.class_tokens!r}" if subset.class_tokens else "an empty caption"
    logger.warning("%s: %d image(s) have no %s caption file, %s is used: %s",
                   subset.where, len(missing), subset.caption_extension, used, listing(missing, 5))
    others = [ext for ext in OTHER_CAPTION_EXTENSIONS if ext != subset.caption_extension
              and any(image_dir.glob(f"*{ext}"))]
    if others:
        logger.warning("%s: %s holds caption files ending in %s but caption_extension is %r; set "
                       "caption_extension = %r if those are the captions",
                       subset.where, image_dir, "/".join(others), subset.caption_extension, others[0])


def _read_cache_info(image_dir: Path) -> dict[str, image_io.ImageHeader]:
    """The headers kept in metadata_cache.json, or {} (folder rescanned) when the file lacks the EXIF orientation.

    `resolution` is the stored pixel size, as sd-scripts writes it, so either tool can read the other's file;
    `orientation` is this project's addition. A file without it (sd-scripts', or an older one) cannot say which
    images are turned, so it is not used and is rewritten after the scan.
    """
    path = image_dir / "metadata_cache.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not all("orientation" in value for value in data.values()):
            logger.info("%s has no EXIF orientations (written by another tool or version); the folder is "
                        "scanned again and the file rewritten", path)
            return {}
        return {key: image_io.ImageHeader((int(v["resolution"][0]), int(v["resolution"][1])), int(v["orientation"]))
                for key, v in data.items()}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise AnimaError(f"cannot read {path} ({exc}); delete it and it will be rebuilt") from exc


def _write_cache_info(image_dir: Path, infos: list[ImageInfo]) -> None:
    # Orienting the shown size again swaps it back to the stored size.
    data = {info.key: {"caption": info.caption,
                       "resolution": list(image_io.oriented_size(info.image_size, info.orientation)),
                       "orientation": info.orientation} for info in infos}
    text = json.dumps(data, ensure_ascii=False, indent=2)
    atomic_write(image_dir / "metadata_cache.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _load_metadata(subset: SubsetConfig) -> list[dict[str, Any]]:
    """Fine-tuning metadata as a list of {"key", "caption", "tags", "image_size"} records."""
    path = Path(subset.metadata_file or "")
    if not path.is_file():
        raise AnimaError(f"{subset.where}: metadata_file {path} not found; fix the path")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".jsonl":
            records = []
            for line in text.splitlines():
                if line.strip():
                    item = json.loads(line)
                    records.append({"key": item["image_path"], **item})
            return records
        data = json.loads(text) if text.strip() else {}
        if not isinstance(data, dict):
            raise ValueError("the top level must be an object {image_key: {caption, tags, image_size}}")
        return [{"key": key, **(value or {})} for key, value in data.items()]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise AnimaError(f"{subset.where}: cannot read metadata_file {path} ({exc}); fix the JSON") from exc


def _collect_finetuning(subset: SubsetConfig, subset_index: int, bad_images: BadImages) -> list[ImageInfo]:
    records = _load_metadata(subset)
    if not records:
        logger.warning("%s: metadata_file %s is empty; this subset is skipped", subset.where, subset.metadata_file)
        return []
    separator = subset.captions.caption_separator
    infos: list[ImageInfo] = []
    for record in records:
        key = str(record["key"])
        path = _resolve_metadata_image(key, subset)
        if path is None:
            bad_images.add(key, f"image listed in {subset.metadata_file} not found")
            continue
        try:
            size = image_io.check_image_file(path)
        except image_io.BadImageError as exc:
            bad_images.add(path, str(exc))
            continue
        caption, tags = record.get("caption"), record.get("tags")
        tags = tags if isinstance(tags, str) else None
        if tags and subset.captions.enable_wildcard:
            tags = tags.replace("\n", separator)  # one tag list, not wildcard lines of its own
        if caption is None or (isinstance(caption, str) and not caption.strip()):  # no leading separator
            caption = tags or ""
        elif tags:
            if subset.captions.enable_wildcard:
                caption = "\n".join(line + separator + tags for line in caption.split("\n") if line.strip())
            else:
                caption = caption + separator + tags
        infos.append(ImageInfo(key=key, path=path.resolve(), caption=caption, num_repeats=subset.num_repeats,
                               is_reg=False, subset_index=subset_index, image_size=size, tags=tags))
    _attach_face_boxes(subset, infos)
    return infos


def _resolve_metadata_image(key: str, subset: SubsetConfig) -> Path | None:
    base = Path(key)
    if not base.is_absolute():
        if not subset.image_dir:
            raise AnimaError(f"{subset.where}: metadata key {key!r} is a relative path; set image_dir in the subset")
        base = Path(subset.image_dir) / key
    candidates = [base] + [base.with_name(base.name + ext) for ext in image_io.IMAGE_EXTENSIONS]
    return next((c for c in candidates if c.is_file() and image_io.is_image_file(c)), None)


def split_train_validation(items: list[Any], split: float, rng: random.Random) -> tuple[list[Any], list[Any]]:
    """Shuffle with `rng`; training gets the first ceil(n * (1 - split)) items (as in sd-scripts), validation the
    rest (sd-scripts takes the last round(n * split), which can include an image that is also trained on)."""
    shuffled = list(items)
    rng.shuffle(shuffled)
    n_train = math.ceil(len(shuffled) * (1.0 - split))
    return shuffled[:n_train], shuffled[n_train:]


def balance_regularization(train: list[ImageInfo], reg: list[ImageInfo]) -> list[ImageInfo]:
    """Give regularization images as many samples (with repeats) as the training images, in subset order.

    Reg images past that count are dropped with a warning; if there are too few, repeats are added one image
    at a time. Returns the reg images that are used (with adjusted num_repeats).
    """
    n_train = sum(info.num_repeats for info in train)
    if not reg:
        return []
    used: list[ImageInfo] = []
    total = 0
    for info in reg:
        if total >= n_train:
            break
        used.append(info)
        total += info.num_repeats
    if len(used) < len(reg):
        logger.warning("%d regularization image(s) are not used: there are more reg samples than training "
                       "samples (%d)", len(reg) - len(used), n_train)
    index = 0
    while total < n_train and used:
        used[index % len(used)].num_repeats += 1
        total += 1
        index += 1
    return used


# ---------------------------------------------------------------------------------------------------------------
# One dataset: buckets and batches


class ImageDataset:
    """The images of one `[[datasets]]` entry, arranged in bucket batches."""

    def __init__(self, config: DatasetConfig, infos: list[ImageInfo], *, prior_loss_weight: float, seed: int,
                 is_validation: bool = False) -> None:
        self.config = config
        self.subsets = config.subsets
        self.infos = infos
        self.prior_loss_weight = prior_loss_weight
        self.seed = seed
        self.is_validation = is_validation
        self.has_loss_mask = any(s.alpha_mask or s.conditioning_data_dir for s in self.subsets)
        self.bucket_manager = self._make_bucket_manager()
        self.bucket_sizes: list[Size] = []
        self._bucket_members: list[list[int]] = []  # canonical order, each index repeated num_repeats times
        self._order: list[list[int]] = []
        self._slots: list[tuple[int, int]] = []  # (bucket index, batch index)
        self._shuffled_epoch: int | None = None
        self.mean_aspect_error = 0.0
        self.make_buckets()
        self._warn_about_poor_fits()

    @property
    def num_train_images(self) -> int:
        return sum(i.num_repeats for i in self.infos if not i.is_reg)

    @property
    def num_reg_images(self) -> int:
        """Regularisation samples per epoch (after their repeats were raised to balance the training images)."""
        return sum(i.num_repeats for i in self.infos if i.is_reg)

    @property
    def reg_images_with_repeats(self) -> int:
        """Regularisation images times their subset's num_repeats, before balancing (sd-scripts' num_reg_images,
        which the metadata records)."""
        return sum(self.subsets[i.subset_index].num_repeats for i in self.infos if i.is_reg)

    def _make_bucket_manager(self) -> BucketManager:
        config = self.config
        resolution = config.resolution
        assert resolution is not None
        if not config.enable_bucket:
            return BucketManager(resolution, None, fixed=True)
        if config.bucket_no_upscale:
            return BucketManager(resolution, config.bucket_reso_steps, no_upscale=True)
        lo, hi = prepare_bucket_range(resolution, config.min_bucket_reso, config.max_bucket_reso,
                                      config.bucket_reso_steps, config.where)
        return BucketManager(resolution, config.bucket_reso_steps, min_size=lo, max_size=hi)

    def make_buckets(self) -> None:
        """Assign every image to a bucket and cut each bucket into batch slots."""
        members: dict[Size, list[int]] = {}
        errors = []
        for index, info in enumerate(self.infos):
            info.bucket, info.resized, error = self.bucket_manager.select_bucket(*info.image_size)
            members.setdefault(info.bucket, []).extend([index] * info.num_repeats)
            errors.append(error)
        self.mean_aspect_error = float(np.mean(errors)) if errors else 0.0
        self.bucket_sizes = sorted(members)
        self._bucket_members = [members[size] for size in self.bucket_sizes]
        batch_size = self.config.batch_size
        self._slots = [(b, k) for b, keys in enumerate(self._bucket_members)
                       for k in range(math.ceil(len(keys) / batch_size))]
        self._shuffled_epoch = None
        self.shuffle(0)

    def _warn_about_poor_fits(self) -> None:
        """One warning per kind, listing the images: enlarged more than UPSCALE_WARN_FACTOR per side to fill their
        bucket (they cover under a quarter of it: blurry training pixels), or losing more than CROP_WARN_FRACTION
        of the picture to the bucket crop (an aspect ratio beyond the bucket range)."""
        enlarged, cropped = [], []
        for info in self.infos:
            assert info.bucket is not None and info.resized is not None
            (width, height), (resized_w, resized_h), (bucket_w, bucket_h) = info.image_size, info.resized, info.bucket
            scale = max(resized_w / width, resized_h / height)
            if scale > UPSCALE_WARN_FACTOR:
                enlarged.append(f"{info.path.name} ({width}x{height}, enlarged x{scale:.3g})")
            kept = (bucket_w * bucket_h) / (resized_w * resized_h)
            if kept < 1.0 - CROP_WARN_FRACTION:
                cropped.append(f"{info.path.name} ({width}x{height} in bucket {bucket_w}x{bucket_h}, "
                               f"{kept:.0%} kept)")
        where = self.config.where + (" (validation)" if self.is_validation else "")
        if enlarged:
            logger.warning("%s: %d image(s) are far below the bucket resolution and are enlarged more than %gx per "
                           "side, which trains on blurry pixels; use larger images or a lower resolution: %s",
                           where, len(enlarged), UPSCALE_WARN_FACTOR, listing(enlarged))
        if cropped:
            logger.warning("%s: %d image(s) have an aspect ratio beyond the bucket range and lose more than %d%% of "
                           "the picture to the crop; widen min_bucket_reso/max_bucket_reso or crop them yourself: %s",
                           where, len(cropped), round(CROP_WARN_FRACTION * 100), listing(cropped))

    def shuffle(self, epoch: int) -> None:
        """Shuffle slot order and bucket contents, seeded by seed + epoch (independent of earlier epochs)."""
        rng = random.Random(self.seed + epoch)
        self._slots.sort()
        rng.shuffle(self._slots)
        self._order = [list(keys) for keys in self._bucket_members]
        for keys in self._order:
            rng.shuffle(keys)
        self._shuffled_epoch = epoch

    def __len__(self) -> int:
        return len(self._slots)

    def batch_infos(self, slot: int, epoch: int) -> list[ImageInfo]:
        if self._shuffled_epoch != epoch:
            self.shuffle(epoch)
        bucket, batch = self._slots[slot]
        size = self.config.batch_size
        return [self.infos[i] for i in self._order[bucket][batch * size: (batch + 1) * size]]

    def bucket_info(self) -> dict[str, Any]:
        counts = [len(keys) for keys in self._bucket_members]
        return {
            "buckets": {i: {"resolution": list(size), "count": counts[i]} for i, size in enumerate(self.bucket_sizes)},
            "mean_img_ar_error": self.mean_aspect_error,
        }

    def drop_images(self, paths: set[str]) -> None:
        """Remove images (e.g. found undecodable while caching) and rebuild the buckets."""
        self.infos = [info for info in self.infos if str(info.path) not in paths]
        self.make_buckets()

    # -- building one batch ------------------------------------------------------------------------------------

    def get_batch(self, slot: int, *, epoch: int, step: int, max_train_steps: int, dataset_index: int,
                  empty_text: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        infos = self.batch_infos(slot, epoch)
        rng = random.Random(f"{self.seed}:{epoch}:{dataset_index}:{slot}")
        images, latents, masks, captions, texts, weights = [], [], [], [], [], []
        for info in infos:
            subset = self.subsets[info.subset_index]
            flip = subset.flip_aug and rng.random() < 0.5
            if info.latents is not None or info.latents_npz is not None:
                latent, mask = load_cached_latents(info, flip, loss_mask_key(subset, info))
                latents.append(latent)
            else:
                image, mask = self._load_pixels(info, subset, flip, rng)
                images.append(image)
            masks.append(mask)

            if info.text is not None or info.text_npz is not None:
                dropped = is_caption_dropped(subset.captions, rng, epoch)
                if dropped:
                    assert empty_text is not None, "text cache without the empty-caption encoding"
                    texts.append(empty_text)
                    captions.append("")
                else:
                    texts.append(load_cached_text(info))
                    captions.append(cached_caption_text(info.caption, subset.captions))
            else:
                captions.append(process_caption(info.caption, subset.captions, rng, epoch=epoch, step=step,
                                                max_train_steps=max_train_steps))
            weights.append(self.prior_loss_weight if info.is_reg else 1.0)

        loss_masks = None
        if self.has_loss_mask:  # [B, 1, H, W]; samples without a mask weigh every pixel fully
            loss_masks = torch.stack([m if m is not None else _ones_like_bucket(info) for m, info
                                      in zip(masks, infos)]).unsqueeze(1)
        return {
            "latents": torch.stack(latents).float() if latents else None,
            "images": torch.stack(images) if images else None,
            "captions": captions,
            "text": {k: torch.stack([t[k] for t in texts]) for k in texts[0]} if texts else None,
            "loss_weights": torch.tensor(weights, dtype=torch.float32),
            "loss_masks": loss_masks,
            "image_keys": [info.key for info in infos],
            "network_multipliers": torch.full((len(infos),), float(self.config.network_multiplier)),
        }

    def _load_pixels(self, info: ImageInfo, subset: SubsetConfig, flip: bool,
                     rng: random.Random) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image [3, H, W] in [-1, 1] and loss mask [H, W] (None unless the subset has alpha or conditioning)."""
        interpolation = subset.resize_interpolation or self.config.resize_interpolation
        plan = self.crop_plan(info, subset, rng)
        try:
            rgb, mask = image_io.load_image_and_mask(info.path, plan, interpolation, alpha_mask=subset.alpha_mask,
                                                     conditioning_path=info.conditioning_path)
        except image_io.BadImageError as exc:
            raise AnimaError(f"cannot load image {info.path}: {exc}; fix or remove the file") from exc
        if subset.color_aug:
            rgb = image_io.apply_color_aug(rgb, rng)
        if flip:
            rgb = rgb[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        mask_tensor = torch.from_numpy(np.ascontiguousarray(mask)) if mask is not None else None
        return image_io.to_tensor(rgb), mask_tensor

    def crop_plan(self, info: ImageInfo, subset: SubsetConfig, rng: random.Random) -> image_io.CropPlan:
        """Face-centred crop (face box in the name, face_crop_aug_range, no bucketing), else bucket cover + crop.

        Without bucketing, `random_crop` on an image that covers the resolution cuts a random window of the unscaled
        image, as sd-scripts does (a patch at the image's own scale); smaller images are scaled to cover first."""
        assert info.bucket is not None and info.resized is not None
        if info.face is not None and subset.face_crop_aug_range is not None and not self.config.enable_bucket:
            return image_io.plan_face_crop(info.image_size, info.bucket, info.face, subset.face_crop_aug_range,
                                           subset.random_crop, rng)
        if (subset.random_crop and not self.config.enable_bucket
                and info.image_size[0] >= info.bucket[0] and info.image_size[1] >= info.bucket[1]):
            return image_io.plan_bucket_crop(info.image_size, info.bucket, rng, height_first=True)
        return image_io.plan_bucket_crop(info.resized, info.bucket, rng if subset.random_crop else None)


def listing(items: list[str], shown: int = 10) -> str:
    """The first `shown` items for a log line, then how many more: ``"a, b and 3 more"``."""
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _ones_like_bucket(info: ImageInfo) -> torch.Tensor:
    assert info.bucket is not None
    return torch.ones(info.bucket[1], info.bucket[0], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# The group of datasets handed to the DataLoader


class DatasetGroup(Dataset):
    """All datasets of a run; item i is one whole batch dict (see the project docs for its keys)."""

    def __init__(self, datasets: list[ImageDataset], *, seed: int, from_config: bool,
                 is_validation: bool = False, strict_images: bool = False) -> None:
        self.datasets = datasets
        self.strict_images = strict_images
        self.seed = seed
        self.from_config = from_config
        self.is_validation = is_validation
        # Shared with DataLoader workers (inherited at worker start) so epoch/step changes reach them.
        self._epoch = multiprocessing.RawValue("i", 0)
        self._step = multiprocessing.RawValue("q", 0)
        self._max_train_steps = multiprocessing.RawValue("q", 0)
        self.empty_text: dict[str, torch.Tensor] | None = None
        self._update_offsets()

    def _update_offsets(self) -> None:
        self._offsets = []
        total = 0
        for dataset in self.datasets:
            self._offsets.append(total)
            total += len(dataset)
        self._length = total

    # -- the trainer-facing interface ---------------------------------------------------------------------------

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def set_current_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    def set_current_step(self, step: int) -> None:
        self._step.value = int(step)

    def set_max_train_steps(self, n: int) -> None:
        self._max_train_steps.value = int(n)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0 or index >= self._length:
            raise IndexError(index)
        dataset_index = bisect.bisect_right(self._offsets, index) - 1  # the last dataset starting at or before
        dataset = self.datasets[dataset_index]
        return dataset.get_batch(index - self._offsets[dataset_index], epoch=self._epoch.value,
                                 step=self._step.value, max_train_steps=self._max_train_steps.value,
                                 dataset_index=dataset_index, empty_text=self.empty_text)

    def image_infos(self) -> list[tuple[ImageDataset, ImageInfo]]:
        return [(dataset, info) for dataset in self.datasets for info in dataset.infos]

    def check_caching_options(self, cache_latents: bool, cache_text: bool) -> None:
        """Raise AnimaError naming the subset and option when an option cannot work with caching."""
        for dataset in self.datasets:
            for subset in dataset.subsets:
                if cache_latents:
                    face_crop = subset.face_crop_aug_range is not None and not dataset.config.enable_bucket
                    for name, active in (("color_aug", subset.color_aug), ("random_crop", subset.random_crop),
                                         ("face_crop_aug_range", face_crop)):
                        if active:
                            raise AnimaError(f"{subset.where}: {name} changes the pixels every step, so it cannot "
                                             f"be used with --cache_latents; turn off {name} or latent caching")
                if cache_text:
                    options = subset.captions
                    reasons = {"shuffle_caption": options.shuffle_caption,
                               "token_warmup_step": options.token_warmup_step > 0,
                               "caption_tag_dropout_rate": options.caption_tag_dropout_rate > 0,
                               "enable_wildcard": options.enable_wildcard}
                    for name, active in reasons.items():
                        if active:
                            raise AnimaError(f"{subset.where}: {name} changes the caption every step, so it cannot "
                                             f"be used with --cache_text_encoder_outputs; turn off {name} or "
                                             "text-encoder output caching")

    def drop_bad_images(self, bad: list[tuple[str, str]]) -> None:
        """Drop images found undecodable while caching (or stop under --strict_images)."""
        if not bad:
            return
        strict = self.strict_images
        described = "; ".join(f"{p} ({r})" for p, r in bad)
        if strict:
            raise AnimaError(f"unusable image(s) found while caching: {described}; fix or remove them")
        logger.warning("skipped %d image(s) that could not be decoded while caching: %s", len(bad), described)
        paths = {p for p, _ in bad}
        for dataset in self.datasets:
            dataset.drop_images(paths)
        self._update_offsets()


def _first_item(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


def make_dataloader(group: DatasetGroup, *, num_workers: int, persistent_workers: bool, seed: int) -> DataLoader:
    """A DataLoader over whole-batch items, shuffled by a generator seeded with `seed`; `num_workers` is capped
    at the CPU count, as sd-scripts caps it (the batches do not depend on the number of workers).

    With CUDA the batches come in page-locked (pinned) memory, so the trainer's `non_blocking` copies to the GPU
    run asynchronously instead of stalling the host; without CUDA pinning would only cost memory."""
    workers = max(0, min(num_workers, os.cpu_count() or 1))
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(group, batch_size=1, shuffle=True, collate_fn=_first_item, num_workers=workers,
                      persistent_workers=persistent_workers and workers > 0, generator=generator,
                      pin_memory=torch.cuda.is_available())
