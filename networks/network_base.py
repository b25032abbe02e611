"""What every Anima network module shares: ``--network_args`` parsing, the choice of layers, and the network
container with the sd-scripts network API (``apply_to``, ``prepare_optimizer_params``, ``save_weights`` ...).

A network module (networks.lora_anima, networks.lokr, networks.loha) only supplies its per-layer adapter, an
``AdapterModule`` subclass: how the update of one ``nn.Linear`` is parametrised and computed. Each adapter is
attached with a forward hook, ``y = W x + delta(x) * multiplier``; its weights live in the network, so the
base model's state dict is untouched and the hooks can be removed again.
"""

from __future__ import annotations

import ast
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from library.errors import AnimaError
from networks import LOHA_MODULE, LOKR_MODULE, LORA_MODULE, LYCORIS_MODULE
from networks.lora_format import (
    COMFY_FORMAT,
    KIND_NAMES,
    LOHA_KIND,
    LOKR_KIND,
    LORA_KIND,
    SD_SCRIPTS_FORMAT,
    TE_PREFIX,
    UNET_PREFIX,
    check_lora_format,
    convert_to_comfy,
    format_metadata,
    group_by_module,
    load_lora_file,
    lora_name_for,
    module_kind,
    module_rank,
    sample_keys,
    save_lora_file,
    to_sd_scripts_format,
)

logger = logging.getLogger(__name__)

DEFAULT_NETWORK_DIM = 4
# Always appended to the user's exclusions (DiT and text encoder): AdaLN, norms, embedders, final layer.
DEFAULT_EXCLUDE_PATTERN = r".*(_modulation|_norm|_embedder|final_layer).*"

# Which Linear layers are LoRA candidates at all, by original (dotted) module name.
DIT_CANDIDATE_PATTERN = re.compile(r"(blocks\.\d+|x_embedder|t_embedder|final_layer)\..+")
ADAPTER_CANDIDATE_PATTERN = re.compile(r"llm_adapter\.blocks\.\d+\..+")
TEXT_ENCODER_CANDIDATE_PATTERN = re.compile(r"layers\.\d+\.(self_attn|mlp)\..+")

# DiT component learning rates: first match wins (adapter blocks also contain "self_attn").
COMPONENTS = ("llm_adapter", "self_attn", "cross_attn", "mlp", "mod")
_COMPONENT_MATCHERS = (
    ("llm_adapter", lambda name: name.startswith("llm_adapter.")),
    ("self_attn", lambda name: ".self_attn." in name),
    ("cross_attn", lambda name: ".cross_attn." in name),
    ("mlp", lambda name: ".mlp." in name),
    ("mod", lambda name: "adaln_modulation" in name),
)

UNET_SIDE = "unet"
TEXT_ENCODER_SIDE = "text_encoder"
_GROUP_PREFIX = {TEXT_ENCODER_SIDE: "textencoder 1", UNET_SIDE: "unet"}


# The network module each adapter kind is trained with (for error messages about files of another kind).
MODULE_FOR_KIND = {LORA_KIND: LORA_MODULE, LOKR_KIND: LOKR_MODULE, LOHA_KIND: LOHA_MODULE}

# --------------------------------------------------------------------------------------------------
# --network_args
# --------------------------------------------------------------------------------------------------


@dataclass
class NetworkOptions:
    """Parsed ``--network_args`` common to every network module (module-specific ones go to ``extras``)."""

    train_llm_adapter: bool = False
    exclude_patterns: list[str] = field(default_factory=list)
    include_patterns: list[str] = field(default_factory=list)
    reg_dims: dict[str, int] = field(default_factory=dict)  # regex -> rank, insertion order = priority
    reg_lrs: dict[str, float] = field(default_factory=dict)  # regex -> lr
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    verbose: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


def parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text == "true"
    raise AnimaError(f"--network_args {key}={value!r}: expected true or false")


# Options parsed here that are command-line flags of their own, not `--network_args` entries.
_OWN_FLAGS = ("network_dropout",)


def _as_given(key: str, value: Any) -> str:
    """The option as the user wrote it, for messages: `--network_dropout 1.5` or `--network_args key='v'`."""
    return f"--{key} {value}" if key in _OWN_FLAGS else f"--network_args {key}={value!r}"


def _parse_fraction(key: str, value: Any) -> float:
    number = _parse_float(key, value)
    if not 0.0 <= number < 1.0:
        raise AnimaError(f"{_as_given(key, value)}: expected a probability in [0, 1)")
    return number


