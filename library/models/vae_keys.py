"""Key names of the Qwen-Image VAE: the one mapping between the two layouts found in the wild.

* **diffusers** names (``AutoencoderKLQwenImage``, ``Qwen/Qwen-Image`` repo): what ``QwenImageVAE`` uses.
* **original** names (Wan 2.1 ``.pth``, ComfyUI ``qwen_image_vae.safetensors``): a flat numbered layout.

Only module prefixes differ; leaf names (``weight``, ``bias``, ``gamma``) never change. Fixed renames live
in the two tables below; the decoder's flat ``upsamples.{j}`` list is regrouped into
``up_blocks.{b}.{resnets.{s} | upsamplers.0}`` from the keys themselves (an entry holding
``resample.1.*`` closes a stage), so no config is needed in either direction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

# Values are carried through unchanged: tensors, or anything else keyed by name (e.g. file keys).
V = TypeVar("V")

# Module prefixes outside the numbered stage lists: (original, diffusers).
_FIXED_PREFIXES: tuple[tuple[str, str], ...] = (
    ("conv1", "quant_conv"),
    ("conv2", "post_quant_conv"),
    ("encoder.conv1", "encoder.conv_in"),
    ("decoder.conv1", "decoder.conv_in"),
    ("encoder.head.0", "encoder.norm_out"),
    ("encoder.head.2", "encoder.conv_out"),
    ("decoder.head.0", "decoder.norm_out"),
    ("decoder.head.2", "decoder.conv_out"),
    ("encoder.middle.0", "encoder.mid_block.resnets.0"),
    ("encoder.middle.1", "encoder.mid_block.attentions.0"),
    ("encoder.middle.2", "encoder.mid_block.resnets.1"),
    ("decoder.middle.0", "decoder.mid_block.resnets.0"),
    ("decoder.middle.1", "decoder.mid_block.attentions.0"),
    ("decoder.middle.2", "decoder.mid_block.resnets.1"),
)

# Inside a residual block: the original numbered sequence (norm, SiLU, conv, norm, SiLU, dropout, conv)
# keeps parameters only at 0, 2, 3 and 6. Resampler parts (resample.1, time_conv) keep their names.
_RESIDUAL_PARTS: tuple[tuple[str, str], ...] = (
    ("residual.0", "norm1"),
    ("residual.2", "conv1"),
    ("residual.3", "norm2"),
    ("residual.6", "conv2"),
    ("shortcut", "conv_shortcut"),
)

_ORIGINAL_UPSAMPLE = re.compile(r"^decoder\.upsamples\.(\d+)\.(.+)$")
_DIFFUSERS_UP_BLOCK = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)$")
_ORIGINAL_DOWNSAMPLE = re.compile(r"^encoder\.downsamples\.(\d+)\.(.+)$")
_DIFFUSERS_DOWN_BLOCK = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$")

# A key that only the respective layout has; used to tell them apart.
ORIGINAL_ANCHOR_KEY = "encoder.conv1.weight"
DIFFUSERS_ANCHOR_KEY = "encoder.conv_in.weight"


def _rename_prefix(key: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    """Rename the longest matching module prefix of ``key``; None if no pair applies."""
    best: tuple[str, str] | None = None
    for old, new in pairs:
        if key.startswith(old + ".") and (best is None or len(old) > len(best[0])):
            best = (old, new)
    return None if best is None else best[1] + key[len(best[0]) :]


def _rename_block_part(rest: str, to_diffusers: bool) -> str:
    pairs = _RESIDUAL_PARTS if to_diffusers else tuple((d, o) for o, d in _RESIDUAL_PARTS)
    renamed = _rename_prefix(rest, pairs)
    return rest if renamed is None else renamed


def _original_decoder_layout(keys: Iterable[str]) -> dict[int, str]:
    """Flat decoder index j -> diffusers module prefix, read from which entries are upsamplers."""
    entries: dict[int, bool] = {}
    for key in keys:
        match = _ORIGINAL_UPSAMPLE.match(key)
        if match:
            j = int(match.group(1))
            entries[j] = entries.get(j, False) or match.group(2).startswith("resample.")
    layout: dict[int, str] = {}
    block, slot = 0, 0
    for j in sorted(entries):
        if entries[j]:
            layout[j] = f"decoder.up_blocks.{block}.upsamplers.0"
            block, slot = block + 1, 0
        else:
            layout[j] = f"decoder.up_blocks.{block}.resnets.{slot}"
            slot += 1
    return layout


def _diffusers_decoder_layout(keys: Iterable[str]) -> dict[str, int]:
    """diffusers decoder module prefix ('up_blocks.b.resnets.s' / 'up_blocks.b.upsamplers.0') -> flat index j."""
    resnet_count: dict[int, int] = {}
    has_upsampler: dict[int, bool] = {}
    for key in keys:
        match = _DIFFUSERS_UP_BLOCK.match(key)
        if not match:
            continue
        block = int(match.group(1))
        has_upsampler.setdefault(block, False)
        resnet_count.setdefault(block, 0)
        if match.group(3) is None:
            has_upsampler[block] = True
        else:
            resnet_count[block] = max(resnet_count[block], int(match.group(3)) + 1)
    layout: dict[str, int] = {}
    offset = 0
    for block in sorted(resnet_count):
        for slot in range(resnet_count[block]):
            layout[f"up_blocks.{block}.resnets.{slot}"] = offset + slot
        offset += resnet_count[block]
        if has_upsampler[block]:
            layout[f"up_blocks.{block}.upsamplers.0"] = offset
            offset += 1
    return layout


def original_to_diffusers_keys(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename an original/ComfyUI-layout state dict to diffusers names. Unknown keys pass through unchanged
    (so that a strict load reports them)."""
    decoder_layout = _original_decoder_layout(state_dict)
    converted: dict[str, V] = {}
    for key, tensor in state_dict.items():
        if match := _ORIGINAL_DOWNSAMPLE.match(key):
            new_key = f"encoder.down_blocks.{match.group(1)}." + _rename_block_part(match.group(2), True)
        elif match := _ORIGINAL_UPSAMPLE.match(key):
            new_key = decoder_layout[int(match.group(1))] + "." + _rename_block_part(match.group(2), True)
        elif (renamed := _rename_prefix(key, _FIXED_PREFIXES)) is not None:
            # Mid-block residuals carry residual.N parts too; attention parts are unchanged.
            head, _, leaf_path = renamed.partition(".mid_block.resnets.")
            if leaf_path:
                slot, _, rest = leaf_path.partition(".")
                renamed = f"{head}.mid_block.resnets.{slot}." + _rename_block_part(rest, True)
            new_key = renamed
        else:
            new_key = key
        converted[new_key] = tensor
    return converted


def diffusers_to_original_keys(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Rename a diffusers-layout state dict to original/ComfyUI names (inverse of ``original_to_diffusers_keys``)."""
    decoder_layout = _diffusers_decoder_layout(state_dict)
    inverse_fixed = tuple((d, o) for o, d in _FIXED_PREFIXES)
    converted: dict[str, V] = {}
    for key, tensor in state_dict.items():
        if match := _DIFFUSERS_DOWN_BLOCK.match(key):
            new_key = f"encoder.downsamples.{match.group(1)}." + _rename_block_part(match.group(2), False)
        elif match := _DIFFUSERS_UP_BLOCK.match(key):
            module = f"up_blocks.{match.group(1)}.{match.group(2)}"
            new_key = f"decoder.upsamples.{decoder_layout[module]}." + _rename_block_part(match.group(4), False)
        elif (renamed := _rename_prefix(key, inverse_fixed)) is not None:
            head, _, leaf_path = renamed.partition(".middle.")
            if leaf_path and not leaf_path.startswith("1."):
                slot, _, rest = leaf_path.partition(".")
                renamed = f"{head}.middle.{slot}." + _rename_block_part(rest, False)
            new_key = renamed
        else:
            new_key = key
        converted[new_key] = tensor
    return converted
