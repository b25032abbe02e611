"""LoRA file formats for Anima: key naming, sd-scripts <-> ComfyUI conversion, reading/writing, hashes.

Two key layouts exist for the same weights (``r`` = rank):

* sd-scripts ("kohya"), the default:
  ``lora_unet_<path with . -> _>.lora_down.weight`` [r, in], ``.lora_up.weight`` [out, r], ``.alpha`` [];
  text encoder (Qwen3) modules use the prefix ``lora_te_``.
* ComfyUI: ``diffusion_model.<path>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r], optional ``.alpha``;
  text encoder modules use ``text_encoders.qwen3_06b.transformer.model.<path>``.

Both apply ``W x + up(down(x)) * alpha / r``; a missing alpha means scale 1 (alpha = r). diffusers rejects
files with keys lacking "lora", so by default the ComfyUI writer folds alpha/r into ``lora_B`` and drops the
alpha keys: ComfyUI and diffusers then both apply the same effective update.

LoKr (``lokr_w1`` / ``lokr_w1_a`` / ``lokr_w1_b`` / ``lokr_w2`` / ``lokr_w2_a`` / ``lokr_w2_b``) and LoHa
(``hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b``) modules use the same module prefixes with
their own tensor names, identical in both layouts (ADAPTER_KEYS is the one table of them); their alpha is
always kept. ``dora_scale`` (LyCORIS ``dora_wd``) may accompany any kind.

Turning ``lora_unet_blocks_0_self_attn_q_proj`` back into ``blocks.0.self_attn.q_proj`` is ambiguous in
general (``_`` is also part of names), so it is resolved either against the module names of a real model
(the network passes them) or against the table of Anima's Linear layers below (the converter CLI).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from library.errors import AnimaError
from library.io.checkpoints import guess_checkpoint_kind, open_checkpoint, sample_keys
from library.io.files import atomic_write, refuse_non_finite, safetensors_hashes

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"
# Some sd-scripts versions wrote the single text encoder as "te1"; accepted when reading, never written.
TE_PREFIX_ALIASES = ("lora_te1",)

COMFY_UNET_PREFIX = "diffusion_model."
COMFY_TE_PREFIX = "text_encoders.qwen3_06b.transformer.model."

SD_SCRIPTS_FORMAT = "sd-scripts"
COMFY_FORMAT = "comfy"
LORA_FORMATS = (SD_SCRIPTS_FORMAT, COMFY_FORMAT)

# Metadata keys this project writes next to the trainer's ss_* keys.
FORMAT_METADATA_KEY = "ss_lora_format"
ALPHA_FOLDED_METADATA_KEY = "ss_lora_alpha_folded"

LORA_KIND = "lora"
LOKR_KIND = "lokr"
LOHA_KIND = "loha"
KIND_NAMES = {LORA_KIND: "LoRA", LOKR_KIND: "LoKr", LOHA_KIND: "LoHa"}

# The one key-mapping table: per adapter kind, each tensor of one module as named in the sd-scripts layout
# -> its name in the ComfyUI layout. LoKr and LoHa tensors keep their names in both.
ADAPTER_KEYS: dict[str, dict[str, str]] = {
    LORA_KIND: {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"},
    LOKR_KIND: {s: s for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
    LOHA_KIND: {s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
}
# Tensors any kind of module may carry, same name in both layouts.
SHARED_KEYS = ("alpha", "dora_scale")

_SD_SUFFIX_TO_COMFY = {
    **{sd: comfy for table in ADAPTER_KEYS.values() for sd, comfy in table.items()},
    **{s: s for s in SHARED_KEYS},
}
_COMFY_SUFFIX_TO_SD = {
    **{comfy: sd for table in ADAPTER_KEYS.values() for sd, comfy in table.items()},
    # Some tools write ComfyUI prefixes with kohya suffixes; ComfyUI accepts both.
    "lora_down.weight": "lora_down.weight",
    "lora_up.weight": "lora_up.weight",
    **{s: s for s in SHARED_KEYS},
}
_SUFFIX_KIND = {suffix: kind for kind, table in ADAPTER_KEYS.items() for suffix in table}
_KNOWN_TENSORS = "lora_down/lora_up/alpha (LoRA), lokr_w1[_a/_b]/lokr_w2[_a/_b] (LoKr), hada_w1_a/b, hada_w2_a/b (LoHa)"

# Every Linear layer of the Anima DiT + LLM adapter and of Qwen3-0.6B (`Qwen3Model` names), "{i}" = index.
# This is the one table used to restore dotted module paths when no model is at hand.
ANIMA_DIT_LINEAR_PATHS = (
    "x_embedder.proj.1",
    "t_embedder.1.linear_1",
    "t_embedder.1.linear_2",
    *(
        f"blocks.{{i}}.{attn}.{proj}"
        for attn in ("self_attn", "cross_attn")
        for proj in ("q_proj", "k_proj", "v_proj", "output_proj")
    ),
    "blocks.{i}.mlp.layer1",
    "blocks.{i}.mlp.layer2",
    *(f"blocks.{{i}}.adaln_modulation_{part}.{j}" for part in ("self_attn", "cross_attn", "mlp") for j in (1, 2)),
    "final_layer.linear",
    "final_layer.adaln_modulation.1",
    "final_layer.adaln_modulation.2",
    *(
        f"llm_adapter.blocks.{{i}}.{attn}.{proj}"
        for attn in ("self_attn", "cross_attn")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
    ),
    "llm_adapter.blocks.{i}.mlp.0",
    "llm_adapter.blocks.{i}.mlp.2",
    "llm_adapter.out_proj",
)
QWEN3_LINEAR_PATHS = (
    *(f"layers.{{i}}.self_attn.{proj}" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")),
    *(f"layers.{{i}}.mlp.{proj}" for proj in ("gate_proj", "up_proj", "down_proj")),
)


def lora_name_for(prefix: str, module_path: str) -> str:
    """``("lora_unet", "blocks.0.mlp.layer1")`` -> ``"lora_unet_blocks_0_mlp_layer1"``."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def _template_regex(template: str) -> re.Pattern[str]:
    # Underscored form of a dotted template; "{i}" captures the index.
    parts = template.replace(".", "_").split("{i}")
    return re.compile(r"(\d+)".join(re.escape(p) for p in parts))