def _parse_float(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AnimaError(f"{_as_given(key, value)}: expected a number") from None
    if not math.isfinite(number):
        raise AnimaError(f"{_as_given(key, value)}: expected a finite number")
    return number


def _parse_ratio(key: str, value: Any) -> float:
    number = _parse_float(key, value)
    if number <= 0:
        raise AnimaError(f"--network_args {key}={value!r}: expected a ratio > 0")
    return number


def _compile_regex(key: str, pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise AnimaError(f"--network_args {key}: invalid regular expression {pattern!r} ({e})") from None
    return pattern


def _parse_patterns(key: str, value: Any) -> list[str]:
    """A Python literal: one quoted regex or a list of them. Parsed with ast.literal_eval, never evaluated."""
    invalid = f'--network_args {key}={value!r}: expected a Python list of quoted regexes, e.g. {key}=[".*mlp.*"]'
    parsed = value
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise AnimaError(invalid) from None
    if isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, (list, tuple)) or not all(isinstance(p, str) for p in parsed):
        raise AnimaError(invalid)
    return [_compile_regex(key, p) for p in parsed]


def _parse_regex_values(key: str, value: Any, convert, what: str) -> dict:
    """``"regex=value,regex=value"`` (regexes cannot contain commas; a regex may contain '=')."""
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        items = []
        for pair in str(value).split(","):
            pair = pair.strip()
            if not pair:
                continue
            if "=" not in pair:
                raise AnimaError(f"--network_args {key}: '{pair}' is not regex={what}, e.g. {key}=\".*mlp.*=8\"")
            pattern, number = pair.rsplit("=", 1)
            items.append((pattern.strip(), number.strip()))
    result = {}
    for pattern, number in items:
        try:
            converted = convert(number)
        except (TypeError, ValueError):
            raise AnimaError(f"--network_args {key}: '{pattern}={number}' needs a {what} after '='") from None
        if converted < 0:
            raise AnimaError(f"--network_args {key}: '{pattern}={number}' must not be negative")
        result[_compile_regex(key, pattern)] = converted
    return result


def parse_int(key: str, value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise AnimaError(f"--network_args {key}={value!r}: expected an integer") from None


OptionParser = Callable[[str, Any], Any]


def no_effect_parser(reason: str) -> OptionParser:
    """A key sd-scripts accepts that cannot act on Anima: accepted with a warning saying why."""

    def parse(key: str, value: Any) -> Any:
        logger.warning("--network_args %s=%s has no effect: %s", key, value, reason)
        return value

    return parse


# sd-scripts' LoKr/LoHa keys for convolution layers; Anima's DiT and Qwen3 have none among their targets.
CONV_ARG_PARSERS: dict[str, OptionParser] = {
    key: no_effect_parser("Anima has no convolution layers to adapt")
    for key in ("conv_dim", "conv_alpha", "use_tucker")
}

COMMON_OPTION_PARSERS: dict[str, OptionParser] = {
    "train_llm_adapter": parse_bool,
    "exclude_patterns": _parse_patterns,
    "include_patterns": _parse_patterns,
    "network_reg_dims": lambda k, v: _parse_regex_values(k, v, int, "integer rank"),
    "network_reg_lrs": lambda k, v: _parse_regex_values(k, v, float, "learning rate"),
    "rank_dropout": _parse_fraction,
    "module_dropout": _parse_fraction,
    "loraplus_lr_ratio": _parse_ratio,
    "loraplus_unet_lr_ratio": _parse_ratio,
    "loraplus_text_encoder_lr_ratio": _parse_ratio,
    "verbose": parse_bool,
}
_OPTION_FIELD = {"network_reg_dims": "reg_dims", "network_reg_lrs": "reg_lrs"}


def parse_network_args(
    network_args: Mapping[str, Any],
    module_name: str = LORA_MODULE,
    extra_parsers: Mapping[str, OptionParser] | None = None,
) -> NetworkOptions:
    """``--network_args`` key/value pairs (strings, or already-typed values) -> NetworkOptions. extra_parsers
    are the keys only ``module_name`` knows; their parsed values go to ``options.extras``."""
    parsers = {**COMMON_OPTION_PARSERS, **(extra_parsers or {})}
    unknown = [k for k in network_args if k not in parsers]
    if unknown:
        raise AnimaError(
            f"unknown --network_args key(s) {', '.join(sorted(unknown))} for {module_name}; "
            f"valid keys: {', '.join(parsers)}"
        )
    options = NetworkOptions()
    for key, value in network_args.items():
        if value is None:
            continue
        parsed = parsers[key](key, value)
        if key in COMMON_OPTION_PARSERS:
            setattr(options, _OPTION_FIELD.get(key, key), parsed)
        else:
            options.extras[key] = parsed
    return options


# --------------------------------------------------------------------------------------------------
# The per-layer adapter
# --------------------------------------------------------------------------------------------------


class AdapterModule(nn.Module):
    """The update of one nn.Linear [out, in]; subclasses define its parameters and ``delta``.

    Shared here: the constructor arguments every kind takes, multiplier, dropouts, ``alpha`` buffer and
    ``scale = alpha / rank``, loading a file's tensors, and the hook. Subclasses set KIND (a key of
    lora_format.ADAPTER_KEYS) and PLUS_NAMES (substrings of the parameter names LoRA+ trains at lr x ratio, as
    sd-scripts picks them), create their parameters in ``init_parameters`` and may set OPTION_PARSERS (the
    ``--network_args`` keys only this kind knows), NEURON_DROPOUT (False: ``--network_dropout`` has no effect)
    and ``module_kwargs`` (the parsed options -> their own constructor arguments)."""

    KIND: ClassVar[str]
    PLUS_NAMES: ClassVar[tuple[str, ...]]
    OPTION_PARSERS: ClassVar[Mapping[str, OptionParser]] = {}
    NEURON_DROPOUT: ClassVar[bool] = True

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
        **own: Any,
    ) -> None:
        """own: the constructor arguments of the subclass (e.g. LoKr's factor), passed to init_parameters."""
        super().__init__()
        self.lora_name = lora_name
        self.original_name = original_name
        self.in_features = in_features
        self.out_features = out_features
        self.lora_dim = int(rank)
        alpha = float(rank) if alpha is None or float(alpha) == 0.0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.scale = 1.0
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_scale())
        self.init_parameters(**own)
        self.refresh_scale()

    def init_parameters(self) -> None:
        """Create this kind's parameters (in_features, out_features, rank and alpha are set); a subclass with
        constructor arguments of its own takes them here as keywords."""
        raise NotImplementedError

    @classmethod
    def module_kwargs(cls, options: NetworkOptions) -> dict[str, Any]:
        """The subclass's own constructor arguments for every module of a new network, from the parsed
        ``--network_args`` (its OPTION_PARSERS values are in ``options.extras``)."""
        return {}

    @property
    def rank(self) -> int:
        return self.lora_dim

    def refresh_scale(self) -> None:
        """Re-derive the forward scale from the ``alpha`` buffer (after it was loaded or edited). Kept as a
        Python float so the forward never syncs with the device."""
        self.scale = float(self.alpha) / self.rank

    def skipped(self) -> bool:
        """module_dropout: skip the whole update for this step. A given p = 0 still draws its CPU number (never
        skipping), as sd-scripts does, so the random stream stays sd-scripts'."""
        if not self.training or self.module_dropout is None:
            return False
        return bool(torch.rand(()).item() < self.module_dropout)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The update for input x [B, ..., in] -> [B, ..., out], in x's dtype, multiplier applied; None when
        skipped."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """ΔW [out, in] in float32, scale applied, multiplier not."""
        raise NotImplementedError

    def delta_factors(self) -> list[torch.Tensor]:
        """The parameters whose product forms ΔW: scaling each by ratio**(1/n) scales ΔW by ratio."""
        raise NotImplementedError

    def folded_alpha_parameter(self) -> torch.Tensor:
        """The factor a file without alpha has its scale folded into (ComfyUI applies such modules at scale 1)."""
        raise NotImplementedError

    def plus_parameters(self) -> list[torch.Tensor]:
        return [p for name, p in self.named_parameters() if any(s in name for s in self.PLUS_NAMES)]

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else kwargs["input"]
        delta = self.delta(x)
        return output if delta is None else output + delta

    def output_rank_dropout(self, delta: torch.Tensor) -> torch.Tensor:
        """rank_dropout for adapters without a rank axis in their forward (LoKr, LoHa; as sd-scripts does): one
        Bernoulli(1-p) draw per output feature, shared by the batch, rescaled to keep the expected update."""
        if not (self.training and self.rank_dropout):
            return delta
        keep = torch.rand(delta.shape[-1], device=delta.device) >= self.rank_dropout
        return delta * (keep.to(delta.dtype) / (1.0 - self.rank_dropout))

    @classmethod
    def kwargs_from_parts(cls, parts: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Constructor arguments (rank, alpha; a subclass adds its own, e.g. LoKr's layout) that rebuild a module
        of a file's shapes. The rank is None for a module whose update is never scaled (LoKr, both factors
        full)."""
        alpha = parts.get("alpha")
        return {"rank": module_rank(cls.KIND, parts), "alpha": None if alpha is None else float(alpha.float())}

    def load_parts(self, parts: Mapping[str, torch.Tensor], source: str) -> None:
        """Copy one module's tensors from a file (sd-scripts suffixes). The file's alpha replaces this module's (an
        alpha of 0 means the rank); without alpha (ComfyUI scale 1) the folded factor is divided by this module's
        scale instead."""
        own = dict(self.named_parameters())
        extra = sorted(set(parts) - set(own) - {"alpha"})
        if extra:
            hint = (
                f"DoRA (dora_wd) files load with --network_module {LYCORIS_MODULE}"
                if "dora_scale" in extra
                else "the file's layer was built with other network_args (decompose_both, full_matrix, factor?)"
            )
            raise AnimaError(f"{source}: '{self.lora_name}' has tensors {', '.join(extra)} this network lacks; {hint}")
        missing = sorted(set(own) - set(parts))
        mismatched = [n for n in own if n in parts and tuple(parts[n].shape) != tuple(own[n].shape)]
        if missing or mismatched:
            file_shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in sorted(parts.items()) if n != "alpha")
            ours = ", ".join(f"{n} {tuple(p.shape)}" for n, p in sorted(own.items()))
            raise AnimaError(
                f"{source}: '{self.lora_name}' has {file_shapes} but the network has {ours} for that layer; set "
                "--network_dim / network_reg_dims (and factor for LoKr) to match or use --dim_from_weights"
            )
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(parts[name])
            if "alpha" in parts:
                alpha = float(parts["alpha"].float())
                # An alpha of 0 in a file means alpha = rank (scale 1), as for a new network and in sd-scripts'
                # network modules, which build the module from the file's alpha with that rule.
                self.alpha.fill_(alpha if alpha != 0.0 else float(self.rank))
                self.refresh_scale()
            elif self.scale != 1.0:
                folded = self.folded_alpha_parameter()
                folded.copy_(folded.float() / self.scale)


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    side: str  # UNET_SIDE or TEXT_ENCODER_SIDE
    original_name: str  # dotted module path inside its model, e.g. "blocks.0.self_attn.q_proj"
    lora_name: str
    module: nn.Linear


