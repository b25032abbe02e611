"""ComfyUI's LoRA-file matching rules for Anima, re-stated from its comfy/lora.py and comfy/weight_adapter
(lora.py, lokr.py, loha.py), so tests can check that a saved file loads there with every key.

Key map (``model_lora_keys_unet`` / ``model_lora_keys_clip``): every DiT weight ``diffusion_model.<path>.weight``
is reachable as ``lora_unet_<path, . -> _>`` and as ``diffusion_model.<path>``; every Qwen3 weight
``qwen3_06b.transformer.model.<path>.weight`` as ``text_encoders.qwen3_06b.transformer.model.<path>`` and, in
recent releases, ``lora_te_<path, . -> _>``. For each mapped prefix x, ``load_lora`` takes ``x.alpha`` and
``x.dora_scale``, then the first adapter whose keys are present: LoRA (``x.lora_up.weight`` +
``x.lora_down.weight``, or ``x.lora_B.weight`` + ``x.lora_A.weight``), LoHa (``x.hada_w1_a`` present: w1_a,
w1_b, w2_a, w2_b), LoKr (any of ``x.lokr_w1`` / ``x.lokr_w2`` / ``x.lokr_w1_a`` / ``x.lokr_w2_a``: all of
w1, w2, w1_a, w1_b, w2_a, w2_b, t2 that exist). Any key left over is reported "lora key not loaded".

Updates as ComfyUI computes them: LoRA ``up @ down * alpha / rank``; LoHa ``(w1_a @ w1_b) * (w2_a @ w2_b) *
alpha / w1_b.shape[0]``; LoKr ``kron(w1, w2) * alpha / dim`` with dim the rank of the decomposed factor
(``w2_b``'s, else ``w1_b``'s) and scale 1 when both are full or alpha is absent.
"""

from __future__ import annotations

import torch
from torch import nn

LOKR_NAMES = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def key_map(dit: nn.Module, text_encoder: nn.Module | None = None) -> dict[str, str]:
    """LoRA key prefix -> model weight key, as ComfyUI registers them for Anima. A prefix that two weights
    would share (ComfyUI keeps the last one silently) fails here, so every prefix means exactly one module."""
    mapping: dict[str, str] = {}

    def add(prefix: str, weight: str) -> None:
        assert mapping.setdefault(prefix, weight) == weight, f"{prefix} names {mapping[prefix]} and {weight}"

    for name, _ in dit.named_parameters():
        if name.endswith(".weight"):
            path = name[: -len(".weight")]
            add(f"lora_unet_{path.replace('.', '_')}", f"diffusion_model.{name}")
            add(f"diffusion_model.{path}", f"diffusion_model.{name}")
    for name, _ in text_encoder.named_parameters() if text_encoder is not None else []:
        if name.endswith(".weight"):
            path = name[: -len(".weight")]
            weight = f"qwen3_06b.transformer.model.{name}"
            add(f"text_encoders.qwen3_06b.transformer.model.{path}", weight)
            add(f"lora_te_{path.replace('.', '_')}", weight)
    return mapping


def load_patches(sd: dict[str, torch.Tensor], mapping: dict[str, str]) -> tuple[dict[str, tuple], set[str]]:
    """ComfyUI's load_lora: (model weight key -> (adapter name, tensors by name, alpha)), keys not loaded."""
    patches, loaded = {}, set()
    for x, target in mapping.items():
        alpha = None
        if f"{x}.alpha" in sd:
            alpha = float(sd[f"{x}.alpha"])
            loaded.add(f"{x}.alpha")
        if f"{x}.dora_scale" in sd:
            loaded.add(f"{x}.dora_scale")
        adapter = None
        for up, down in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
            if f"{x}.{up}" in sd:
                adapter = ("lora", {"up": sd[f"{x}.{up}"], "down": sd[f"{x}.{down}"]})
                loaded |= {f"{x}.{up}", f"{x}.{down}"}
                break
        if adapter is None and f"{x}.hada_w1_a" in sd:
            adapter = ("loha", {n: sd[f"{x}.{n}"] for n in LOHA_NAMES})
            loaded |= {f"{x}.{n}" for n in LOHA_NAMES}
        if adapter is None and any(f"{x}.{n}" in sd for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
            adapter = ("lokr", {n: sd[f"{x}.{n}"] for n in LOKR_NAMES if f"{x}.{n}" in sd})
            loaded |= {f"{x}.{n}" for n in LOKR_NAMES if f"{x}.{n}" in sd}
        if adapter is not None:
            assert target not in patches, f"two LoRA modules patch {target}"
            patches[target] = (*adapter, alpha)
    return patches, set(sd) - loaded


def weight_delta(kind: str, t: dict[str, torch.Tensor], alpha: float | None, shape: torch.Size) -> torch.Tensor:
    """The update ComfyUI adds to a weight of ``shape`` (strength 1)."""
    t = {k: v.float() for k, v in t.items()}
    if kind == "lora":
        scale = 1.0 if alpha is None else alpha / t["down"].shape[0]
        return (t["up"] @ t["down"]).reshape(shape) * scale
    if kind == "loha":
        scale = 1.0 if alpha is None else alpha / t["hada_w1_b"].shape[0]
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape) * scale
    dim = None
    w1 = t.get("lokr_w1")
    if w1 is None:
        dim = t["lokr_w1_b"].shape[0]
        w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t.get("lokr_w2")
    if w2 is None:
        dim = t["lokr_w2_b"].shape[0]
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale
