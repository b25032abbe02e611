"""``--network_module lycoris.kohya``: LyCORIS (PyPI ``lycoris-lora``, an optional dependency) on Anima.

LyCORIS builds its modules itself, choosing layers by module class name (its presets list Anima's ``Block``,
``PatchEmbed``, ``TimestepEmbedding``, ``FinalLayer``, ``LLMAdapterTransformerBlock`` and Qwen3's
``Qwen3Attention`` / ``Qwen3MLP``; the classes here carry those names), and names them
``lora_unet_<path>`` / ``lora_te_<path>`` like the native modules. This adapter gives LyCORIS' network the
trainer API this project calls (hooks removable, one error line for bad network_args or files, atomic saves
with the sshs hashes, either key layout) and otherwise leaves LyCORIS' behaviour alone: its algorithms
(``algo=lora|locon|lokr|loha|dylora|glora|full|diag-oft|boft|ia3|tlora``), ``preset``, ``factor``,
``dora_wd``, ``decompose_both``, ... mean what LyCORIS documents.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.errors import AnimaError
from networks import LYCORIS_MODULE
from networks.lora_format import (
    COMFY_FORMAT,
    SD_SCRIPTS_FORMAT,
    TE_PREFIX,
    TE_PREFIX_ALIASES,
    check_lora_format,
    convert_from_comfy,
    convert_to_comfy,
    detect_lora_format,
    format_metadata,
    load_lora_file,
    sample_keys,
    save_lora_file,
)
from networks.network_base import (
    TEXT_ENCODER_SIDE,
    UNET_SIDE,
    most_common,
    side_learning_rates,
    skip_untrained_sides,
    text_encoder_root,
    warn_dropped_side_of_weights,
    weights_to_load,
)

MISSING_LIBRARY = (
    "--network_module lycoris.kohya needs the LyCORIS library: pip install lycoris-lora "
    "(or pip install -e .[lycoris]); networks.lokr and networks.loha train LoKr/LoHa without it"
)


def broken_library_message(exc: BaseException) -> str:
    """The error for a LyCORIS that is installed but raises while it is imported, with both versions."""
    try:
        lycoris_version = metadata.version("lycoris-lora")
    except metadata.PackageNotFoundError:
        lycoris_version = "unknown"
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(reason) > 300:
        reason = reason[:300] + "..."
    return (
        f"--network_module lycoris.kohya: the installed LyCORIS (lycoris-lora {lycoris_version}) fails to import "
        f"beside torch {torch.__version__} ({reason}); install a torch release it supports, or a lycoris-lora "
        "release that supports this torch; networks.lokr and networks.loha train LoKr/LoHa without it"
    )


try:
    import lycoris.kohya as lycoris_kohya
    from lycoris.config import PRESET
    from lycoris.wrapper import deprecated_arg_dict, network_module_dict
except ImportError as exc:
    raise AnimaError(MISSING_LIBRARY) from exc
except Exception as exc:  # installed, but it fails while importing (e.g. on a torch release it does not support)
    raise AnimaError(broken_library_message(exc)) from exc

logger = logging.getLogger(__name__)

# The --network_args keys lycoris.kohya.create_network reads (it ignores any other key silently).
LYCORIS_ARGS = (
    "algo", "preset", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "factor",
    "decompose_both", "full_matrix", "unbalanced_factorization", "dora_wd", "wd_on_output", "use_tucker",
    "use_scalar", "block_size", "train_norm", "constraint", "rescaled", "bypass_mode", "rs_lora",
    "train_llm_adapter", "train_t5xxl", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio", *deprecated_arg_dict,
)
VALID_NETWORK_ARGS = LYCORIS_ARGS
# Keys whose target Anima does not have.
_NO_EFFECT = {
    "conv_dim": "Anima has no convolution layers to adapt",
    "conv_alpha": "Anima has no convolution layers to adapt",
    "train_t5xxl": "Anima has no T5 text encoder (its T5 tokenizer only feeds the LLM adapter)",
}
# Algorithms whose tensors the ComfyUI key layout here knows (LoRA/LoCon, LoKr, LoHa).
_COMFY_ALGOS = ("lora", "locon", "lokr", "loha")


def check_network_args(network_args: Mapping[str, Any]) -> None:
    """Refuse keys LyCORIS would ignore and values it would fail on late (before any model work)."""
    unknown = sorted(k for k in network_args if k not in LYCORIS_ARGS)
    if unknown:
        raise AnimaError(
            f"unknown --network_args key(s) {', '.join(unknown)} for lycoris.kohya (LyCORIS selects layers with "
            f"preset=..., not include/exclude patterns); valid keys: {', '.join(LYCORIS_ARGS)}"
        )
    algo = str(network_args.get("algo") or "lora").lower()
    if algo not in network_module_dict:
        raise AnimaError(f"--network_args algo={algo}: LyCORIS algorithms are {', '.join(network_module_dict)}")
    preset = network_args.get("preset")
    if preset is not None and preset not in PRESET and not Path(str(preset)).is_file():
        raise AnimaError(
            f"--network_args preset={preset}: neither a LyCORIS preset ({', '.join(PRESET)}) nor a preset TOML file"
        )
    for key, number in (("factor", int), ("block_size", int), ("constraint", float)):
        if network_args.get(key) is not None:
            try:
                number(network_args[key])
            except (TypeError, ValueError):
                raise AnimaError(f"--network_args {key}={network_args[key]!r}: expected a number") from None
    for key, reason in _NO_EFFECT.items():
        if network_args.get(key) is not None:
            logger.warning("--network_args %s has no effect: %s", key, reason)


def _sd_scripts_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Either layout -> LyCORIS' key names (``lora_te1_`` of sd-scripts' list-of-encoders call -> ``lora_te_``)."""
    if detect_lora_format(sd) == COMFY_FORMAT:
        return convert_from_comfy(sd, add_missing_alpha=False)
    out = {}
    for key, tensor in sd.items():
        for alias in TE_PREFIX_ALIASES:
            if key.startswith(alias + "_"):
                key = TE_PREFIX + key[len(alias) :]
        out[key] = tensor
    return out