_UNET_TEMPLATES = [(t, _template_regex(t)) for t in ANIMA_DIT_LINEAR_PATHS]
_TE_TEMPLATES = [(t, _template_regex(t)) for t in QWEN3_LINEAR_PATHS]


def module_path_from_table(lora_name: str) -> str:
    """Dotted module path of an sd-scripts LoRA name, using the table of Anima/Qwen3 Linear layers."""
    prefix, body = split_lora_name(lora_name)
    templates = _UNET_TEMPLATES if prefix == UNET_PREFIX else _TE_TEMPLATES
    for template, pattern in templates:
        match = pattern.fullmatch(body)
        if match:
            path = template
            for index in match.groups():
                path = path.replace("{i}", index, 1)
            return path
    raise AnimaError(
        f"LoRA module '{lora_name}' is not a known Anima DiT / LLM adapter / Qwen3 Linear layer; "
        "cannot restore its module path (convert from a file written for Anima)"
    )


def split_lora_name(lora_name: str) -> tuple[str, str]:
    """``"lora_unet_blocks_0_mlp_layer1"`` -> ``("lora_unet", "blocks_0_mlp_layer1")``; aliases normalised."""
    for prefix in (UNET_PREFIX, TE_PREFIX, *TE_PREFIX_ALIASES):
        if lora_name.startswith(prefix + "_"):
            normalised = UNET_PREFIX if prefix == UNET_PREFIX else TE_PREFIX
            return normalised, lora_name[len(prefix) + 1 :]
    raise AnimaError(f"LoRA key '{lora_name}' has no 'lora_unet_' or 'lora_te_' prefix")


