"""Latent cache: encode every image once with the VAE, in memory or in `*_anima.npz` files beside the images.

Disk format (readable by sd-scripts, and sd-scripts caches are found here):
  file  `<image path without extension>_<W:04d>x<H:04d>_anima.npz`, W x H = the original image size (as shown,
        after the EXIF orientation);
  keys  suffixed `_<h>x<w>` with the latent size (bucket / 8), so one file holds several resolutions:
        `latents_*` float32 [16, h, w], `original_size_*` [W, H], `crop_ltrb_*` [l, t, r, b],
        `latents_flipped_*` (flip_aug), `alpha_mask_*` float32 [H, W] (alpha_mask),
        `conditioning_mask_*` float32 [H, W] (conditioning_data_dir subsets, `--masked_loss`; this project only),
        and `provenance_*`: a JSON string of what produced the entry (this project only).

Provenance = image fingerprint (size, mtime, SHA-256), bucket, resize size, crop, interpolation, the decode and
resize pipeline version (`images.PIXEL_PIPELINE`), flip, alpha, the
conditioning image's fingerprint (masked-loss subsets), the VAE identity and a CRC-32 of the latents (sd-scripts
rewrites an entry's arrays but keeps this record). An entry whose provenance differs from the current settings
is re-encoded with a log line.
An entry without provenance (written by sd-scripts or another tool) cannot be verified, so it is re-encoded
too; `--skip_cache_check` reuses any entry whose keys are present without looking inside.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import zlib
from collections import Counter
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from library.data import images as image_io
from library.data.cache_files import (
    CACHE_FORMAT,
    check_cache_name_collisions,
    check_rewritable,
    key_suffix,
    latent_problem,
    latents_npz_path,
    loss_mask_key,
    mask_problem,
    remove_cache_leftovers,
)
from library.data.datasets import DatasetGroup, ImageDataset, listing
from library.data.records import ImageInfo, Size
from library.errors import AnimaError
from library.io.files import file_sha256
from library.io.npz import NPZ_READ_ERRORS, merge_into_npz

logger = logging.getLogger(__name__)



def image_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    fingerprint: dict[str, Any] = dict(image_io.file_fingerprint(path))
    fingerprint["sha256"] = file_sha256(path)
    return fingerprint


def image_unchanged(stored: dict[str, Any], path: str | os.PathLike) -> bool:
    """Same size and mtime, or (after a touch or copy) the same bytes."""
    current = image_io.file_fingerprint(path)
    if current["size"] != stored.get("size"):
        return False
    if current["mtime_ns"] == stored.get("mtime_ns"):
        return True
    return file_sha256(path) == stored.get("sha256")


def _expected_provenance(dataset: ImageDataset, info: ImageInfo, vae_identity: str, flip: bool) -> dict[str, Any]:
    """The recorded settings of a disk entry; `flip`: whether it holds mirrored latents (see _plan_disk_entries)."""
    subset = dataset.subsets[info.subset_index]
    assert info.bucket is not None and info.resized is not None
    return {
        "format": CACHE_FORMAT,
        "vae": vae_identity,
        "bucket": list(info.bucket),
        "resized": list(info.resized),
        "crop": "center",
        "interpolation": subset.resize_interpolation or dataset.config.resize_interpolation or "default",
        "pixels": image_io.PIXEL_PIPELINE,  # how images are decoded and resized
        "flip": flip,
        "alpha": subset.alpha_mask,
        # Only present for masked-loss subsets, so older entries without the key stay valid.
        **({"conditioning": True} if info.conditioning_path is not None else {}),
    }


def _changed_setting(stored: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """Which recorded setting differs from the current one, or None."""
    for field in ("format", "vae", "bucket", "resized", "crop", "interpolation", "pixels", "alpha"):
        if stored.get(field) != expected[field]:
            return f"{field} changed"
    if stored.get("conditioning", False) != expected.get("conditioning", False):
        return "conditioning changed"
    if expected["flip"] and not stored.get("flip"):
        return "flip changed"
    return None


def _stale_reason(dataset: ImageDataset, info: ImageInfo, path: str, vae_identity: str, flip: bool,
                  skip_check: bool) -> str | None:
    """None if the disk entry can be used, else why it must be re-encoded."""
    if not os.path.exists(path):
        return "missing"
    subset = dataset.subsets[info.subset_index]
    assert info.bucket is not None
    suffix = key_suffix(info.bucket)
    mask_key = loss_mask_key(subset, info)
    needed = ["latents" + suffix] + (["latents_flipped" + suffix] if flip else []) \
        + ([mask_key + suffix] if mask_key else [])
    try:
        with np.load(path, allow_pickle=False) as data:
            names = set(data.files)
            if any(n not in names for n in needed):
                return "lacks this resolution/flip/alpha entry"
            if skip_check:
                return None
            if "provenance" + suffix not in names:
                return "no provenance recorded (written by another tool)"
            stored = json.loads(str(data["provenance" + suffix]))
            expected = _expected_provenance(dataset, info, vae_identity, flip)
            changed = _changed_setting(stored, expected)
            if changed is not None:
                return changed
            # Read the arrays themselves: a damaged member of an intact zip only shows when it is read.
            for name in needed:
                array = data[name]
                problem = (mask_problem(array, info.bucket) if mask_key and name == mask_key + suffix
                           else latent_problem(array, info.bucket))
                if problem is not None:
                    return problem
                # sd-scripts rewrites an entry's arrays in place and keeps the other keys, this record included.
                recorded = stored.get("latents_crc32")  # absent in entries written before it was recorded
                if name == "latents" + suffix and recorded is not None and recorded != _latents_crc32(array):
                    return "latents rewritten by another tool"
    except NPZ_READ_ERRORS as exc:
        return f"unreadable ({type(exc).__name__})"
    if not image_unchanged(stored.get("image", {}), info.path):
        return "image changed"
    if info.conditioning_path is not None and not image_unchanged(stored.get("conditioning_image", {}),
                                                                  info.conditioning_path):
        return "conditioning image changed"
    return None


def cache_group_latents(group: DatasetGroup, vae: Any, vae_identity: str, *, batch_size: int, to_disk: bool,
                        skip_check: bool, is_main_process: bool = True) -> list[tuple[str, str]]:
    """Fill the latent cache of every image. Images that cannot be decoded are dropped from the group (see
    DatasetGroup.drop_bad_images) and returned as (path, reason)."""
    entries = sorted(group.image_infos(), key=lambda e: (e[1].bucket[0] * e[1].bucket[1], e[1].bucket))
    if to_disk:
        check_cache_name_collisions([info for _, info in entries], lambda i: latents_npz_path(i.path, i.image_size))
        if is_main_process:
            remove_cache_leftovers([info for _, info in entries])

    disk_flip = _plan_disk_entries(entries, vae_identity) if to_disk else {}
    todo: list[_Todo] = []
    owners: dict[tuple[str, str], ImageInfo] = {}  # disk entry -> the sample that encodes it in this run
    followers: list[tuple[ImageInfo, ImageInfo]] = []  # (sample, owner): samples sharing an entry being encoded
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    rewrites: list[tuple[str, str]] = []
    for dataset, info in entries:
        if info.latents is not None:
            continue
        flip = disk_flip.get(id(info))
        if flip is not None:
            path = latents_npz_path(info.path, info.image_size)
            reason = _stale_reason(dataset, info, path, vae_identity, flip, skip_check)
            if reason is None:
                info.latents_npz = path
                continue
            owner = owners.setdefault((path, key_suffix(info.bucket)), info)
            if owner is not info:
                followers.append((info, owner))
                continue
            rewrites.append((path, reason))
            if reason != "missing":
                reasons[reason] += 1
                examples.setdefault(reason, path)
        todo.append(_Todo(dataset, info, dataset.subsets[info.subset_index].flip_aug if flip is None else flip,
                          flip is not None))
    for reason, count in reasons.items():
        logger.info("re-encoding %d latent cache(s): %s (e.g. %s)", count, reason, examples[reason])
    logger.info("latent cache: %d image(s), %d reused from disk, %d to encode", len(entries),
                len(entries) - len(todo) - len(followers), len(todo))
    if is_main_process:
        check_rewritable(rewrites, "latent", skip_check)

    bad: list[tuple[str, str]] = []
    with tqdm(total=len(todo), desc="caching latents", unit="img", disable=not todo) as progress:
        for batch in _vae_batches(todo, batch_size):
            loaded = _load_batch([(item.dataset, item.info) for item in batch])
            good = []
            for item, result in zip(batch, loaded):
                if isinstance(result, str):
                    bad.append((str(item.info.path), result))
                else:
                    good.append((item.dataset, item.info, result))
            if good:
                _encode_and_store(good, vae, vae_identity, flip=batch[0].flip, write=batch[0].disk and is_main_process)
            progress.update(len(batch))
    for info, owner in followers:
        info.latents_npz = owner.latents_npz
        info.latents, info.latents_flipped, info.cached_loss_mask = (owner.latents, owner.latents_flipped,
                                                                      owner.cached_loss_mask)
    group.drop_bad_images(bad)
    return bad


class _Todo(NamedTuple):
    """An image to encode: whether to encode its mirror too, and whether its entry lives on disk."""
    dataset: ImageDataset
    info: ImageInfo
    flip: bool
    disk: bool


def _pixel_settings(dataset: ImageDataset, info: ImageInfo, vae_identity: str) -> dict[str, Any]:
    """What decides a disk entry's arrays apart from the mirrored latents (resize, alpha, mask image)."""
    settings = _expected_provenance(dataset, info, vae_identity, flip=False)
    settings["conditioning_path"] = None if info.conditioning_path is None else str(info.conditioning_path)
    return settings