SIDE_NAMES = {TEXT_ENCODER_SIDE: "text encoder (Qwen3)", UNET_SIDE: "DiT"}


def side_of(lora_name: str) -> str:
    return UNET_SIDE if lora_name.startswith(UNET_PREFIX + "_") else TEXT_ENCODER_SIDE


def warn_dropped_side_of_weights(count: int, side: str) -> None:
    """--dim_from_weights: the file built modules on a side this run does not train."""
    logger.warning("%d %s LoRA module(s) of the weights are dropped: that side is not trained in this run, so "
                   "the saved LoRA will not hold them", count, SIDE_NAMES[side])


def skip_untrained_sides(names: Sequence[str], untrained_sides: Iterable[str], source: str) -> set[str]:
    """The module names of ``names`` (a file's modules this network lacks) that belong to a side the run does not
    train, each side with one warning: they are skipped, as sd-scripts skips them, not refused."""
    skipped: set[str] = set()
    for side in sorted(untrained_sides):
        of_side = [n for n in names if side_of(n) == side]
        if of_side:
            logger.warning("%s: %d %s LoRA module(s) not loaded: that side is not trained in this run, so the "
                           "saved LoRA will not hold them (%s)", source, len(of_side), SIDE_NAMES[side],
                           sample_keys(of_side))
            skipped.update(of_side)
    return skipped


def _linear_modules(model: nn.Module | None) -> Iterable[tuple[str, nn.Linear]]:
    if model is None:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def text_encoder_root(text_encoders: Any) -> nn.Module | None:
    """The Qwen3 module whose names start at ``layers.``: accepts a list, a Qwen3Model or a
    Qwen3ForCausalLM (its ``.model``)."""
    if isinstance(text_encoders, (list, tuple)):
        encoders = [te for te in text_encoders if te is not None]
        if len(encoders) > 1:
            raise AnimaError(f"Anima has one text encoder (Qwen3), got {len(encoders)}")
        text_encoders = encoders[0] if encoders else None
    if text_encoders is not None and not hasattr(text_encoders, "layers") and hasattr(text_encoders, "model"):
        text_encoders = text_encoders.model
    return text_encoders


