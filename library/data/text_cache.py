"""Text-encoder output cache: encode every caption once, in memory or in `*_anima_te.npz` files beside the images.

Disk format (sd-scripts compatible names and keys, plus `provenance`):
  file `<image path without extension>_anima_te.npz`
  `prompt_embeds` float32 [Lq, D], `attn_mask` int64 [Lq], `t5_input_ids` int32 [Lt], `t5_attn_mask` int32 [Lt],
  `caption_dropout_rate` float32 scalar (written for sd-scripts; this project reads the rate from the current
  config instead), `provenance` JSON: the text encoding identity (model, tokenizers, max lengths) and the exact
  caption text that was encoded.

An entry is re-encoded (with a log line) when the caption text or the text encoding identity changed, or when it
has no provenance (sd-scripts caches: their caption cannot be verified); `--skip_cache_check` reuses any file whose
keys are present. Caption dropout is applied at train time by swapping in the cached encoding of "".
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from library.data.cache_files import (
    CACHE_FORMAT,
    DISK_KEYS,
    LOADED_DTYPES,
    check_cache_name_collisions,
    check_rewritable,
    remove_cache_leftovers,
    text_npz_path,
    text_problem,
)
from library.data.captions import cached_caption_text, can_drop_caption
from library.data.datasets import DatasetGroup, listing
from library.data.records import ImageInfo
from library.errors import AnimaError
from library.io.npz import NPZ_READ_ERRORS, merge_into_npz
from library.models.precision import FLOAT16_OVERFLOW_ADVICE

logger = logging.getLogger(__name__)


def _stale_reason(path: str, caption: str, identity: str, skip_check: bool) -> str | None:
    if not os.path.exists(path):
        return "missing"
    needed = [disk for disk, _ in DISK_KEYS.values()]
    try:
        with np.load(path, allow_pickle=False) as data:
            if any(n not in data.files for n in needed):
                return "lacks some outputs"
            if skip_check:
                return None
            if "provenance" not in data.files:
                return "no provenance recorded (written by another tool)"
            stored = json.loads(str(data["provenance"]))
            if stored.get("format") != CACHE_FORMAT:
                return "format changed"
            if stored.get("text_encoding") != identity:
                return "text encoder, tokenizer or max length changed"
            if stored.get("caption") != caption:
                return "caption changed"
            # Read the arrays themselves: a damaged member of an intact zip only shows when it is read.
            return text_problem({n: np.asarray(data[n]) for n in needed})
    except NPZ_READ_ERRORS as exc:
        return f"unreadable ({type(exc).__name__})"


def _split_batch(outputs: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    missing = [k for k in DISK_KEYS if k not in outputs]
    if missing:
        raise AnimaError(f"text encoding returned no {', '.join(missing)}; it must return {', '.join(DISK_KEYS)}")
    cpu = {k: outputs[k].detach().cpu().to(LOADED_DTYPES[k]) for k in DISK_KEYS}
    return [{k: v[i].clone() for k, v in cpu.items()} for i in range(count)]


def _non_finite_message(info: ImageInfo, caption: str, dtype: torch.dtype | None) -> str:
    shown = caption if len(caption) <= 60 else caption[:57] + "..."
    advice = FLOAT16_OVERFLOW_ADVICE if dtype == torch.float16 else "check the --qwen3 file (it may be damaged)"
    return (f"the text encoder produced NaN/inf outputs for the caption of {info.path} ({shown!r}) while caching "
            f"text-encoder outputs, in {str(dtype).replace('torch.', '') if dtype else 'its dtype'}; {advice}")


def cache_group_text(group: DatasetGroup, text_encoding: Any, *, batch_size: int, to_disk: bool, skip_check: bool,
                     is_main_process: bool = True) -> None:
    """Encode every image's caption (and "" once, when a subset drops captions) with `text_encoding`."""
    identity = str(text_encoding.identity)
    entries = group.image_infos()
    if to_disk:
        check_cache_name_collisions([info for _, info in entries], lambda i: text_npz_path(i.path))
        if is_main_process:
            remove_cache_leftovers([info for _, info in entries])
    # "" costs one more full text-encoder pass (seconds for Qwen3 on a CPU): encoded only when it can be used.
    if any(can_drop_caption(subset.captions) for dataset in group.datasets for subset in dataset.subsets):
        with torch.no_grad():
            group.empty_text = _split_batch(text_encoding.encode([""]), 1)[0]

    todo: list[tuple[ImageInfo, str, float, bool]] = []  # (sample, caption, dropout rate, written to disk)
    # One file per image: the first sample of an image decides its caption; later samples of that image with
    # the same caption share the file, those with another one (other prefix, suffix, ...) are cached in memory.
    file_caption: dict[str, str] = {}
    owners: dict[str, ImageInfo] = {}  # file -> the sample that encodes it in this run
    followers: list[tuple[ImageInfo, ImageInfo]] = []
    in_memory: list[str] = []
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    rewrites: list[tuple[str, str]] = []
    for dataset, info in entries:
        subset = dataset.subsets[info.subset_index]
        caption = cached_caption_text(info.caption, subset.captions)
        if info.text is not None:
            continue
        disk = to_disk
        if disk:
            path = text_npz_path(info.path)
            if file_caption.setdefault(path, caption) != caption:
                in_memory.append(str(info.path))
                disk = False
        if disk:
            reason = _stale_reason(path, caption, identity, skip_check)
            if reason is None:
                info.text_npz = path
                continue
            owner = owners.setdefault(path, info)
            if owner is not info:
                followers.append((info, owner))
                continue
            rewrites.append((path, reason))
            if reason != "missing":
                reasons[reason] += 1
                examples.setdefault(reason, path)
        todo.append((info, caption, subset.captions.caption_dropout_rate, disk))
    if in_memory:
        logger.warning("%d image(s) appear in several subsets with different cached captions; their text cache "
                       "file holds one caption, so these are cached in memory: %s", len(in_memory),
                       listing(in_memory, 5))
    for reason, count in reasons.items():
        logger.info("re-encoding %d text cache(s): %s (e.g. %s)", count, reason, examples[reason])
    logger.info("text-encoder cache: %d caption(s), %d reused from disk, %d to encode", len(entries),
                len(entries) - len(todo) - len(followers), len(todo))
    if is_main_process:
        check_rewritable(rewrites, "text-encoder", skip_check)

    step = max(1, batch_size)
    with tqdm(total=len(todo), desc="caching text-encoder outputs", unit="caption", disable=not todo) as progress:
        for start in range(0, len(todo), step):
            batch = todo[start: start + step]
            with torch.no_grad():
                outputs = _split_batch(text_encoding.encode([caption for _, caption, _, _ in batch]), len(batch))
            for (info, caption, _, _), output in zip(batch, outputs):
                if not torch.isfinite(output["qwen3_embeds"]).all():
                    raise AnimaError(_non_finite_message(info, caption, getattr(text_encoding, "dtype", None)))
            for (info, caption, rate, disk), output in zip(batch, outputs):
                if disk and is_main_process:
                    path = text_npz_path(info.path)
                    arrays = {disk: output[key].numpy().astype(dtype) for key, (disk, dtype) in DISK_KEYS.items()}
                    arrays["caption_dropout_rate"] = np.array(rate, dtype=np.float32)
                    provenance = {"format": CACHE_FORMAT, "text_encoding": identity, "caption": caption}
                    arrays["provenance"] = np.array(json.dumps(provenance, ensure_ascii=False, sort_keys=True))
                    merge_into_npz(path, arrays)
                    info.text_npz = path
                else:
                    info.text = output
            progress.update(len(batch))
    for info, owner in followers:
        info.text_npz, info.text = owner.text_npz, owner.text


