"""LoHa (low-rank Hadamard product) network for Anima: ``--network_module networks.loha``.

For a layer W [out, in] the update is ``ΔW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r``
with ``*_a`` [out, r] and ``*_b`` [r, in] (element-wise product of two rank-r matrices, so rank up to r²).
Tensor names are sd-scripts' and LyCORIS' (``lora_unet_<path>.hada_w1_a`` ...), so ComfyUI's LoHa loader
reads the files.

``--network_args``: the layer choice of networks.lora_anima (train_llm_adapter, include/exclude_patterns,
network_reg_dims/lrs, rank/module dropout, LoRA+ ratios: LoRA+ trains hada_w2_a at lr x ratio).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from library.errors import AnimaError
from networks.lokr import warn_unused_neuron_dropout
from networks.lora_format import LOHA_KIND
from networks.network_base import (
    COMMON_OPTION_PARSERS,
    CONV_ARG_PARSERS,
    AdapterModule,
    AdapterNetwork,
    build_network,
    build_network_from_weights,
)

MODULE_NAME = "networks.loha"
EXTRA_PARSERS = dict(CONV_ARG_PARSERS)
VALID_NETWORK_ARGS = (*COMMON_OPTION_PARSERS, *EXTRA_PARSERS)


class LoHaModule(AdapterModule):
    """``ΔW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank`` for one nn.Linear."""

    KIND = LOHA_KIND
    PLUS_NAMES = ("hada_w2_a",)

    def __init__(
        self,
        lora_name: str,
        original_name: str,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__(lora_name, original_name, in_features, out_features, rank, alpha, multiplier,
                         dropout, rank_dropout, module_dropout)
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, rank))
        self.hada_w1_b = nn.Parameter(torch.empty(rank, in_features))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_features, rank))  # zero: the network starts as a no-op
        self.hada_w2_b = nn.Parameter(torch.empty(rank, in_features))
        # sd-scripts' / LyCORIS' initialisation.
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        self.refresh_scale()

    def _delta(self, dtype: torch.dtype) -> torch.Tensor:
        w1 = self.hada_w1_a.to(dtype) @ self.hada_w1_b.to(dtype)  # [out, in]
        w2 = self.hada_w2_a.to(dtype) @ self.hada_w2_b.to(dtype)  # [out, in]
        return w1 * w2 * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.skipped():
            return None
        y = F.linear(x, self._delta(x.dtype))  # [B, ..., out]
        return self.output_rank_dropout(y) * self.multiplier

    def delta_weight(self) -> torch.Tensor:
        return self._delta(torch.float32)

    def delta_factors(self) -> list[torch.Tensor]:
        return [self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b]

    def folded_alpha_parameter(self) -> torch.Tensor:
        return self.hada_w1_a

    @classmethod
    def kwargs_from_parts(cls, parts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        rank, rank2 = parts["hada_w1_b"].shape[0], parts["hada_w2_b"].shape[0]
        if rank != rank2:
            raise AnimaError(
                f"LoHa files with two different ranks ({rank} and {rank2}) in one module are not supported"
            )
        alpha = parts.get("alpha")
        return {"rank": int(rank), "alpha": None if alpha is None else float(alpha.float())}


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> AdapterNetwork:
    """New LoHa network; kwargs are the ``--network_args`` (strings), see VALID_NETWORK_ARGS."""
    warn_unused_neuron_dropout("LoHa", neuron_dropout)
    return build_network(LoHaModule, MODULE_NAME, multiplier, network_dim, network_alpha, text_encoders, unet,
                         None, kwargs, EXTRA_PARSERS)


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[AdapterNetwork, dict[str, torch.Tensor]]:
    """Network with exactly the modules and ranks of a LoHa file (either layout), weights loaded."""
    return build_network_from_weights(LoHaModule, MODULE_NAME, multiplier, file, text_encoders, unet, weights_sd,
                                      for_inference, kwargs, EXTRA_PARSERS)