def _name_index(side: str, model: nn.Module | None) -> dict[str, list[tuple[str, nn.Linear]]]:
    """lora_name -> every Linear of the model that maps to it (more than one = ambiguous)."""
    prefix = UNET_PREFIX if side == UNET_SIDE else TE_PREFIX
    index: dict[str, list[tuple[str, nn.Linear]]] = {}
    for name, module in _linear_modules(model):
        index.setdefault(lora_name_for(prefix, name), []).append((name, module))
    return index


def side_learning_rates(
    text_encoder_lr: float | Sequence[float] | None, unet_lr: float | None, default_lr: float | None
) -> tuple[float | None, float | None]:
    """(text encoder lr, DiT lr) of ``prepare_optimizer_params``: sd-scripts passes the text encoder's as a list
    (one per encoder; Anima has one), and a side without its own takes the default."""
    if isinstance(text_encoder_lr, (list, tuple)):
        text_encoder_lr = text_encoder_lr[0] if text_encoder_lr else None
    return (default_lr if text_encoder_lr is None else text_encoder_lr, default_lr if unet_lr is None else unet_lr)


def weights_to_load(
    file: str | None, weights_sd: Mapping[str, torch.Tensor] | None
) -> tuple[Mapping[str, torch.Tensor], str]:
    """What ``create_network_from_weights`` builds from: the given state dict, else the file's; and the name
    its messages use for it."""
    if weights_sd is None:
        if file is None:
            raise AnimaError("create_network_from_weights needs a file or a state dict")
        weights_sd, _ = load_lora_file(file)
    return weights_sd, str(file) if file is not None else "state dict"


def most_common(values: Iterable[Any]) -> Any:
    """The most frequent value (the first seen of a tie), None for no values: a file's rank and alpha stand for
    the network this way (ss_network_dim / ss_network_alpha)."""
    counts = Counter(values)
    return counts.most_common(1)[0][0] if counts else None


# --------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------