def _plan_disk_entries(entries: list[tuple[ImageDataset, ImageInfo]], vae_identity: str) -> dict[int, bool]:
    """Which samples use a disk entry (by id of their ImageInfo) and whether that entry holds mirrored latents.

    An image in several subsets or datasets with the same bucket has one entry (file and key suffix) for all of
    them. Samples that agree on the pixel settings share it, with mirrored latents when any of them flips. A sample
    whose settings differ from the entry's first sample (another resize_interpolation, alpha_mask or mask image)
    would get latents that are not its own, so it is cached in memory instead (listed in one warning)."""
    first: dict[tuple[str, str], dict[str, Any]] = {}
    flip: dict[tuple[str, str], bool] = {}
    shared: dict[int, tuple[str, str]] = {}
    in_memory: list[str] = []
    for dataset, info in entries:
        assert info.bucket is not None
        key = (latents_npz_path(info.path, info.image_size), key_suffix(info.bucket))
        settings = _pixel_settings(dataset, info, vae_identity)
        if first.setdefault(key, settings) != settings:
            in_memory.append(f"{info.path} ({_first_difference(first[key], settings)})")
            continue
        flip[key] = flip.get(key, False) or dataset.subsets[info.subset_index].flip_aug
        shared[id(info)] = key
    if in_memory:
        logger.warning("%d image(s) appear in several subsets with different pixel settings at the same bucket; "
                       "their latent cache file holds one version, so these are cached in memory: %s",
                       len(in_memory), listing(in_memory, 5))
    return {ident: flip[key] for ident, key in shared.items()}


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    name = next(k for k in a if a[k] != b.get(k))
    names = {"interpolation": "resize_interpolation", "alpha": "alpha_mask", "conditioning_path": "mask image"}
    return f"{names.get(name, name)} {a[name]} vs {b[name]}"


