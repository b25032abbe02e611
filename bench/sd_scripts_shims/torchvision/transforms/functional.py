"""resize / pil_to_tensor / InterpolationMode as sd-scripts' Anima dataset path uses them."""

import enum

import numpy as np
import torch
import torch.nn.functional as F


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def resize(tensor, size, interpolation=InterpolationMode.BILINEAR, antialias=None):
    """[..., H, W] -> [..., size[0], size[1]] (a no-op at the same size, the only case the tiny runs hit)."""
    if list(tensor.shape[-2:]) == list(size):
        return tensor
    shape = tensor.shape
    flat = tensor.reshape(-1, 1, shape[-2], shape[-1])
    mode = "nearest-exact" if interpolation == InterpolationMode.NEAREST else interpolation.value
    return F.interpolate(flat, size=list(size), mode=mode).reshape(*shape[:-2], *size)


def pil_to_tensor(picture):
    array = np.asarray(picture)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
