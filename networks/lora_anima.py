"""LoRA network for Anima: the DiT, its LLM adapter and the Qwen3 text encoder.

Usable as ``--network_module networks.lora_anima`` with the sd-scripts network API
(``create_network``, ``create_network_from_weights``, ``apply_to``, ``prepare_optimizer_params`` ...).

Each selected ``nn.Linear`` gets the low-rank update ``y = W x + up(drop(down(x))) * multiplier * alpha / r``.
The layer choice, the network container and the file handling are shared with LoKr and LoHa
(networks.network_base); this module holds only the LoRA adapter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from networks.lora_format import LORA_KIND
from networks.network_base import AdapterModule, AdapterNetwork, network_entry_points, valid_network_args

LoRANetwork = AdapterNetwork  # the container; its modules are LoRAModule here


class LoRAModule(AdapterModule):
    """Low-rank update for one nn.Linear: ``up(drop(down(x))) * multiplier * alpha / rank``."""

    KIND = LORA_KIND
    PLUS_NAMES = ("lora_up",)

    def init_parameters(self) -> None:
        self.lora_down = nn.Linear(self.in_features, self.rank, bias=False)  # weight [r, in]
        self.lora_up = nn.Linear(self.rank, self.out_features, bias=False)  # weight [out, r]
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)  # the network starts as an exact no-op

    def _rank_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """(drop(down(x)) [B, ..., r] in x's dtype, the scale to apply to up(...)); None when the module is skipped."""
        if self.skipped():
            return None
        h = F.linear(x, self.lora_down.weight.to(x.dtype))  # [B, ..., r]
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout is not None:
            # One Bernoulli(1-p) draw per sample and rank channel, shared by all positions of that sample. A given
            # p = 0 still draws (and keeps everything), as sd-scripts does, so the random stream stays its.
            mask_shape = (h.shape[-1],) if h.dim() == 1 else (h.shape[0],) + (1,) * (h.dim() - 2) + (h.shape[-1],)
            keep = torch.rand(mask_shape, device=h.device) > self.rank_dropout  # sd-scripts' test: u > p keeps
            h = h * keep.to(h.dtype)
            scale = scale / (1.0 - self.rank_dropout)  # keeps the expected update unchanged
        return h, self.multiplier * scale

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        rank_part = self._rank_activations(x)
        if rank_part is None:
            return None
        h, scale = rank_part
        return F.linear(h, self.lora_up.weight.to(x.dtype)) * scale

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """output + delta(x), with the scale and the sum inside one GEMM (addmm): no full-size extra passes.

        x: [B, ..., in]; output: the base layer's [B, ..., out].
        """
        x = args[0] if args else kwargs["input"]
        rank_part = self._rank_activations(x)
        if rank_part is None:
            return output
        h, scale = rank_part
        flat = torch.addmm(
            output.reshape(-1, output.shape[-1]),
            h.reshape(-1, h.shape[-1]).to(output.dtype),
            self.lora_up.weight.to(output.dtype).t(),  # [r, out]
            alpha=scale,
        )
        return flat.view(output.shape)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = up @ down * alpha / rank  [out, in] (multiplier not applied)."""
        return (self.lora_up.weight.float() @ self.lora_down.weight.float()) * self.scale

    def delta_factors(self) -> list[torch.Tensor]:
        return [self.lora_up.weight, self.lora_down.weight]

    def folded_alpha_parameter(self) -> torch.Tensor:
        return self.lora_up.weight


VALID_NETWORK_ARGS = valid_network_args(LoRAModule)
# sd-scripts' entry points: create_network(multiplier, network_dim, network_alpha, vae, text_encoders, unet,
# neuron_dropout=None, **network_args) and create_network_from_weights(multiplier, file, vae, text_encoders, unet,
# weights_sd=None, for_inference=False, **network_args).
create_network, create_network_from_weights = network_entry_points(LoRAModule)