def _vae_batches(todo: list[_Todo], batch_size: int):
    """Consecutive runs of images with the same bucket, flip, mask and disk/memory, at most batch_size long."""
    batch: list[_Todo] = []
    condition = None
    for item in todo:
        this = (item.info.bucket, item.flip, loss_mask_key(item.dataset.subsets[item.info.subset_index], item.info),
                item.disk)
        if batch and (this != condition or len(batch) >= max(1, batch_size)):
            yield batch
            batch = []
        condition = this
        batch.append(item)
    if batch:
        yield batch


def _load_one(dataset: ImageDataset, info: ImageInfo) -> tuple[np.ndarray, np.ndarray | None] | str:
    """(rgb, loss mask or None) cropped exactly like the live loader without random crop, or why it failed."""
    subset = dataset.subsets[info.subset_index]
    interpolation = subset.resize_interpolation or dataset.config.resize_interpolation
    plan = image_io.plan_bucket_crop(info.resized, info.bucket, None)
    try:
        return image_io.load_image_and_mask(info.path, plan, interpolation, alpha_mask=subset.alpha_mask,
                                            conditioning_path=info.conditioning_path)
    except image_io.BadImageError as exc:
        return str(exc)


def _load_batch(batch: list[tuple[ImageDataset, ImageInfo]]) -> list[Any]:
    workers = max(1, min(len(batch), os.cpu_count() or 1))
    if workers == 1:
        return [_load_one(d, i) for d, i in batch]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda e: _load_one(*e), batch))