class AdapterNetwork(nn.Module):
    """All adapter modules of one kind for one training run, plus the sd-scripts network API the trainer
    calls."""

    def __init__(
        self,
        text_encoders: Any,
        unet: nn.Module | None,
        module_class: type[AdapterModule],
        multiplier: float = 1.0,
        network_dim: int | None = DEFAULT_NETWORK_DIM,
        network_alpha: float | None = 1.0,
        dropout: float | None = None,
        options: NetworkOptions | None = None,
        module_kwargs: Mapping[str, Any] | None = None,
        module_shapes: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """module_kwargs: extra constructor arguments of every module (e.g. LoKr's factor). module_shapes:
        lora_name -> constructor arguments (rank, alpha, ...) to build exactly those modules (from a file);
        otherwise modules are selected by the candidate rules and the options."""
        super().__init__()
        self.module_class = module_class
        self.options = options or NetworkOptions()
        self.multiplier = multiplier
        self.network_dim = DEFAULT_NETWORK_DIM if network_dim is None else int(network_dim)
        self.network_alpha = network_alpha
        self.dropout = dropout
        self.save_format = SD_SCRIPTS_FORMAT  # what save_weights writes unless told otherwise
        self.fold_alpha_on_comfy_save = True
        self._frozen_params: set[int] = set()
        self._hooks: dict[str, Any] = {}
        self._targets: dict[str, _Target] = {}
        self.excluded_names: list[str] = []  # candidates removed by the exclude patterns (for verbose)
        self.text_encoder_loras: list[AdapterModule] = []
        self.unet_loras: list[AdapterModule] = []
        self.untrained_sides: set[str] = set()  # sides apply_to left out (their modules in a file are skipped)

        te_root = text_encoder_root(text_encoders)
        self.from_weights = module_shapes is not None  # built from a file's modules (--dim_from_weights)
        if module_shapes is None:
            targets = self._select_targets(te_root, unet)
            common = dict(module_kwargs or {})
            shapes = {
                t.lora_name: {"rank": self._rank_for(t.original_name), "alpha": network_alpha, **common}
                for t in targets
            }
        else:
            targets = self._resolve_targets(te_root, unet, module_shapes)
            shapes = dict(module_shapes)

        for target in targets:
            shape = shapes[target.lora_name]
            if shape["rank"] == 0:
                continue
            lora = module_class(
                target.lora_name,
                target.original_name,
                target.module.in_features,
                target.module.out_features,
                multiplier=multiplier,
                dropout=dropout,
                rank_dropout=self.options.rank_dropout,
                module_dropout=self.options.module_dropout,
                **shape,
            )
            self.add_module(target.lora_name, lora)
            self._targets[target.lora_name] = target
            (self.unet_loras if target.side == UNET_SIDE else self.text_encoder_loras).append(lora)

        if not self.unet_loras and not self.text_encoder_loras:
            raise AnimaError(
                f"no layer was selected for {KIND_NAMES[module_class.KIND]}; check --network_args exclude_patterns / "
                "include_patterns / network_reg_dims (rank 0 skips a layer)"
            )
        logger.info(
            "%s: %d text encoder modules, %d DiT modules",
            KIND_NAMES[module_class.KIND], len(self.text_encoder_loras), len(self.unet_loras),
        )
        if self.options.verbose:
            self.print_module_table()

    # ---- selection -------------------------------------------------------------------------------

    def _is_selected(self, original_name: str) -> bool:
        excludes = [*self.options.exclude_patterns, DEFAULT_EXCLUDE_PATTERN]
        if any(re.fullmatch(p, original_name) for p in self.options.include_patterns):
            return True
        return not any(re.fullmatch(p, original_name) for p in excludes)

    def _rank_for(self, original_name: str) -> int:
        for pattern, rank in self.options.reg_dims.items():
            if re.fullmatch(pattern, original_name):
                return rank
        return self.network_dim

    def _select_targets(self, te_root: nn.Module | None, unet: nn.Module | None) -> list[_Target]:
        targets: list[_Target] = []
        for side, model in ((TEXT_ENCODER_SIDE, te_root), (UNET_SIDE, unet)):
            prefix = TE_PREFIX if side == TEXT_ENCODER_SIDE else UNET_PREFIX
            seen: dict[str, str] = {}
            for name, module in _linear_modules(model):
                if side == TEXT_ENCODER_SIDE:
                    candidate = TEXT_ENCODER_CANDIDATE_PATTERN.fullmatch(name)
                else:
                    candidate = DIT_CANDIDATE_PATTERN.fullmatch(name) or (
                        self.options.train_llm_adapter and ADAPTER_CANDIDATE_PATTERN.fullmatch(name)
                    )
                if not candidate:
                    continue
                if not self._is_selected(name):
                    self.excluded_names.append(name)
                    continue
                lora_name = lora_name_for(prefix, name)
                if lora_name in seen:
                    raise AnimaError(f"modules '{seen[lora_name]}' and '{name}' both map to LoRA name '{lora_name}'")
                seen[lora_name] = name
                targets.append(_Target(side, name, lora_name, module))
        return targets

    def _resolve_targets(
        self, te_root: nn.Module | None, unet: nn.Module | None, module_shapes: Mapping[str, Any]
    ) -> list[_Target]:
        """Map each lora_name of a file onto exactly one Linear of the given models."""
        indexes = {TEXT_ENCODER_SIDE: _name_index(TEXT_ENCODER_SIDE, te_root), UNET_SIDE: _name_index(UNET_SIDE, unet)}
        targets, unresolved = [], []
        for lora_name in module_shapes:
            side = side_of(lora_name)
            matches = indexes[side].get(lora_name, [])
            if len(matches) > 1:
                names = ", ".join(n for n, _ in matches)
                raise AnimaError(f"LoRA module '{lora_name}' matches several layers ({names}); the file is ambiguous")
            if not matches:
                unresolved.append(lora_name)
                continue
            name, module = matches[0]
            targets.append(_Target(side, name, lora_name, module))
        if unresolved:
            te_unresolved = any(not n.startswith(UNET_PREFIX + "_") for n in unresolved)
            hint = (
                " (no text encoder was given, so its LoRA modules cannot be placed)"
                if te_unresolved and not indexes[TEXT_ENCODER_SIDE]
                else ""
            )
            raise AnimaError(
                f"{len(unresolved)} LoRA module(s) match no layer of the model: {sample_keys(unresolved)}{hint}; "
                "the file was made for another model"
            )
        return targets

    def print_module_table(self) -> None:
        """verbose=true: one line per LoRA module, then the excluded candidates."""
        rows = [
            (
                lora.lora_name,
                lora.original_name,
                lora.rank,
                float(lora.alpha),
                lora.in_features,
                lora.out_features,
            )
            for lora in (*self.text_encoder_loras, *self.unet_loras)
        ]
        width = max(len(r[1]) for r in rows)
        print(f"{'module':<{width}}  {'rank':>5}  {'alpha':>7}  {'in':>6}  {'out':>6}")
        for _, original, rank, alpha, fan_in, fan_out in rows:
            print(f"{original:<{width}}  {rank:>5}  {alpha:>7g}  {fan_in:>6}  {fan_out:>6}")
        if self.excluded_names:
            print(f"excluded ({len(self.excluded_names)}): {', '.join(self.excluded_names)}")

    # ---- attaching -------------------------------------------------------------------------------

    def apply_to(
        self,
        text_encoders: Any = None,
        unet: nn.Module | None = None,
        apply_text_encoder: bool = True,
        apply_unet: bool = True,
    ) -> None:
        """Install the hooks; the side that is not applied loses its LoRA modules (not trained, not saved)."""
        if not apply_text_encoder:
            self._drop_side(TEXT_ENCODER_SIDE)
        if not apply_unet:
            self._drop_side(UNET_SIDE)
        for lora in (*self.text_encoder_loras, *self.unet_loras):
            if lora.lora_name not in self._hooks:
                base = self._targets[lora.lora_name].module
                self._hooks[lora.lora_name] = base.register_forward_hook(lora.forward_hook, with_kwargs=True)
        logger.info(
            "%s applied to %d text encoder and %d DiT modules",
            KIND_NAMES[self.module_class.KIND], len(self.text_encoder_loras), len(self.unet_loras),
        )

    def _drop_side(self, side: str) -> None:
        self.untrained_sides.add(side)
        opts = self.options
        side_options = ({"loraplus_text_encoder_lr_ratio": opts.loraplus_text_encoder_lr_ratio}
                        if side == TEXT_ENCODER_SIDE else
                        {"loraplus_unet_lr_ratio": opts.loraplus_unet_lr_ratio,
                         "train_llm_adapter": opts.train_llm_adapter or None})
        for key, value in side_options.items():
            if value is not None:
                logger.warning("--network_args %s has no effect: the %s LoRA is not trained in this run", key,
                               SIDE_NAMES[side])
        loras = self.unet_loras if side == UNET_SIDE else self.text_encoder_loras
        if loras and self.from_weights:
            warn_dropped_side_of_weights(len(loras), side)
        for lora in loras:
            handle = self._hooks.pop(lora.lora_name, None)
            if handle is not None:
                handle.remove()
            delattr(self, lora.lora_name)
            del self._targets[lora.lora_name]
        loras.clear()

    def remove_hooks(self) -> None:
        """Detach from the base model (the base model then computes its plain forward again)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    @property
    def all_loras(self) -> list[AdapterModule]:
        return [*self.text_encoder_loras, *self.unet_loras]

    def module_paths(self) -> dict[str, str]:
        """lora_name -> original dotted module name."""
        return {lora.lora_name: lora.original_name for lora in self.all_loras}

    # ---- trainer hooks ---------------------------------------------------------------------------

    def check_save_format(self, lora_format: str) -> None:
        """Checked before training: every adapter kind here saves in both layouts."""
        check_lora_format(lora_format)

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for lora in self.all_loras:
            lora.multiplier = multiplier

    def is_mergeable(self) -> bool:
        return True

    def enable_gradient_checkpointing(self) -> None:
        """Nothing to do: the LoRA runs inside the base model's (checkpointed) blocks."""

    def prepare_grad_etc(self, text_encoder: Any = None, unet: nn.Module | None = None) -> None:
        """Make LoRA weights trainable, except those frozen by a zero learning rate."""
        for param in self.parameters():
            param.requires_grad_(id(param) not in self._frozen_params)

    def on_epoch_start(self, text_encoder: Any = None, unet: nn.Module | None = None) -> None:
        self.train()

    def get_trainable_params(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def prepare_optimizer_params(
        self,
        text_encoder_lr: float | Sequence[float] | None,
        unet_lr: float | None,
        default_lr: float | None,
        component_lrs: Mapping[str, float | None] | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Optimizer param groups and their descriptions, text encoder first, then DiT.

        Per side, modules go to the first matching bucket: a ``network_reg_lrs`` regex (``reg_lr_<i>``, i its
        position in network_reg_lrs), then (DiT only) a component with a learning rate in component_lrs (keys:
        llm_adapter, self_attn, cross_attn, mlp, mod; first match in that order), else the side's base group.
        Groups come in that order, the reg_lr ones ordered by their first module (as sd-scripts orders them). With LoRA+ each bucket
        splits into the adapter's plain weights (lr) and its LoRA+ weights (" plus", lr x ratio: LoRA's up, LoKr's
        w1, LoHa's w2_a, as sd-scripts picks them). A group whose lr is 0 or None is
        left out and its parameters frozen.
        """
        component_lrs = dict(component_lrs or {})
        unknown = set(component_lrs) - set(COMPONENTS)
        if unknown:
            raise AnimaError(f"unknown component learning rate(s) {sorted(unknown)}; valid: {', '.join(COMPONENTS)}")
        text_encoder_lr, unet_lr = side_learning_rates(text_encoder_lr, unet_lr, default_lr)
        side_lr = {TEXT_ENCODER_SIDE: text_encoder_lr, UNET_SIDE: unet_lr}
        opts = self.options
        side_ratio = {
            TEXT_ENCODER_SIDE: opts.loraplus_text_encoder_lr_ratio or opts.loraplus_lr_ratio,
            UNET_SIDE: opts.loraplus_unet_lr_ratio or opts.loraplus_lr_ratio,
        }
        reg_lrs = list(opts.reg_lrs.items())

        groups: list[dict[str, Any]] = []
        descriptions: list[str] = []
        self._frozen_params = set()
        for side, loras in ((TEXT_ENCODER_SIDE, self.text_encoder_loras), (UNET_SIDE, self.unet_loras)):
            buckets: dict[str, tuple[float | None, list[AdapterModule]]] = {}
            for i, (_, lr) in enumerate(reg_lrs):
                buckets[f"reg_lr_{i}"] = (lr, [])
            if side == UNET_SIDE:
                for component in COMPONENTS:
                    if component_lrs.get(component) is not None:
                        buckets[component] = (component_lrs[component], [])
            buckets[""] = (side_lr[side], [])
            for lora in loras:
                buckets[self._bucket_for(lora.original_name, reg_lrs, buckets)][1].append(lora)
            # sd-scripts' group order: the reg_lr groups in the order their first module comes, then the rest.
            first = {name: loras.index(members[0]) for name, (_, members) in buckets.items() if members}
            reg_names = sorted((n for n in first if n.startswith("reg_lr_")), key=first.__getitem__)
            buckets = {n: buckets[n] for n in (*reg_names, *(n for n in buckets if not n.startswith("reg_lr_")))}

            for name, (lr, members) in buckets.items():
                if not members:
                    continue
                label = _GROUP_PREFIX[side] + (f" {name}" if name else "")
                ratio = side_ratio[side]
                if ratio:
                    plus = {id(p) for m in members for p in m.plus_parameters()}
                    parts = [
                        (label, lr, [p for m in members for p in m.parameters() if id(p) not in plus]),
                        (
                            label + " plus",
                            None if lr is None else lr * ratio,
                            [p for m in members for p in m.parameters() if id(p) in plus],
                        ),
                    ]
                else:
                    parts = [(label, lr, [p for m in members for p in m.parameters()])]
                for description, group_lr, params in parts:
                    if not group_lr:  # 0 or None: not optimised at all
                        self._frozen_params.update(id(p) for p in params)
                        for p in params:
                            p.requires_grad_(False)
                        logger.info("LoRA group '%s' has no learning rate: frozen", description)
                        continue
                    for p in params:
                        p.requires_grad_(True)
                    groups.append({"params": params, "lr": group_lr})
                    descriptions.append(description)
        return groups, descriptions

    # The name the sd-scripts trainer looks for first.
    prepare_optimizer_params_with_multiple_te_lrs = prepare_optimizer_params

    @staticmethod
    def _bucket_for(original_name: str, reg_lrs: list[tuple[str, float]], buckets: Mapping[str, Any]) -> str:
        for i, (pattern, _) in enumerate(reg_lrs):
            if re.fullmatch(pattern, original_name):
                return f"reg_lr_{i}"
        for component, matches in _COMPONENT_MATCHERS:
            if matches(original_name):
                return component if component in buckets else ""
        return ""

    @torch.no_grad()
    def apply_max_norm_regularization(
        self, max_norm_value: float, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scale ΔW by m/n where n = max(|ΔW|_F, m/2) exceeds m, spread evenly over its factors (LoRA: up and
        down each by sqrt(m/n)). Returns (modules scaled, mean, max) of the norms |ΔW|_F after scaling as 0-dim
        tensors on the device: nothing is read back to the host (the trainer logs them with the next step's read).

        Every factor is multiplied, by exactly 1.0 where ΔW is within the limit (n/n), so no value is read to
        decide."""
        ratios, norms = [], []
        for lora in self.all_loras:
            true_norm = lora.delta_weight().to(device if device is not None else lora.alpha.device).norm()
            norm = true_norm.clamp(min=max_norm_value / 2)
            ratio = norm.clamp(max=max_norm_value) / norm  # 0-dim float32
            factors = lora.delta_factors()
            # float64 root rounded to float32: the value (and, for bf16/fp16 factors, the float32 product) a
            # Python-float multiplier gives.
            root = (ratio.double() ** (1.0 / len(factors))).float()
            for factor in factors:
                factor.mul_(root.to(factor.device))
            ratios.append(ratio)
            norms.append(true_norm * ratio)  # |ΔW| after scaling (the clamp only guards the division)
        if not norms:
            zero = torch.zeros(())
            return zero.long(), zero, zero
        ratios_t, norms_t = torch.stack(ratios), torch.stack(norms).double()
        return (ratios_t != 1.0).sum(), norms_t.mean(), norms_t.max()

    # ---- weights I/O -----------------------------------------------------------------------------

    def lora_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """sd-scripts keys, detached CPU copies, cast to dtype if given (alpha too)."""
        sd = {}
        for key, tensor in self.state_dict().items():
            tensor = tensor.detach().clone().to("cpu")
            sd[key] = tensor.to(dtype) if dtype is not None else tensor
        return sd

    def save_weights(
        self,
        file: str,
        dtype: torch.dtype | None = None,
        metadata: Mapping[str, str] | None = None,
        lora_format: str | None = None,
    ) -> None:
        """Atomic save in ``lora_format`` ("sd-scripts" default, or "comfy"; default self.save_format).
        ``.safetensors`` files get metadata + ss_lora_format + sshs hashes; other suffixes a plain torch.save."""
        lora_format = check_lora_format(lora_format or self.save_format)
        sd = self.lora_state_dict()
        # Only LoRA's alpha folds into a factor that diffusers then reads; LoKr/LoHa keep theirs.
        fold_alpha = self.fold_alpha_on_comfy_save and self.module_class.KIND == LORA_KIND
        if lora_format == COMFY_FORMAT:
            sd = convert_to_comfy(sd, module_paths=self.module_paths(), fold_alpha=fold_alpha)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        meta = dict(metadata or {})
        meta.update(format_metadata(lora_format, fold_alpha))
        save_lora_file(file, sd, meta)

    def load_weights(self, file: str) -> list[str]:
        """Load a file in either layout into this network (``--network_weights``).

        Every module in the file must exist here, of the same kind and shapes; the file's alpha replaces the
        module's (and so its scale). A ComfyUI module without alpha (LoRA: alpha folded into lora_B) keeps this
        network's alpha with its folded factor rescaled, so the update is unchanged. Returns the names of
        modules the file lacks (they keep their initial, zero-effect weights)."""
        raw, _ = load_lora_file(file)
        loaded = self.load_lora_state_dict(raw, source=f"--network_weights {file}")
        missing = sorted(set(self.module_paths()) - loaded)
        if missing:
            logger.warning("%s has no weights for %d LoRA module(s): %s", file, len(missing), sample_keys(missing))
        return missing

    def load_lora_state_dict(self, raw: Mapping[str, torch.Tensor], source: str = "state dict") -> set[str]:
        """Copy a state dict (either layout) into the modules; returns the module names it loaded.

        Modules of a side this run does not train (``apply_to`` left it out: ``--network_train_unet_only``,
        cached text-encoder outputs, ``--network_train_text_encoder_only``) are skipped with a warning, as
        sd-scripts skips them; they are then not in the saved LoRA either."""
        modules = group_by_module(to_sd_scripts_format(raw, add_missing_alpha=False))
        by_name = {lora.lora_name: lora for lora in self.all_loras}
        unexpected = [name for name in modules if name not in by_name]
        skipped = skip_untrained_sides(unexpected, self.untrained_sides, source)
        unexpected = [n for n in unexpected if n not in skipped]
        modules = {n: parts for n, parts in modules.items() if n not in skipped}
        if unexpected:
            raise AnimaError(
                f"{source}: {len(unexpected)} module(s) are not part of this network: {sample_keys(unexpected)}; "
                "use --dim_from_weights or the network_args the file was trained with"
            )
        for name, parts in modules.items():
            kind = module_kind(name, parts)
            if kind != self.module_class.KIND:
                raise AnimaError(
                    f"{source}: '{name}' is a {KIND_NAMES[kind]} module but this network trains "
                    f"{KIND_NAMES[self.module_class.KIND]}; use --network_module {MODULE_FOR_KIND[kind]}"
                )
            by_name[name].load_parts(parts, source)
        return set(modules)

    @torch.no_grad()
    def merge_to(
        self,
        text_encoders: Any = None,
        unet: nn.Module | None = None,
        weights_sd: Mapping[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Add ``multiplier * ΔW`` into the base weights (``--base_weights``); hooks are not installed."""
        if weights_sd is not None:
            self.load_lora_state_dict(weights_sd)
        for lora in self.all_loras:
            base = self._targets[lora.lora_name].module
            if base.weight.element_size() == 1:
                raise AnimaError(f"cannot merge '{lora.lora_name}' into a float8 weight (--fp8_base); merge "
                                 "before the weights are stored in float8")
            delta = lora.delta_weight().to(base.weight.device) * lora.multiplier
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        kind = KIND_NAMES[self.module_class.KIND]
        logger.info("merged %d %s modules into the base weights", len(self.all_loras), kind)


# --------------------------------------------------------------------------------------------------
# sd-scripts entry points, for any adapter kind
# --------------------------------------------------------------------------------------------------

# Selection options have no effect when the modules come from a file.
_SELECTION_ARGS = ("train_llm_adapter", "exclude_patterns", "include_patterns", "network_reg_dims")


def valid_network_args(module_class: type[AdapterModule]) -> tuple[str, ...]:
    """Every ``--network_args`` key a network of ``module_class`` adapters accepts."""
    return (*COMMON_OPTION_PARSERS, *module_class.OPTION_PARSERS)


def _parse_module_args(module_class: type[AdapterModule], network_args: Mapping[str, Any]) -> NetworkOptions:
    return parse_network_args(network_args, MODULE_FOR_KIND[module_class.KIND], module_class.OPTION_PARSERS)


def _neuron_dropout(module_class: type[AdapterModule], neuron_dropout: Any) -> float | None:
    """--network_dropout, checked; None (with a warning if it was set) for kinds without rank activations."""
    if not module_class.NEURON_DROPOUT:
        if neuron_dropout:
            logger.warning("--network_dropout has no effect with %s (use rank_dropout / module_dropout)",
                           KIND_NAMES[module_class.KIND])
        return None
    return None if neuron_dropout is None else _parse_fraction("network_dropout", neuron_dropout)


def build_network(
    module_class: type[AdapterModule],
    multiplier: float,
    network_dim: int | None,
    network_alpha: float | None,
    text_encoders: Any,
    unet: nn.Module | None,
    neuron_dropout: float | None,
    network_args: Mapping[str, Any],
) -> AdapterNetwork:
    """``create_network`` of a network module: a new network of ``module_class`` adapters. network_dim None
    is 4 and network_alpha None is 1.0, sd-scripts' defaults (an alpha of 0 means alpha = rank)."""
    options = _parse_module_args(module_class, network_args)
    if network_alpha is None:
        network_alpha = 1.0
    if network_dim is not None and int(network_dim) < 1:
        raise AnimaError(f"--network_dim must be >= 1, got {network_dim}")
    neuron_dropout = _neuron_dropout(module_class, neuron_dropout)
    return AdapterNetwork(
        text_encoders,
        unet,
        module_class,
        multiplier=multiplier,
        network_dim=network_dim,
        network_alpha=network_alpha,
        dropout=neuron_dropout,
        options=options,
        module_kwargs=module_class.module_kwargs(options),
    )


def build_network_from_weights(
    module_class: type[AdapterModule],
    multiplier: float,
    file: str | None,
    text_encoders: Any,
    unet: nn.Module | None,
    weights_sd: Mapping[str, torch.Tensor] | None,
    for_inference: bool,
    network_args: Mapping[str, Any],
) -> tuple[AdapterNetwork, dict[str, torch.Tensor]]:
    """``create_network_from_weights`` of a network module: exactly the modules, shapes and alphas of a file
    (either layout), weights loaded. Returns (network, sd-scripts-keyed state dict). Selection network_args
    are superseded by the file; the others (dropouts, LoRA+, reg_lrs, verbose) still apply, and ``dropout``
    (the trainer's --network_dropout) is the neuron dropout."""
    network_args = dict(network_args)
    neuron_dropout = _neuron_dropout(module_class, network_args.pop("dropout", None))
    options = _parse_module_args(module_class, network_args)
    ignored = [k for k in (*_SELECTION_ARGS, *module_class.OPTION_PARSERS) if network_args.get(k) is not None]
    if ignored:
        logger.warning("network_args %s are ignored: the modules come from the weights file", ", ".join(ignored))
    weights_sd, source = weights_to_load(file, weights_sd)
    sd = to_sd_scripts_format(weights_sd, add_missing_alpha=True)
    module_shapes = {}
    for name, parts in group_by_module(sd).items():
        kind = module_kind(name, parts)
        if kind != module_class.KIND:
            raise AnimaError(
                f"{source} holds {KIND_NAMES[kind]} modules ('{name}'); load it with --network_module "
                f"{MODULE_FOR_KIND[kind]}"
            )
        module_shapes[name] = module_class.kwargs_from_parts(parts)
    network = AdapterNetwork(
        text_encoders,
        unet,
        module_class,
        multiplier=multiplier,
        network_dim=most_common(shape["rank"] for shape in module_shapes.values()),
        network_alpha=most_common(shape["alpha"] for shape in module_shapes.values() if shape["alpha"] is not None),
        dropout=neuron_dropout,
        options=options,
        module_shapes=module_shapes,
    )
    network.load_lora_state_dict(sd, source=source)
    if for_inference:
        network.requires_grad_(False)
        network.eval()
    return network, sd


def network_entry_points(module_class: type[AdapterModule]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The two functions sd-scripts calls on a network module (``create_network``,
    ``create_network_from_weights``, with sd-scripts' signatures) for networks of ``module_class`` adapters."""
    kind = KIND_NAMES[module_class.KIND]

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
        return build_network(module_class, multiplier, network_dim, network_alpha, text_encoders, unet,
                             neuron_dropout, kwargs)

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
        return build_network_from_weights(module_class, multiplier, file, text_encoders, unet, weights_sd,
                                          for_inference, kwargs)

    create_network.__doc__ = (
        f"New {kind} network; kwargs are the ``--network_args`` (strings), see VALID_NETWORK_ARGS."
    )
    create_network_from_weights.__doc__ = (
        f"Network with exactly the modules, shapes and alphas of a {kind} file (either layout), weights loaded.\n\n"
        "Returns (network, sd-scripts-keyed state dict). Selection network_args are superseded by the file; the "
        "others (dropouts, LoRA+, reg_lrs, verbose) still apply."
    )
    return create_network, create_network_from_weights
