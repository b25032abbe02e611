"""Optimizer factory (`--optimizer_type`, `--optimizer_args`) and the Adafactor fused backward pass.

Names are case-insensitive. Besides the named optimizers below, any `torch.optim` class name or a dotted
class path (`bitsandbytes.optim.PagedAdamW8bit`, `my_package.module.MyOptimizer`) is accepted; the module
is imported by name, nothing the user types is ever evaluated.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from library.errors import AnimaError

logger = logging.getLogger(__name__)

# Longest accepted `key=value` item: ast.literal_eval on a huge or deeply nested literal can exhaust memory or
# the parser's recursion limit, and no real optimizer setting needs more.
_MAX_ARG_LENGTH = 1000
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def parse_literal_kwargs(items: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """Parse `key=value` items into kwargs; each value must be a Python literal (number, True/False/None,
    quoted string, tuple/list/dict of literals). Split at the first '='.

    Values go through `ast.literal_eval` only: calls, names and attribute access are rejected, never run.
    Bad items raise AnimaError naming `flag` (e.g. "--optimizer_args") and the fix.
    """
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not _IDENTIFIER.fullmatch(key):
            raise AnimaError(
                f"{flag}: {item[:80]!r} is not key=value with a Python identifier as key (e.g. weight_decay=0.01)"
            )
        if len(text) > _MAX_ARG_LENGTH:
            raise AnimaError(f"{flag}: the value of {key!r} is longer than {_MAX_ARG_LENGTH} characters")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise AnimaError(
                f"{flag}: the value of {key!r} ({text[:80]!r}) is not a Python literal; use numbers, True/False/None, "
                f'tuples like (0.9,0.99) or quoted strings like {key}="text"'
            ) from None
    return kwargs


def format_kwargs(kwargs: dict[str, Any]) -> str:
    """`k=v,k=v` (str of each value): the form recorded in the `ss_optimizer` metadata."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    update = sign(β1·m + (1 − β1)·g); p ← p·(1 − lr·wd) − lr·update; m ← β2·m + (1 − β2)·g.
    Typical lr is 3–10× smaller than AdamW's, weight decay 3–10× larger. The options are those of lion-pytorch's
    class (which sd-scripts uses): with `decoupled_weight_decay=True` the decay is wd / lr0 (lr0: the `lr` given
    here), so p ← p·(1 − (lr / lr0)·wd): the decay follows the LR schedule but not the LR's size.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False):
        if not lr > 0:
            raise ValueError(f"Lion: lr must be > 0 (got {lr})")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be in [0, 1) (got {betas})")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self.initial_lr = lr
        self.decoupled_weight_decay = bool(decoupled_weight_decay)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            decay = group["weight_decay"] / self.initial_lr if self.decoupled_weight_decay else group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * decay)
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018) with the update of `transformers.optimization.Adafactor`, without host syncs.

    Same options, defaults, state keys (`step`, `RMS`, `exp_avg`, `exp_avg_sq_row/col` or `exp_avg_sq`) and
    numbers as transformers' class, but the parameter scale max(eps2, RMS(p)) stays a device tensor: the
    transformers version compares it with a float on the host (`max(eps, tensor)`), one device-to-host read per
    parameter per step, inside backward with `--fused_backward_pass`. Per parameter p with gradient g, step t:

      relative step size ρ = min(1e-6·t if warmup_init else 1e-2, 1/√t) if relative_step else lr
      α = ρ · (max(eps2, RMS(p)) if scale_parameter else 1)
      β2t = 1 − t^decay_rate;  v ← β2t·v + (1 − β2t)·(g² + eps1)   (factored into row/column means for ≥ 2-D p)
      u = g / √v;  u ← α · u / max(1, RMS(u) / clip_threshold);  with beta1: m ← β1·m + (1 − β1)·u, u = m
      p ← p − α·weight_decay·p − u
    fp16/bf16 parameters are updated in float32 and copied back.
    """

    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False):
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if warmup_init and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        if lr is None and not relative_step:
            raise ValueError("relative_step=False needs an lr")
        defaults = {"lr": lr, "eps": tuple(eps), "clip_threshold": clip_threshold, "decay_rate": decay_rate,
                    "beta1": beta1, "weight_decay": weight_decay, "scale_parameter": scale_parameter,
                    "relative_step": relative_step, "warmup_init": warmup_init}
        super().__init__(params, defaults)

    @staticmethod
    def _rms(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.norm(2) / (tensor.numel() ** 0.5)

    @staticmethod
    def _step_size(group: dict[str, Any], state: dict[str, Any]) -> float | torch.Tensor:
        """α for a parameter whose state has been stepped: a float, or a 0-dim device tensor with scale_parameter."""
        size = group["lr"]
        if group["relative_step"]:
            step = state["step"]
            size = min(1e-6 * step if group["warmup_init"] else 1e-2, 1.0 / math.sqrt(step))
        if group["scale_parameter"]:
            return torch.clamp(state["RMS"], min=group["eps"][1]) * size
        return size

    def group_lr(self, group: dict[str, Any]) -> float | torch.Tensor | None:
        """The step size α of the group's first parameter at its last step (what the LR logs show); None before."""
        state = self.state.get(group["params"][0]) if group["params"] else None
        return self._step_size(group, state) if state else None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_parameter(p, group)
        return loss

    @torch.no_grad()
    def step_parameter(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Update one parameter of `group` from its gradient (the fused backward pass calls this per parameter)."""
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients.")
        if grad.dtype in (torch.float16, torch.bfloat16):
            grad = grad.float()
        state = self.state[p]
        factored = grad.ndim >= 2
        use_first_moment = group["beta1"] is not None
        if not state:
            state["step"] = 0
            if use_first_moment:
                state["exp_avg"] = torch.zeros_like(grad)
            if factored:
                state["exp_avg_sq_row"] = grad.new_zeros(grad.shape[:-1])  # [..., rows]
                state["exp_avg_sq_col"] = grad.new_zeros(grad.shape[:-2] + grad.shape[-1:])  # [..., cols]
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0
        else:  # a loaded state may sit on another device or in another dtype
            for key in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(grad)

        p_fp32 = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p
        state["step"] += 1
        state["RMS"] = self._rms(p_fp32)
        lr = self._step_size(group, state)

        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = grad**2 + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            # v ≈ row ⊗ col / mean(row): rsqrt of each factor, broadcast to the gradient's shape
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            update = torch.mul(r_factor, c_factor).mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            update = exp_avg_sq.rsqrt().mul_(grad)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if use_first_moment:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = exp_avg
        if group["weight_decay"] != 0:
            p_fp32.add_(p_fp32 * (-group["weight_decay"] * lr))
        p_fp32.add_(-update)
        if p_fp32 is not p:
            p.copy_(p_fp32)


def _import_attr(module_name: str, attr: str, pip_name: str, optimizer_type: str) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise AnimaError(
            f"--optimizer_type {optimizer_type} needs the package {pip_name!r}; install it with: pip install {pip_name}"
        ) from None
    return getattr(module, attr)


# display name → (module, class name, pip package, default kwargs added when absent); matched case-insensitively
_PACKAGED_OPTIMIZERS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", {}),
    "SGDNesterov8bit": ("bitsandbytes.optim", "SGD8bit", "bitsandbytes", {"momentum": 0.9}),
    "Lion8bit": ("bitsandbytes.optim", "Lion8bit", "bitsandbytes", {}),
    "PagedAdamW8bit": ("bitsandbytes.optim", "PagedAdamW8bit", "bitsandbytes", {}),
    "PagedLion8bit": ("bitsandbytes.optim", "PagedLion8bit", "bitsandbytes", {}),
    "PagedAdamW": ("bitsandbytes.optim", "PagedAdamW", "bitsandbytes", {}),
    "PagedAdamW32bit": ("bitsandbytes.optim", "PagedAdamW32bit", "bitsandbytes", {}),
    "DAdaptation": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation", {}),
    "DAdaptAdamPreprint": ("dadaptation.experimental", "DAdaptAdamPreprint", "dadaptation", {}),
    "DAdaptAdaGrad": ("dadaptation", "DAdaptAdaGrad", "dadaptation", {}),
    "DAdaptAdam": ("dadaptation", "DAdaptAdam", "dadaptation", {}),
    "DAdaptAdan": ("dadaptation", "DAdaptAdan", "dadaptation", {}),
    "DAdaptAdanIP": ("dadaptation.experimental", "DAdaptAdanIP", "dadaptation", {}),
    "DAdaptLion": ("dadaptation", "DAdaptLion", "dadaptation", {}),
    "DAdaptSGD": ("dadaptation", "DAdaptSGD", "dadaptation", {}),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt", {}),
    "RAdamScheduleFree": ("schedulefree", "RAdamScheduleFree", "schedulefree", {}),
    "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", "schedulefree", {}),
    "SGDScheduleFree": ("schedulefree", "SGDScheduleFree", "schedulefree", {}),
}
_PACKAGED_BY_KEY = {name.lower(): spec for name, spec in _PACKAGED_OPTIMIZERS.items()}
# Settings that the optimizer name itself stands for: passed to the class, never taken from --optimizer_args and,
# as in sd-scripts, not part of the `ss_optimizer` text (which shows momentum=0.9 when it was filled in).
_FIXED_KWARGS: dict[str, dict[str, Any]] = {"sgdnesterov": {"nesterov": True}, "sgdnesterov8bit": {"nesterov": True}}
_BUILTIN_OPTIMIZERS = ("AdamW", "SGDNesterov", "Lion", "Adafactor")
# Optimizers that find their own step size: the lr should be about 1.0.
_ADAPTIVE_LR_PREFIXES = ("dadapt", "prodigy")


def optimizer_type_names() -> list[str]:
    """Every name `--optimizer_type` accepts directly (torch.optim class names and dotted paths also work)."""
    return list(_BUILTIN_OPTIMIZERS) + list(_PACKAGED_OPTIMIZERS)


def _group_lrs(param_groups: list[Any]) -> list[float]:
    return [g["lr"] for g in param_groups if isinstance(g, dict) and g.get("lr") is not None]


def _resolve_torch_or_dotted(optimizer_type: str) -> type:
    """A torch.optim class name (exact case first, then case-insensitive) or a dotted `module.Class` path."""
    if "." in optimizer_type:
        if not _DOTTED_PATH.fullmatch(optimizer_type):
            raise AnimaError(
                f"--optimizer_type {optimizer_type!r} is not a valid dotted class path like package.module.Class"
            )
        module_name, _, class_name = optimizer_type.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise AnimaError(f"--optimizer_type {optimizer_type}: cannot import module {module_name!r} ({e})") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise AnimaError(f"--optimizer_type {optimizer_type}: module {module_name!r} has no {class_name!r}")
    else:
        candidates = {n: getattr(torch.optim, n) for n in dir(torch.optim)}
        candidates = {
            n: c for n, c in candidates.items() if isinstance(c, type) and issubclass(c, torch.optim.Optimizer)
        }
        cls = candidates.get(optimizer_type) or next(
            (c for n, c in candidates.items() if n.lower() == optimizer_type.lower()), None
        )
        if cls is None or cls is torch.optim.Optimizer:
            raise AnimaError(
                f"--optimizer_type {optimizer_type!r} is unknown; use one of {', '.join(optimizer_type_names())}, "
                f"a torch.optim class name ({', '.join(sorted(n for n in candidates if n != 'Optimizer'))}) "
                "or a dotted class path like bitsandbytes.optim.PagedAdamW8bit"
            )
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise AnimaError(f"--optimizer_type {optimizer_type}: {cls!r} is not a torch.optim.Optimizer subclass")
    return cls


def _prepare_adafactor(param_groups: list[Any], lr: float, kwargs: dict[str, Any]) -> float | None:
    """Adafactor defaults: relative_step=True unless given; warmup_init forces it. With relative_step the
    optimizer computes its own step size, so the given LR and per-group LRs are dropped (returns lr=None)."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("Adafactor: warmup_init=True needs relative_step=True; turning relative_step on")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            logger.warning("Adafactor: clip_threshold=1.0 is recommended")
        return lr
    if lr != 0.0:
        logger.warning("Adafactor with relative_step=True: --learning_rate %s is only reported as the initial LR", lr)
    dropped = [g.pop("lr", None) for g in param_groups if isinstance(g, dict)]
    if any(x is not None for x in dropped):
        logger.warning("Adafactor with relative_step=True: per-group LRs (--unet_lr, --text_encoder_lr) are ignored")
    return None


def optimizer_class(optimizer_type: str) -> tuple[type, dict[str, Any]]:
    """The class a resolved --optimizer_type names, and the settings its name adds when --optimizer_args lacks
    them (SGDNesterov: momentum=0.9)."""
    key = optimizer_type.lower()
    if key == "adamw":
        return torch.optim.AdamW, {}
    if key == "sgdnesterov":
        return torch.optim.SGD, {"momentum": 0.9}
    if key == "lion":
        return Lion, {}
    if key == "adafactor":
        return Adafactor, {}
    if key in _PACKAGED_BY_KEY:
        module_name, class_name, pip_name, defaults = _PACKAGED_BY_KEY[key]
        return _import_attr(module_name, class_name, pip_name, optimizer_type), dict(defaults)
    return _resolve_torch_or_dotted(optimizer_type), {}


def check_full_fp16_optimizer(optimizer_type: str, optimizer_args: list[str] | None) -> None:
    """--full_fp16 keeps the LoRA weights in float16, and most optimizers keep their state in the weights' dtype.
    An `eps` below float16's smallest step (6e-8) is 0 there: AdamW's first update of a LoRA down matrix (whose
    gradient is exactly 0 while the up matrix is still 0) is then 0/0 and the weights turn NaN. Refused before
    any work starts; bitsandbytes and Adafactor compute in float32 and are fine."""
    cls, _ = optimizer_class(optimizer_type)
    if cls is Adafactor or cls.__module__.split(".")[0] == "bitsandbytes":
        return
    kwargs = parse_literal_kwargs(optimizer_args, "--optimizer_args")
    if "eps" in kwargs:
        eps, origin = kwargs["eps"], "--optimizer_args eps"
    else:
        try:
            default = inspect.signature(cls.__init__).parameters.get("eps")
        except (TypeError, ValueError):
            return
        eps, origin = (default.default if default is not None else None), f"{cls.__name__}'s default eps"
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0 and torch.tensor(
            float(eps), dtype=torch.float16).item() == 0:
        raise AnimaError(
            f"--full_fp16 with --optimizer_type {optimizer_type}: {origin}={eps:g} is 0 in float16, where the "
            "optimizer keeps its state, so the first update divides 0 by 0 and the LoRA turns NaN; drop "
            "--full_fp16 (fp16 compute, float32 LoRA weights), use --optimizer_type AdamW8bit, or raise eps "
            "(e.g. --optimizer_args eps=1e-4)"
        )


def allow_fp16_gradient_unscaling(scaler: Any) -> None:
    """Let the fp16 loss scaler unscale float16 gradients (--full_fp16: float16 LoRA weights, so float16 grads).

    torch's GradScaler refuses them ("Attempting to unscale FP16 gradients.") at the first clip or optimizer step,
    on CUDA only: accelerate has no scaler on the CPU. Its private ``_unscale_grads_`` takes the switch; the
    scaled gradients are multiplied in place by 1/scale and checked for inf/NaN as float32 ones are."""
    unscale = scaler._unscale_grads_

    def unscale_fp16_too(optimizer: Any, inv_scale: torch.Tensor, found_inf: torch.Tensor, allow_fp16: bool):
        return unscale(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale_fp16_too


def create_optimizer(
    optimizer_type: str,
    param_groups: Iterable[Any],
    lr: float,
    optimizer_args: list[str] | None = None,
    *,
    use_8bit_adam: bool = False,
    use_lion_optimizer: bool = False,
) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer. Returns (name "module.Class", args "k=v,…" for metadata, optimizer).

    optimizer_type [--optimizer_type]: case-insensitive; "" means AdamW. See `optimizer_type_names()`.
    param_groups: parameters or param-group dicts (a group's own "lr" wins over `lr`).
    lr [--learning_rate]: default LR.
    optimizer_args [--optimizer_args]: `key=value` items, values are Python literals.
    use_8bit_adam / use_lion_optimizer [--use_8bit_adam / --use_lion_optimizer]: legacy shortcuts for
      AdamW8bit / Lion; they cannot be combined with each other or with --optimizer_type.
    Adafactor defaults to relative_step=True: the optimizer then ignores lr and the group LRs, and the LR
    scheduler must become `adafactor:<lr>` (see `lr_schedulers.resolve_lr_scheduler_name`).
    """
    optimizer_type = resolve_optimizer_type(optimizer_type, use_8bit_adam, use_lion_optimizer)
    kwargs = parse_literal_kwargs(optimizer_args, "--optimizer_args")
    param_groups = list(param_groups)
    if not param_groups:
        raise AnimaError(
            "the optimizer got no trainable parameters (check --network_train_unet_only / text-encoder flags)"
        )
    key = optimizer_type.lower()
    cls, defaults = optimizer_class(optimizer_type)
    for k, v in defaults.items():
        kwargs.setdefault(k, v)
    if cls is Adafactor:
        lr = _prepare_adafactor(param_groups, lr, kwargs)

    fixed = _FIXED_KWARGS.get(key, {})
    for name in fixed.keys() & kwargs.keys():
        raise AnimaError(f"--optimizer_args {name}: --optimizer_type {optimizer_type} always uses {name}={fixed[name]}; "
                         f"drop {name}=... (or pick another optimizer, e.g. --optimizer_type SGD)")

    if key.startswith(_ADAPTIVE_LR_PREFIXES):
        lrs = _group_lrs(param_groups) or [lr]
        if min(lrs) <= 0.1:
            logger.warning(
                "%s adapts the step size itself: a learning rate around 1.0 is expected (got %s)", cls.__name__, lrs
            )
        if len(set(lrs)) > 1:
            logger.warning("%s with several learning rates: the adaptation may not work as expected", cls.__name__)

    try:
        optimizer = cls(param_groups, lr=lr, **kwargs, **fixed)
    except (TypeError, ValueError) as e:
        given = format_kwargs(kwargs) or "none"
        raise AnimaError(
            f"{cls.__name__} rejected its settings (--learning_rate {lr}, --optimizer_args {given}): {e}"
        ) from None
    return f"{cls.__module__}.{cls.__name__}", format_kwargs(kwargs), optimizer


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer itself: accelerate's AcceleratedOptimizer keeps it as `.optimizer`; others pass through."""
    return getattr(optimizer, "optimizer", optimizer)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """Schedule-free optimizers keep their own LR schedule and need train()/eval() switching around evaluation."""
    return type(optimizer).__name__.lower().endswith("schedulefree")


class ScheduleFreeModes:
    """Schedule-free optimizers hold two weight sets: training steps use one, evaluation, sampling and saving must
    see the averaged one. `eval_mode()` switches for a block (nested blocks switch once); other optimizers pass."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        inner = unwrap_optimizer(optimizer)
        self.inner = inner if is_schedule_free(inner) else None
        self.depth = 0

    def train_mode(self) -> None:
        if self.inner is not None:
            self.inner.train()

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        if self.inner is None:
            yield
            return
        if self.depth == 0:
            self.inner.eval()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.inner.train()


class FusedBackwardHandle:
    """Hooks installed by `install_fused_backward_pass`; `remove()` detaches them."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def resolve_optimizer_type(optimizer_type: str | None, use_8bit_adam: bool = False,
                           use_lion_optimizer: bool = False) -> str:
    """--optimizer_type, or what the legacy --use_8bit_adam / --use_lion_optimizer shortcuts name (they exclude
    each other and --optimizer_type); AdamW by default."""
    if use_8bit_adam or use_lion_optimizer:
        if (use_8bit_adam and use_lion_optimizer) or optimizer_type:
            raise AnimaError(
                "--use_8bit_adam, --use_lion_optimizer and --optimizer_type are exclusive; use only --optimizer_type"
            )
        return "AdamW8bit" if use_8bit_adam else "Lion"
    return optimizer_type or "AdamW"


def check_fused_backward_pass(is_adafactor: bool, gradient_accumulation_steps: int, num_processes: int = 1) -> None:
    """--fused_backward_pass steps each parameter inside backward: our Adafactor only, no gradient accumulation,
    one process (the hook fires before gradients are averaged across processes)."""
    if not is_adafactor:
        raise AnimaError("--fused_backward_pass works only with --optimizer_type Adafactor")
    if gradient_accumulation_steps != 1:
        raise AnimaError("--fused_backward_pass does not work with --gradient_accumulation_steps > 1; set it to 1")
    if num_processes != 1:
        raise AnimaError("--fused_backward_pass works only with a single process; drop it for multi-GPU training")


def install_fused_backward_pass(
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float = 0.0,
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
) -> FusedBackwardHandle:
    """`--fused_backward_pass`: step each parameter as soon as its gradient is ready, then free the gradient.

    Saves the memory of holding every gradient at once. Constraints (AnimaError otherwise):
      - optimizer: our Adafactor only [--optimizer_type Adafactor];
      - gradient_accumulation_steps must be 1 [--gradient_accumulation_steps] (the step happens inside backward);
      - num_processes must be 1: the hook fires before gradients are averaged across processes.
    max_grad_norm [--max_grad_norm]: when ≠ 0 each parameter's gradient is clipped to this norm on its own
    (the global norm is never available here), so it is not the same as the usual global clipping.
    Mixed precision with a loss scaler (fp16) is not supported: the gradients would still be scaled.
    After backward the gradients are already None; the trainer skips its own clip and optimizer.step()
    (calling them is harmless). Returns a handle whose `remove()` uninstalls the hooks.
    """
    inner = unwrap_optimizer(optimizer)
    check_fused_backward_pass(isinstance(inner, Adafactor), gradient_accumulation_steps, num_processes)

    def make_hook(group: dict[str, Any]) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
            inner.step_parameter(param, group)
            param.grad = None

        return hook

    handles = [
        p.register_post_accumulate_grad_hook(make_hook(group))
        for group in inner.param_groups
        for p in group["params"]
        if p.requires_grad
    ]
    return FusedBackwardHandle(handles)