@torch.no_grad()
def _encode(vae: Any, rgb_list: list[np.ndarray]) -> torch.Tensor:
    pixels = torch.stack([image_io.to_tensor(rgb) for rgb in rgb_list]).to(vae.device, vae.dtype)
    latents = vae.encode_pixels_to_latents(pixels)  # [B, 16, H/8, W/8]
    if latents.dim() == 5:  # [B, 16, 1, h, w] from video-style VAEs
        latents = latents.squeeze(2)
    latents = latents.float().cpu()
    if not torch.isfinite(latents).all():
        raise AnimaError("the VAE produced NaN/inf latents while caching; use --no_half_vae or a float32 VAE")
    return latents


def _encode_and_store(good: list[tuple[ImageDataset, ImageInfo, tuple[np.ndarray, np.ndarray | None]]], vae: Any,
                      vae_identity: str, *, flip: bool, write: bool) -> None:
    """Encode (and mirror when `flip`); write the disk entries when `write`, else keep the latents in memory."""
    rgbs = [result[0] for _, _, result in good]
    latents = _encode(vae, rgbs)
    flipped = _encode(vae, [np.ascontiguousarray(rgb[:, ::-1]) for rgb in rgbs]) if flip else None
    for k, (dataset, info, (_, mask_array)) in enumerate(good):
        mask = torch.from_numpy(np.ascontiguousarray(mask_array)) if mask_array is not None else None
        mask_key = loss_mask_key(dataset.subsets[info.subset_index], info)
        if write:
            path = latents_npz_path(info.path, info.image_size)
            suffix = key_suffix(info.bucket)
            provenance = _expected_provenance(dataset, info, vae_identity, flip)
            provenance["image"] = image_fingerprint(info.path)
            provenance["latents_crc32"] = _latents_crc32(latents[k].numpy())
            if info.conditioning_path is not None:
                provenance["conditioning_image"] = image_fingerprint(info.conditioning_path)
            arrays = {
                "latents" + suffix: latents[k].numpy(),
                "original_size" + suffix: np.array(info.image_size, dtype=np.int64),
                "crop_ltrb" + suffix: np.array(_letterbox_ltrb(info.bucket, info.image_size), dtype=np.float64),
                "provenance" + suffix: np.array(json.dumps(provenance, sort_keys=True)),
            }
            if flipped is not None:
                arrays["latents_flipped" + suffix] = flipped[k].numpy()
            if mask is not None and mask_key is not None:
                arrays[mask_key + suffix] = mask.numpy()
            merge_into_npz(path, arrays)
            info.latents_npz = path
        else:
            info.latents = latents[k].clone()
            info.latents_flipped = flipped[k].clone() if flipped is not None else None
            info.cached_loss_mask = mask


def _latents_crc32(latent: np.ndarray) -> int:
    """A checksum of the stored latent values (float32 bytes), recorded so that a rewrite by another tool shows."""
    return zlib.crc32(np.ascontiguousarray(latent, dtype=np.float32).tobytes())


def _letterbox_ltrb(bucket: Size, image_size: Size) -> tuple[float, float, float, float]:
    """Where the whole image would sit if fitted inside the bucket (an SDXL leftover kept for the file format), with
    sd-scripts' numbers: the side that fits equals the bucket's, and left/top are the free space halved and rounded
    down (so a file read by sd-scripts holds the values it writes itself)."""
    bucket_w, bucket_h = bucket
    image_aspect = image_size[0] / image_size[1]
    if bucket_w / bucket_h > image_aspect:  # the bucket is wider: the heights match
        width, height = bucket_h * image_aspect, float(bucket_h)
    else:
        width, height = float(bucket_w), bucket_w / image_aspect
    left, top = (bucket_w - width) // 2, (bucket_h - height) // 2
    return left, top, left + width, top + height