def _split_suffix(key: str, suffixes: Iterable[str]) -> tuple[str, str]:
    # Longest first, so that ".lokr_w1_a" is not read as ".lokr_w1" of a module named "..._a".
    for suffix in sorted(suffixes, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise AnimaError(
        f"unsupported LoRA tensor '{key}': known tensors are {_KNOWN_TENSORS} "
        "(Tucker/convolution tensors such as lokr_t2 or hada_t1 do not occur for Anima's linear layers; other "
        "LyCORIS algorithms such as full, ia3, diag-oft, boft or glora are not converted: ComfyUI reads their "
        "sd-scripts-layout files as they are)"
    )


def split_sd_key(key: str) -> tuple[str, str]:
    """``"<lora_name>.lora_down.weight"`` -> ``(lora_name, "lora_down.weight")`` (any adapter kind)."""
    return _split_suffix(key, _SD_SUFFIX_TO_COMFY)


def _split_comfy_key(key: str) -> tuple[str, str]:
    return _split_suffix(key, _COMFY_SUFFIX_TO_SD)


def detect_lora_format(sd: Mapping[str, torch.Tensor]) -> str:
    """``"sd-scripts"`` or ``"comfy"``; a mixed or unrecognised key set is an error."""
    if not sd:
        raise AnimaError("the LoRA file holds no tensors")
    kinds = set()
    for key in sd:
        if key.startswith((UNET_PREFIX + "_", TE_PREFIX + "_", *(a + "_" for a in TE_PREFIX_ALIASES))):
            kinds.add(SD_SCRIPTS_FORMAT)
        elif key.startswith((COMFY_UNET_PREFIX, COMFY_TE_PREFIX)):
            kinds.add(COMFY_FORMAT)
        else:
            raise AnimaError(
                f"unrecognised LoRA key '{key}': expected 'lora_unet_' / 'lora_te_' (sd-scripts) or "
                f"'{COMFY_UNET_PREFIX}' / '{COMFY_TE_PREFIX}' (ComfyUI) keys"
            )
    if len(kinds) > 1:
        raise AnimaError("the LoRA file mixes sd-scripts and ComfyUI key styles; convert it to one style first")
    return kinds.pop()


def module_kind(lora_name: str, parts: Mapping[str, torch.Tensor]) -> str:
    """The adapter kind ("lora", "lokr", "loha") of one module's tensors; checks they are complete and
    consistent in shape."""
    kinds = {_SUFFIX_KIND[s] for s in parts if s in _SUFFIX_KIND}
    if len(kinds) != 1:
        found = " and ".join(KIND_NAMES[k] for k in sorted(kinds)) if kinds else "only " + ", ".join(sorted(parts))
        raise AnimaError(f"LoRA module '{lora_name}' holds {found} tensors; expected one kind (truncated file?)")
    kind = kinds.pop()
    _CHECKS[kind](lora_name, parts)
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise AnimaError(f"LoRA module '{lora_name}' has a non-scalar alpha of shape {tuple(alpha.shape)}")
    return kind


def _shapes(parts: Mapping[str, torch.Tensor], *names: str) -> str:
    return ", ".join(f"{n} {tuple(parts[n].shape)}" for n in names if n in parts)


def _check_lora(lora_name: str, parts: Mapping[str, torch.Tensor]) -> None:
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        raise AnimaError(f"LoRA module '{lora_name}' lacks its lora_down or lora_up weight (truncated file?)")
    if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
        raise AnimaError(
            f"LoRA module '{lora_name}' has inconsistent shapes down {tuple(down.shape)} / up {tuple(up.shape)}"
        )


def _low_rank_pair(lora_name: str, parts: Mapping[str, torch.Tensor], a: str, b: str) -> None:
    if (a in parts) != (b in parts):
        raise AnimaError(f"module '{lora_name}' has {a if a in parts else b} without its partner (truncated file?)")
    if a in parts:
        wa, wb = parts[a], parts[b]
        if wa.dim() != 2 or wb.dim() != 2 or wa.shape[1] != wb.shape[0]:
            raise AnimaError(f"module '{lora_name}' has inconsistent shapes {_shapes(parts, a, b)}")


def _check_lokr(lora_name: str, parts: Mapping[str, torch.Tensor]) -> None:
    for factor in ("lokr_w1", "lokr_w2"):
        full, a, b = factor, factor + "_a", factor + "_b"
        _low_rank_pair(lora_name, parts, a, b)
        if (full in parts) == (a in parts):
            raise AnimaError(
                f"LoKr module '{lora_name}' needs either {full} or {a} + {b} "
                f"(has {_shapes(parts, full, a, b) or 'none'})"
            )
        if full in parts and parts[full].dim() != 2:
            raise AnimaError(f"LoKr module '{lora_name}' has a {parts[full].dim()}-D {full}; linear layers need 2-D")


def _check_loha(lora_name: str, parts: Mapping[str, torch.Tensor]) -> None:
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if not all(n in parts for n in names):
        raise AnimaError(f"LoHa module '{lora_name}' lacks some of {', '.join(names)} (truncated file?)")
    _low_rank_pair(lora_name, parts, "hada_w1_a", "hada_w1_b")
    _low_rank_pair(lora_name, parts, "hada_w2_a", "hada_w2_b")
    w1 = (parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1])
    w2 = (parts["hada_w2_a"].shape[0], parts["hada_w2_b"].shape[1])
    if w1 != w2:
        raise AnimaError(f"LoHa module '{lora_name}' has inconsistent shapes {_shapes(parts, *names)}")