class AnimaLycorisNetwork(lycoris_kohya.LycorisNetworkKohya):
    """LyCORIS' kohya network with the calls this trainer makes. Instances are LyCORIS' own networks whose
    class is switched to this subclass (it adds methods only), so LyCORIS builds them exactly as it would."""

    algo: str = "lora"
    network_dim: int | None = None  # set from a file's modules (create_network_from_weights)
    network_alpha: float | None = None
    dora_unchecked: bool = False  # built without DoRA on weightless models (see create_network)
    untrained_sides: frozenset[str] = frozenset()  # set by apply_to
    from_weights: bool = False  # built from a file's modules (--dim_from_weights)

    @classmethod
    def adopt(cls, network: lycoris_kohya.LycorisNetworkKohya, algo: str) -> AnimaLycorisNetwork:
        network.__class__ = cls
        network.algo = algo
        return network

    def apply_to(self, text_encoders: Any = None, unet: nn.Module | None = None,
                 apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        # sides left out (--network_train_unet_only, cached text-encoder outputs, ..._text_encoder_only)
        built = {TEXT_ENCODER_SIDE: (apply_text_encoder, self.text_encoder_loras),
                 UNET_SIDE: (apply_unet, self.unet_loras)}
        self.untrained_sides = frozenset(side for side, (applied, _) in built.items() if not applied)
        for side in self.untrained_sides:
            if self.from_weights and built[side][1]:  # counted before LyCORIS' apply_to empties that side
                warn_dropped_side_of_weights(len(built[side][1]), side)
        super().apply_to(text_encoders, unet, bool(apply_text_encoder), bool(apply_unet))

    def remove_hooks(self) -> None:
        """Give every wrapped layer its own forward back."""
        self.restore()

    @torch.no_grad()
    def merge_to(self, text_encoders: Any = None, unet: nn.Module | None = None,
                 weights_sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        """``--base_weights``: bake what each wrapped layer adds (multiplier included) into its weight; the
        modules of create_network_from_weights already hold the file's tensors, and no hook stays installed.

        The update is read off the wrapped forward itself, ``(layer(I) - original(I))^T``, because LyCORIS'
        own merge (get_diff_weight, lycoris-lora 4.1.3) applies alpha / rank twice and so disagrees with the
        forward whenever alpha != rank."""
        if weights_sd is not None:
            self.load_state_dict(_sd_scripts_keys(weights_sd), strict=False)
        self.loras = self.text_encoder_loras + self.unet_loras
        for lora in self.loras:
            layer = lora.org_module[0]
            if not isinstance(layer, nn.Linear):
                raise AnimaError(f"'{lora.lora_name}': only linear layers can be merged, got {type(layer).__name__}")
            lora.eval()
            lora.apply_to()
            try:
                eye = torch.eye(layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype)
                update = (layer(eye).float() - lora.org_forward(eye).float()).T  # [out, in]
            finally:
                lora.restore()
            layer.weight.copy_((layer.weight.float() + update).to(layer.weight.dtype))
        logger.info("merged %d LyCORIS modules into the base weights", len(self.loras))

    def module_names(self) -> list[str]:
        return [lora.lora_name for lora in self.loras]

    def check_save_format(self, lora_format: str) -> None:
        check_lora_format(lora_format)
        if lora_format == COMFY_FORMAT and self.algo not in _COMFY_ALGOS:
            raise AnimaError(
                f"--lora_format comfy: LyCORIS algo={self.algo} tensors have no ComfyUI-layout names here "
                f"(supported: {', '.join(_COMFY_ALGOS)}); save in the sd-scripts layout, which ComfyUI reads too"
            )

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None,
        component_lrs: Mapping[str, float | None] | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        given = sorted(k for k, v in (component_lrs or {}).items() if v is not None)
        if given:
            raise AnimaError(
                f"{', '.join('--' + k + '_lr' for k in given)}: per-component learning rates work with "
                "networks.lora_anima / lokr / loha; LyCORIS has one learning rate per model"
            )
        groups, descriptions = super().prepare_optimizer_params(
            *side_learning_rates(text_encoder_lr, unet_lr, default_lr), default_lr
        )
        return [{**g, "params": list(g["params"])} for g in groups], descriptions

    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    def save_weights(self, file: str, dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None,
                     lora_format: str | None = None) -> None:
        """Atomic save, LyCORIS' keys in the sd-scripts layout (default) or the ComfyUI one (alphas kept)."""
        lora_format = check_lora_format(lora_format or SD_SCRIPTS_FORMAT)
        self.check_save_format(lora_format)
        sd = {k: v.detach().clone().cpu() for k, v in self.state_dict().items()}
        if lora_format == COMFY_FORMAT:
            sd = convert_to_comfy(sd, fold_alpha=False)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        save_lora_file(file, sd, {**(metadata or {}), **format_metadata(lora_format, False)})

    def load_weights(self, file: str) -> list[str]:
        """``--network_weights``: every tensor of the file must fit a module here; returns the state dict keys
        the file lacks."""
        raw, _ = load_lora_file(file)
        sd = _sd_scripts_keys(raw)
        try:
            result = self.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # a shape mismatch
            raise AnimaError(f"--network_weights {file}: {str(exc).splitlines()[-1].strip()}; use "
                             "--dim_from_weights or the --network_dim / network_args it was trained with") from None
        unexpected = [k for k in result.unexpected_keys if not (self.dora_unchecked and k.endswith(".dora_scale"))]
        file_modules = sorted({k.split(".")[0] for k in unexpected})
        skipped = skip_untrained_sides(file_modules, self.untrained_sides, f"--network_weights {file}")
        unexpected = [k for k in unexpected if k.split(".")[0] not in skipped]
        if unexpected:
            raise AnimaError(
                f"--network_weights {file}: {len(unexpected)} tensor(s) fit no module of this network: "
                f"{sample_keys(unexpected)}; use --dim_from_weights or the network_args (algo, preset, "
                "train_llm_adapter, ...) it was trained with"
            )
        if result.missing_keys:
            logger.warning("%s has no weights for %d tensor(s): %s", file, len(result.missing_keys),
                           sample_keys(result.missing_keys))
        return list(result.missing_keys)


def create_network(
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module | None,
    neuron_dropout: float | None = None,
    **kwargs: Any,
) -> AnimaLycorisNetwork:
    """LyCORIS' create_network on Anima; kwargs are the ``--network_args`` (see LYCORIS_ARGS). The trainer's
    --network_dropout becomes LyCORIS' ``dropout`` unless network_args set it."""
    check_network_args(kwargs)
    if neuron_dropout is not None and kwargs.get("dropout") is None:
        kwargs["dropout"] = neuron_dropout
    # The trainer first builds the network on weightless (meta) models to check options and files early.
    # DoRA reads the layer weights when it is built, so that check builds without it and then accepts the
    # dora_scale tensors of a --network_weights file unseen.
    weightless = unet is not None and any(p.is_meta for p in unet.parameters())
    dora_unchecked = weightless and str(kwargs.get("dora_wd", "false")).lower() == "true"
    if dora_unchecked:
        kwargs = {**kwargs, "dora_wd": "false"}
    network = lycoris_kohya.create_network(multiplier, network_dim, network_alpha, vae,
                                           text_encoder_root(text_encoders), unet, **kwargs)
    if not network.loras:
        raise AnimaError("LyCORIS selected no layer of Anima; check --network_args preset / algo")
    network = AnimaLycorisNetwork.adopt(network, str(kwargs.get("algo") or "lora").lower())
    network.dora_unchecked = dora_unchecked
    return network


def create_network_from_weights(
    multiplier: float,
    file: str | None,
    vae: Any,
    text_encoders: Any,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None = None,
    for_inference: bool = False,
    **kwargs: Any,
) -> tuple[AnimaLycorisNetwork, dict[str, torch.Tensor]]:
    """A LyCORIS network with exactly the modules of a file (either layout); every module must find its layer.
    LyCORIS rebuilds the modules from the file alone: network_args (kwargs) have no effect, which is warned."""
    given = sorted(key for key, value in kwargs.items() if value is not None)
    if given:
        logger.warning("--network_args %s have no effect with --dim_from_weights and %s: LyCORIS builds the "
                       "network from the weights file alone", ", ".join(given), LYCORIS_MODULE)
    weights_sd, source = weights_to_load(file, weights_sd)
    sd = _sd_scripts_keys(weights_sd)
    network, _ = lycoris_kohya.create_network_from_weights(multiplier, None, vae, text_encoder_root(text_encoders),
                                                           unet, weights_sd=sd, for_inference=for_inference)
    built = {lora.lora_name for lora in network.unet_loras + network.text_encoder_loras}
    unresolved = sorted({key.split(".")[0] for key in sd} - built)
    if unresolved:
        raise AnimaError(f"{source}: {len(unresolved)} module(s) match no layer of the model (or no LyCORIS "
                         f"algorithm): {sample_keys(unresolved)}; the file was made for another model")
    network.loras = network.text_encoder_loras + network.unet_loras
    kinds = {type(lora).__name__ for lora in network.loras}
    algo = next((name for name, cls in network_module_dict.items() if {cls.__name__} == kinds), "mixed")
    network = AnimaLycorisNetwork.adopt(network, algo)
    network.from_weights = True
    network.network_dim = most_common(int(lora.lora_dim) for lora in network.loras if getattr(lora, "lora_dim", 0))
    network.network_alpha = most_common(float(lora.alpha) for lora in network.loras
                                        if isinstance(getattr(lora, "alpha", None), torch.Tensor))
    if for_inference:
        network.requires_grad_(False)
        network.eval()
    return network, sd
