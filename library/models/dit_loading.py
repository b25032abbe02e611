"""Loading an Anima DiT checkpoint (with its LLM adapter) and inferring its config from the weights."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping

import torch

from library.errors import AnimaError
from library.io.checkpoints import (
    CheckpointFile,
    check_not_scaled_float8,
    guess_checkpoint_kind,
    open_checkpoint,
    sample_keys,
    shard_paths,
    strip_prefix,
)
from library.models.attention import check_attn_mode
from library.models.dit import Anima, AnimaConfig

MODEL_FLAG = "--pretrained_model_name_or_path"
ADAPTER_FLAG = "--llm_adapter_path"
DIT_WHAT = "the Anima diffusion-model .safetensors (DiT with its LLM adapter)"
ADAPTER_WHAT = "an Anima LLM adapter .safetensors"

# Leading prefixes used by the various distributions of the same weights.
_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "net.")
# Derived tables some files carry; the model recomputes them.
_DERIVED_KEYS = re.compile(
    r"^(pos_embedder\.(seq|dim_spatial_range|dim_temporal_range)|llm_adapter\.rotary_emb\.inv_freq)$"
)
# RoPE extrapolation ratios (h, w, t) by latent channel count.
_ROPE_RATIOS = {16: (4.0, 4.0, 1.0), 17: (3.0, 3.0, 1.0)}


def _model_key_map(keys: Iterable[str]) -> dict[str, str]:
    """Model key -> file key: known prefixes stripped, derived tables dropped."""
    out = {}
    for file_key in keys:
        key = strip_prefix(file_key, _KEY_PREFIXES)
        if not _DERIVED_KEYS.match(key):
            out[key] = file_key
    return out


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise KeyError(key)
    return tuple(state_dict[key].shape)


def _count_indexed(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def infer_anima_config(state_dict: Mapping[str, torch.Tensor]) -> AnimaConfig:
    """Infer every size of the DiT and the adapter from a (prefix-stripped) state dict.

    Raises KeyError naming a missing key and ValueError for inconsistent shapes; ``load_anima_model`` turns both
    into one AnimaError naming the file.
    """
    sd = state_dict
    model_channels, patch_features = _shape(sd, "x_embedder.proj.1.weight")
    patch_spatial, patch_temporal = 2, 1  # not recoverable from shapes; every Anima/Cosmos-Predict2 DiT uses these
    patch_volume = patch_spatial**2 * patch_temporal
    if patch_features % patch_volume:
        raise ValueError(f"x_embedder.proj.1.weight in-features {patch_features} is not a multiple of {patch_volume}")
    in_channels = patch_features // patch_volume - 1  # minus the padding-mask channel
    if in_channels not in _ROPE_RATIOS:
        raise ValueError(f"unsupported latent channel count {in_channels} (expected one of {sorted(_ROPE_RATIOS)})")
    rope_h, rope_w, rope_t = _ROPE_RATIOS[in_channels]

    num_blocks = _count_indexed(sd, "blocks.")
    if num_blocks == 0:
        raise KeyError("blocks.0.*")
    head_dim = _shape(sd, "blocks.0.self_attn.q_norm.weight")[0]
    if model_channels % head_dim:
        raise ValueError(f"model width {model_channels} is not a multiple of the head dim {head_dim}")
    crossattn = _shape(sd, "blocks.0.cross_attn.k_proj.weight")[1]
    adaln_lora_dim = _shape(sd, "blocks.0.adaln_modulation_self_attn.1.weight")[0]
    mlp_channels = _shape(sd, "blocks.0.mlp.layer1.weight")[0]
    out_channels = _shape(sd, "final_layer.linear.weight")[0] // patch_volume

    vocab, adapter_embed_dim = _shape(sd, "llm_adapter.embed.weight")
    adapter_layers = _count_indexed(sd, "llm_adapter.blocks.")
    if adapter_layers == 0:
        raise KeyError("llm_adapter.blocks.0.*")
    adapter_model_dim = _shape(sd, "llm_adapter.blocks.0.self_attn.q_proj.weight")[0]
    adapter_head_dim = _shape(sd, "llm_adapter.blocks.0.self_attn.q_norm.weight")[0]
    adapter_source_dim = _shape(sd, "llm_adapter.blocks.0.cross_attn.k_proj.weight")[1]
    adapter_mlp_channels = _shape(sd, "llm_adapter.blocks.0.mlp.0.weight")[0]
    if adapter_embed_dim != adapter_model_dim or adapter_model_dim % adapter_head_dim:
        raise ValueError(
            f"llm_adapter widths do not fit together (embed {adapter_embed_dim}, model {adapter_model_dim}, "
            f"head {adapter_head_dim})"
        )

    return AnimaConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        num_blocks=num_blocks,
        num_heads=model_channels // head_dim,
        mlp_ratio=mlp_channels / model_channels,
        crossattn_emb_channels=crossattn,
        adaln_lora_dim=adaln_lora_dim,
        patch_spatial=patch_spatial,
        patch_temporal=patch_temporal,
        rope_h_extrapolation_ratio=rope_h,
        rope_w_extrapolation_ratio=rope_w,
        rope_t_extrapolation_ratio=rope_t,
        adapter_source_dim=adapter_source_dim,
        adapter_model_dim=adapter_model_dim,
        adapter_num_layers=adapter_layers,
        adapter_num_heads=adapter_model_dim // adapter_head_dim,
        adapter_mlp_ratio=adapter_mlp_channels / adapter_model_dim,
        adapter_vocab_size=vocab,
    )


def _adapter_key_map(adapter: CheckpointFile) -> dict[str, str]:
    """Adapter-only file: keys ``llm_adapter.*``, ``net.llm_adapter.*`` or bare adapter keys -> ``llm_adapter.*``."""
    out = {}
    for key, file_key in _model_key_map(adapter.keys()).items():
        out[key if key.startswith("llm_adapter.") else "llm_adapter." + key] = file_key
    if "llm_adapter.embed.weight" not in out:
        raise AnimaError(
            f"{ADAPTER_FLAG}: {adapter.path} has no llm_adapter embed weight; it is not an Anima LLM adapter file"
        )
    return out


def load_anima_model(
    path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_mode: str = "torch",
    split_attn: bool = False,
    llm_adapter_path: str | None = None,
) -> Anima:
    """Load an Anima DiT (+ LLM adapter) checkpoint; the config is inferred from the weights.

    Accepts ``net.``, ``diffusion_model.`` and ``model.diffusion_model.`` key prefixes and ignores the derived
    ``pos_embedder.*`` RoPE tables; a ``...-00001-of-0000N.safetensors`` name loads all N parts. Scaled-float8
    files are refused (plain float8 weights are upcast). ``llm_adapter_path`` weights replace or complete the
    adapter. All floating weights are cast to ``dtype`` on ``device``; the model is returned in eval mode with
    gradients enabled (the trainer decides what trains). ``device="meta"`` checks the files from their headers
    and returns a weightless model.
    """
    attn_mode = check_attn_mode(attn_mode, training=False)
    path = os.fspath(path)
    with contextlib.ExitStack() as stack:
        # A file split in parts (``...-00001-of-00002.safetensors``) is read whole, as sd-scripts does.
        parts = [stack.enter_context(open_checkpoint(p, MODEL_FLAG, DIT_WHAT)) for p in shard_paths(path, MODEL_FLAG)]
        # Every check below runs on shapes from the file headers (meta tensors), before any weight is read.
        file_keys = [key for part in parts for key in part.keys()]
        check_not_scaled_float8(file_keys, MODEL_FLAG, path)
        key_maps = [(part, _model_key_map(part.keys())) for part in parts]
        sources = {key: (part, file_key) for part, key_map in key_maps for key, file_key in key_map.items()}
        if len(sources) != sum(len(key_map) for _, key_map in key_maps):
            raise AnimaError(
                f"{MODEL_FLAG}: {path} holds some tensors twice (under two key prefixes, or in two parts of a split "
                "file); pass a checkpoint with each tensor once"
            )
        if "x_embedder.proj.1.weight" not in sources:
            raise AnimaError(
                f"{MODEL_FLAG}: {path} is not an Anima DiT checkpoint (no x_embedder.proj.1.weight; it looks like "
                f"{guess_checkpoint_kind(file_keys)}; found {sample_keys(file_keys, 3)}); pass {DIT_WHAT}"
            )
        if llm_adapter_path is not None:
            adapter = stack.enter_context(open_checkpoint(os.fspath(llm_adapter_path), ADAPTER_FLAG, ADAPTER_WHAT))
            check_not_scaled_float8(adapter.keys(), ADAPTER_FLAG, llm_adapter_path)
            sources.update({key: (adapter, file_key) for key, file_key in _adapter_key_map(adapter).items()})
        if not any(key.startswith("llm_adapter.") for key in sources):
            raise AnimaError(
                f"{MODEL_FLAG}: {path} has no llm_adapter.* weights: pass {ADAPTER_FLAG} <adapter .safetensors> "
                "or use a checkpoint that includes the adapter"
            )
        file_shapes = {file: file.meta_state_dict() for file in {file for file, _ in sources.values()}}
        shapes = {key: file_shapes[file][file_key] for key, (file, file_key) in sources.items()}

        try:
            config = infer_anima_config(shapes)
        except KeyError as e:
            raise AnimaError(
                f"{MODEL_FLAG}: {path} is missing {e.args[0]}; the Anima checkpoint is incomplete"
            ) from None
        except ValueError as e:
            raise AnimaError(f"{MODEL_FLAG}: {path} has an unsupported layout: {e}") from None

        with torch.device("meta"):
            model = Anima(config, attn_mode=attn_mode, split_attn=split_attn)
        expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        missing = expected.keys() - sources.keys()
        unexpected = sources.keys() - expected.keys()
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing {sample_keys(missing)}")
            if unexpected:
                parts.append(f"unexpected {sample_keys(unexpected)}")
            raise AnimaError(f"{MODEL_FLAG}: {path} does not match the inferred Anima layout: {'; '.join(parts)}")
        wrong_shape = [k for k, shape in expected.items() if tuple(shapes[k].shape) != shape]
        if wrong_shape:
            details = ", ".join(f"{k} {tuple(shapes[k].shape)} (expected {expected[k]})" for k in wrong_shape[:3])
            raise AnimaError(f"{MODEL_FLAG}: {path} has tensors of inconsistent shape: {details}")

        state_dict = {key: file.tensor(file_key, device, dtype) for key, (file, file_key) in sources.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    return model.eval()