_CHECKS = {LORA_KIND: _check_lora, LOKR_KIND: _check_lokr, LOHA_KIND: _check_loha}


def module_rank(kind: str, parts: Mapping[str, torch.Tensor]) -> int | None:
    """The rank that alpha is divided by (as ComfyUI computes it); None for a LoKr module whose two factors
    are both full matrices (its update is never scaled)."""
    if kind == LORA_KIND:
        return int(parts["lora_down.weight"].shape[0])
    if kind == LOHA_KIND:
        return int(parts["hada_w1_b"].shape[0])
    for low_rank in ("lokr_w2_b", "lokr_w1_b"):  # ComfyUI: the w2 rank wins when both are decomposed
        if low_rank in parts:
            return int(parts[low_rank].shape[0])
    return None


def group_by_module(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """sd-scripts state dict -> {lora_name: {tensor suffix: tensor}} (e.g. "lora_down.weight", "lokr_w1",
    "alpha"), each module checked for completeness and shape consistency."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        lora_name, suffix = split_sd_key(key)
        modules.setdefault(lora_name, {})[suffix] = tensor
    for lora_name, parts in modules.items():
        module_kind(lora_name, parts)
    return modules


def adapter_kinds(sd: Mapping[str, torch.Tensor]) -> set[str]:
    """The adapter kinds an sd-scripts state dict holds."""
    return {module_kind(name, parts) for name, parts in group_by_module(sd).items()}


def convert_to_comfy(
    sd: Mapping[str, torch.Tensor],
    module_paths: Mapping[str, str] | None = None,
    fold_alpha: bool = True,
) -> dict[str, torch.Tensor]:
    """sd-scripts keys -> ComfyUI keys.

    module_paths: lora_name -> dotted module path (from the model); without it the Anima layer table is used.
    fold_alpha: multiply lora_B by alpha/r and drop alpha (loads in ComfyUI and diffusers with the same
    effective scale); False keeps the alpha keys (ComfyUI only). LoKr/LoHa modules always keep their alpha.
    """
    if detect_lora_format(sd) != SD_SCRIPTS_FORMAT:
        raise AnimaError("convert_to_comfy expects sd-scripts keys (lora_unet_/lora_te_), got ComfyUI keys")
    out: dict[str, torch.Tensor] = {}
    for lora_name, parts in group_by_module(sd).items():
        prefix, body = split_lora_name(lora_name)
        canonical = f"{prefix}_{body}"
        if module_paths is not None and canonical in module_paths:
            path = module_paths[canonical]
        else:
            path = module_path_from_table(lora_name)
        base = (COMFY_UNET_PREFIX if prefix == UNET_PREFIX else COMFY_TE_PREFIX) + path
        kind = module_kind(lora_name, parts)
        parts = dict(parts)
        alpha = parts.pop("alpha", None)
        if fold_alpha and kind == LORA_KIND:
            if alpha is not None:
                down, up = parts["lora_down.weight"], parts["lora_up.weight"]
                parts["lora_up.weight"] = (up.float() * (alpha.float() / down.shape[0])).to(up.dtype)
            alpha = None
        for suffix, tensor in parts.items():
            out[f"{base}.{_SD_SUFFIX_TO_COMFY[suffix]}"] = tensor
        if alpha is not None:
            out[f"{base}.alpha"] = alpha
    return out


def convert_from_comfy(sd: Mapping[str, torch.Tensor], add_missing_alpha: bool = True) -> dict[str, torch.Tensor]:
    """ComfyUI keys -> sd-scripts keys. A module without alpha has scale 1; with add_missing_alpha its
    alpha is written as r so the file stays self-describing, otherwise it is left out (a LoKr module made of
    two full matrices never gets one: its update is not scaled)."""
    if detect_lora_format(sd) != COMFY_FORMAT:
        raise AnimaError(
            "convert_from_comfy expects ComfyUI keys (diffusion_model./text_encoders.), got sd-scripts keys"
        )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        module_key, suffix = _split_comfy_key(key)
        if module_key.startswith(COMFY_TE_PREFIX):
            lora_name = lora_name_for(TE_PREFIX, module_key[len(COMFY_TE_PREFIX) :])
        else:
            lora_name = lora_name_for(UNET_PREFIX, module_key[len(COMFY_UNET_PREFIX) :])
        out[f"{lora_name}.{_COMFY_SUFFIX_TO_SD[suffix]}"] = tensor
    return _with_alpha(out) if add_missing_alpha else _checked(out)


def to_sd_scripts_format(sd: Mapping[str, torch.Tensor], add_missing_alpha: bool = True) -> dict[str, torch.Tensor]:
    """Either format -> sd-scripts keys, with ``lora_te1_`` normalised to ``lora_te_``. A module without
    alpha means scale 1; add_missing_alpha writes that as alpha = r."""
    if detect_lora_format(sd) == COMFY_FORMAT:
        return convert_from_comfy(sd, add_missing_alpha=add_missing_alpha)
    out = {}
    for key, tensor in sd.items():
        lora_name, suffix = split_sd_key(key)
        prefix, body = split_lora_name(lora_name)
        out[f"{prefix}_{body}.{suffix}"] = tensor
    return _with_alpha(out) if add_missing_alpha else _checked(out)


def _checked(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    group_by_module(sd)
    return sd


def _with_alpha(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for lora_name, parts in group_by_module(sd).items():
        rank = module_rank(module_kind(lora_name, parts), parts)
        if "alpha" not in parts and rank is not None:
            dtype = next(iter(parts.values())).dtype
            sd[f"{lora_name}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    return sd


NETWORK_ALPHA_METADATA_KEY = "ss_network_alpha"
NETWORK_DIM_METADATA_KEY = "ss_network_dim"


def _metadata_number(metadata: Mapping[str, str], key: str) -> float | None:
    try:
        value = float(metadata.get(key, ""))
    except ValueError:
        return None
    return value if value > 0 and value == value else None  # 0 / "None" / NaN mean "not given"


def to_sd_scripts_with_alpha(
    sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Either layout -> sd-scripts keys in which every module has an alpha, consistent with the metadata.

    A LoRA module without alpha (a ComfyUI file whose alpha was folded into lora_B) gets back the alpha of
    ``ss_network_alpha`` with lora_B unfolded by rank/alpha, so the effective update is unchanged and the
    tensors agree with the metadata again; without a usable ``ss_network_alpha`` its alpha becomes its rank
    (scale 1, lora_B unchanged). For a file of LoRA modules only in which alphas were restored,
    ``ss_network_alpha`` / ``ss_network_dim`` are then set from the tensors when every module shares one value;
    otherwise the metadata is returned as it is (as sd-scripts' converter copies it). LoKr/LoHa
    modules are never folded: a missing alpha means rank, as in ``to_sd_scripts_format``."""
    out = to_sd_scripts_format(sd, add_missing_alpha=False)
    target_alpha = _metadata_number(metadata, NETWORK_ALPHA_METADATA_KEY)
    modules = group_by_module(out)
    kinds = set()
    restored = False  # some LoRA module had its alpha folded away and got one back
    for lora_name, parts in modules.items():
        kind = module_kind(lora_name, parts)
        kinds.add(kind)
        if "alpha" in parts:
            continue
        if kind != LORA_KIND:
            rank = module_rank(kind, parts)
            if rank is not None:
                out[f"{lora_name}.alpha"] = torch.tensor(float(rank), dtype=next(iter(parts.values())).dtype)
            continue
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = down.shape[0]
        alpha = target_alpha if target_alpha is not None else float(rank)
        if alpha != rank:
            out[f"{lora_name}.lora_up.weight"] = (up.float() * (rank / alpha)).to(up.dtype)
        out[f"{lora_name}.alpha"] = torch.tensor(alpha, dtype=down.dtype)
        restored = True
    meta = dict(metadata)
    if kinds == {LORA_KIND} and restored:
        alphas = {float(out[f"{name}.alpha"].float()) for name in modules}
        ranks = {int(parts["lora_down.weight"].shape[0]) for parts in modules.values()}
        if len(alphas) == 1 and _metadata_number(meta, NETWORK_ALPHA_METADATA_KEY) != next(iter(alphas)):
            meta[NETWORK_ALPHA_METADATA_KEY] = str(next(iter(alphas)))
        if len(ranks) == 1 and _metadata_number(meta, NETWORK_DIM_METADATA_KEY) != next(iter(ranks)):
            meta[NETWORK_DIM_METADATA_KEY] = str(next(iter(ranks)))
    return out, meta


LORA_WHAT = "an Anima LoRA file (.safetensors)"


def load_lora_file(
    path: str | os.PathLike, flag: str = "--network_weights"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file (``.safetensors``, or a ``torch.save`` state dict) -> (tensors, metadata).
    ``flag`` names the option the path came from in error messages."""
    with open_checkpoint(path, flag, LORA_WHAT) as checkpoint:
        try:
            detect_lora_format(dict.fromkeys(checkpoint.keys()))  # key names only: nothing read yet
        except AnimaError as error:
            raise AnimaError(
                f"{flag} {path}: {error}; this file looks like {guess_checkpoint_kind(checkpoint.keys())}"
            ) from None
        return checkpoint.read(), checkpoint.metadata()


def save_lora_file(
    path: str | os.PathLike, sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Atomic write. ``.safetensors`` gets the metadata plus fresh sshs_* hashes; other suffixes get a plain
    ``torch.save`` of the state dict (no metadata)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    refuse_non_finite(tensors, path)
    if path.suffix == ".safetensors":
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(tensors, meta)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def format_metadata(lora_format: str, fold_alpha: bool) -> dict[str, str]:
    """The metadata this project adds to describe the key layout (fold_alpha: whether LoRA alphas were folded
    into lora_B; pass False for files without LoRA modules)."""
    meta = {FORMAT_METADATA_KEY: lora_format}
    if lora_format == COMFY_FORMAT:
        meta[ALPHA_FOLDED_METADATA_KEY] = str(fold_alpha)
    return meta


def check_lora_format(value: str, flag: str = "--lora_format") -> str:
    if value not in LORA_FORMATS:
        raise AnimaError(f"{flag} must be one of {', '.join(LORA_FORMATS)}, got '{value}'")
    return value


__all__ = [
    "ADAPTER_KEYS",
    "ANIMA_DIT_LINEAR_PATHS",
    "COMFY_FORMAT",
    "COMFY_TE_PREFIX",
    "COMFY_UNET_PREFIX",
    "LORA_FORMATS",
    "QWEN3_LINEAR_PATHS",
    "SD_SCRIPTS_FORMAT",
    "TE_PREFIX",
    "UNET_PREFIX",
    "adapter_kinds",
    "check_lora_format",
    "convert_from_comfy",
    "convert_to_comfy",
    "detect_lora_format",
    "format_metadata",
    "group_by_module",
    "load_lora_file",
    "lora_name_for",
    "module_kind",
    "module_path_from_table",
    "module_rank",
    "sample_keys",
    "save_lora_file",
    "split_lora_name",
    "split_sd_key",
    "to_sd_scripts_format",
    "to_sd_scripts_with_alpha",
]
