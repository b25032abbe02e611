"""LR-scheduler factory (`--lr_scheduler`, `--lr_scheduler_type`, `--lr_scheduler_args`, warmup/decay steps).

The schedules themselves are the transformers / diffusers implementations (the usual definitions, so LR curves
match other trainers); this module turns the CLI flags into the right call and checks them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
from typing import Any

import torch

from library.errors import AnimaError
from library.training.optimizers import Adafactor, is_schedule_free, parse_literal_kwargs, unwrap_optimizer

logger = logging.getLogger(__name__)

LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)
# Schedulers with no warmup phase: --lr_warmup_steps must be 0 (as with a custom --lr_scheduler_type).
NO_WARMUP_SCHEDULERS = ("constant", "adafactor")
_DOTTED_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_int_or_float(value: str) -> int | float:
    """argparse type of --lr_warmup_steps / --lr_decay_steps: "123" → 123 steps, "0.1" → ratio 0.1,
    "10%" → ratio 0.1. A value ≥ 1 must be a whole step count; negative values are rejected."""
    text = value.strip()
    try:
        if text.endswith("%"):
            number: int | float = float(text[:-1]) / 100.0
        else:
            number = float(text)
            if number >= 1:
                number = int(text)  # ValueError for "1.5": a ratio must be below 1
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a step count (e.g. 100), a ratio below 1 (e.g. 0.1) nor a percentage (e.g. 10%)"
        ) from None
    if number < 0 or (isinstance(number, float) and number >= 1):
        raise argparse.ArgumentTypeError(f"{value!r} must be a step count >= 0 or a ratio in [0, 1)")
    return number


def steps_from_int_or_float(value: int | float | str | None, num_training_steps: int, flag: str) -> int:
    """Steps from a step count (int) or a ratio of `num_training_steps` (float, floor), as --lr_warmup_steps.

    Strings go through `parse_int_or_float` (values coming from a TOML config may be any of the three).
    """
    if value is None:
        return 0
    if isinstance(value, str):
        try:
            value = parse_int_or_float(value)
        except argparse.ArgumentTypeError as e:
            raise AnimaError(f"{flag}: {e}") from None
    if isinstance(value, bool) or value < 0:
        raise AnimaError(f"{flag} must be a step count >= 0 or a ratio in [0, 1) (got {value!r})")
    if isinstance(value, float):
        if value >= 1:
            raise AnimaError(f"{flag}: a ratio must be below 1 (got {value}); give a whole number for a step count")
        return int(value * num_training_steps)
    return int(value)


class ScheduleFreeScheduler:
    """Stand-in scheduler for schedule-free optimizers: they handle the LR themselves, so step() does nothing;
    it only reports the current LRs for logging."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class AdafactorSchedule:
    """Stand-in scheduler for Adafactor with relative_step: the optimizer computes its own step size, so step()
    changes nothing; get_last_lr() reports each group's step size at its first parameter's last update (the
    initial LR before any update). The values may be 0-dim device tensors: the reporter reads them at log time,
    so reporting costs no host sync per step."""

    def __init__(self, optimizer: torch.optim.Optimizer, initial_lr: float = 0.0):
        self.optimizer = optimizer
        self.initial_lr = initial_lr

    def step(self, *args: Any, **kwargs: Any) -> None:
        pass

    def get_last_lr(self) -> list[float | torch.Tensor]:
        inner = unwrap_optimizer(self.optimizer)
        lrs = [inner.group_lr(group) for group in inner.param_groups]
        return [self.initial_lr if lr is None else lr for lr in lrs]

    def state_dict(self) -> dict[str, Any]:
        return {"initial_lr": self.initial_lr}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # States written with transformers' AdafactorSchedule hold LambdaLR fields instead; nothing in them is
        # needed, the step sizes live in the optimizer state.
        self.initial_lr = state_dict.get("initial_lr", self.initial_lr)


def is_relative_step_adafactor(optimizer: torch.optim.Optimizer) -> bool:
    """Adafactor with relative_step: it computes its own step size, the LR flags only name the initial LR."""
    inner = unwrap_optimizer(optimizer)
    return isinstance(inner, Adafactor) and bool(inner.defaults.get("relative_step"))


def resolve_lr_scheduler_name(lr_scheduler: str, optimizer: torch.optim.Optimizer, learning_rate: float) -> str:
    """The scheduler name to actually use: Adafactor with relative_step computes its own LR, so the schedule
    becomes "adafactor:<learning_rate>" (the LR is only reported). Otherwise `lr_scheduler` unchanged."""
    if is_relative_step_adafactor(optimizer):
        if not lr_scheduler.startswith("adafactor"):
            logger.info(
                "Adafactor with relative_step=True: using the adafactor LR scheduler instead of %s", lr_scheduler
            )
        return f"adafactor:{learning_rate}"
    return lr_scheduler


def check_no_warmup(name: str, num_warmup_steps: int | float | None) -> None:
    """Schedulers without a warmup phase (NO_WARMUP_SCHEDULERS, a custom --lr_scheduler_type) need
    --lr_warmup_steps 0."""
    if num_warmup_steps:
        raise AnimaError(
            f"--lr_warmup_steps must be 0 with the {name} scheduler (got {num_warmup_steps} steps); "
            "set it to 0 or use a scheduler with warmup such as constant_with_warmup"
        )


def _custom_scheduler_class(scheduler_type: str) -> type:
    if not _DOTTED_PATH.fullmatch(scheduler_type):
        raise AnimaError(f"--lr_scheduler_type {scheduler_type!r} is not a class name or dotted class path")
    if "." in scheduler_type:
        module_name, _, class_name = scheduler_type.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise AnimaError(f"--lr_scheduler_type {scheduler_type}: cannot import {module_name!r} ({e})") from None
    else:
        module, class_name = torch.optim.lr_scheduler, scheduler_type
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise AnimaError(
            f"--lr_scheduler_type {scheduler_type}: no scheduler class {class_name!r} in {module.__name__}"
        )
    return cls


def _call(name: str, factory: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return factory(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise AnimaError(f"LR scheduler {name}: bad settings or --lr_scheduler_args ({e})") from None


def create_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    num_warmup_steps: int | float | str | None = 0,
    *,
    num_decay_steps: int | float | str | None = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    timescale: int | None = None,
    min_lr_ratio: float | None = None,
    scheduler_type: str = "",
    scheduler_args: list[str] | None = None,
    check_length: bool = True,
) -> Any:
    """Build the LR scheduler.

    name [--lr_scheduler]: one of LR_SCHEDULERS, or "adafactor:<lr>" (from `resolve_lr_scheduler_name`).
    num_training_steps: scheduler ticks over the run = --max_train_steps (the trainer steps the scheduler once
      per optimizer step, on every process alike).
    num_warmup_steps [--lr_warmup_steps], num_decay_steps [--lr_decay_steps]: step counts or ratios of
      num_training_steps (see `steps_from_int_or_float`). Warmup must be 0 for constant, adafactor and custom.
    num_cycles [--lr_scheduler_num_cycles]: cosine_with_restarts cycles; cosine_with_min_lr and
      warmup_stable_decay get num_cycles / 2 (1 → one half cosine wave).
    power [--lr_scheduler_power]: polynomial power. timescale [--lr_scheduler_timescale]: inverse_sqrt.
    min_lr_ratio [--lr_scheduler_min_lr_ratio]: floor as a fraction of the LR for cosine_with_min_lr
      (required unless min_lr is in scheduler_args) and warmup_stable_decay (default 0).
    scheduler_type [--lr_scheduler_type]: a torch.optim.lr_scheduler class name or dotted class path; built
      with only scheduler_args.  scheduler_args [--lr_scheduler_args]: `key=literal` items passed on.
    check_length: refuse a warmup (or warmup + decay) longer than num_training_steps; off where the run's length
      is not known yet (the input check with --max_train_epochs, before the image scan).
    Schedule-free optimizers get a `ScheduleFreeScheduler` whatever the name (a warning lists the scheduler flags
      given that it leaves unused).
    Schedules (lr0 = the group LR, W warmup, T total, D decay, S = T − W − D stable):
      constant: lr0; constant_with_warmup: lr0·min(1, s/W); linear: warmup then lr0·(T−s)/(T−W);
      cosine: warmup then lr0·½(1 + cos(π·p)), p = (s−W)/(T−W); cosine_with_restarts: same with p taken
      modulo 1/cycles; polynomial: warmup then (lr0 − lr_end)·(1 − p)^power + lr_end (lr_end 1e-7);
      inverse_sqrt: warmup then lr0/√((s + timescale − W)/timescale) (timescale default W or 10⁴);
      cosine_with_min_lr: cosine floored at min_lr_ratio; warmup_stable_decay: linear warmup from
      min_lr_ratio·lr0, S steps at lr0, then a cosine decay to min_lr_ratio·lr0 over D steps (kept after); piecewise_constant: step_rules="1:10,0.1:20,0.01" in
      scheduler_args (multiplier:until_step, …, final multiplier).
    """
    kwargs = parse_literal_kwargs(scheduler_args, "--lr_scheduler_args")
    warmup = steps_from_int_or_float(num_warmup_steps, num_training_steps, "--lr_warmup_steps")
    decay = steps_from_int_or_float(num_decay_steps, num_training_steps, "--lr_decay_steps")

    if is_schedule_free(unwrap_optimizer(optimizer)):
        unused = [flag for flag, given in (("--lr_scheduler", name != "constant"), ("--lr_warmup_steps", warmup),
                                           ("--lr_decay_steps", decay), ("--lr_scheduler_type", scheduler_type),
                                           ("--lr_scheduler_args", scheduler_args)) if given]
        if unused:
            logger.warning("%s: not used with the schedule-free optimizer %s, which keeps its own schedule "
                           "(its warmup: --optimizer_args warmup_steps=N)", ", ".join(unused),
                           type(unwrap_optimizer(optimizer)).__name__)
        return ScheduleFreeScheduler(optimizer)

    if scheduler_type:
        check_no_warmup(scheduler_type, warmup)
        return _call(scheduler_type, _custom_scheduler_class(scheduler_type), optimizer, **kwargs)

    if name.startswith("adafactor"):
        check_no_warmup("adafactor", warmup)
        if not is_relative_step_adafactor(optimizer):
            raise AnimaError(
                "--lr_scheduler adafactor needs --optimizer_type Adafactor with relative_step=True; pick another scheduler"
            )
        _, _, initial_lr = name.partition(":")
        try:
            lr0 = float(initial_lr) if initial_lr else 0.0
        except ValueError:
            raise AnimaError(f"--lr_scheduler {name!r}: expected adafactor or adafactor:<initial lr>") from None
        return AdafactorSchedule(optimizer, lr0)

    if name not in LR_SCHEDULERS:
        raise AnimaError(
            f"--lr_scheduler {name!r} is unknown; use one of {', '.join(LR_SCHEDULERS)} "
            "or --lr_scheduler_type for a custom class"
        )
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1 (got {num_training_steps})")

    import transformers.optimization as tro

    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        if "step_rules" not in kwargs:
            raise AnimaError(
                '--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules="1:10,0.1:20,0.01"'
            )
        return _call(name, get_piecewise_constant_schedule, optimizer, **kwargs)
    if name == "constant":
        check_no_warmup(name, warmup)
        return _call(name, tro.get_constant_schedule, optimizer, **kwargs)
    if name == "constant_with_warmup":
        return _call(name, tro.get_constant_schedule_with_warmup, optimizer, num_warmup_steps=warmup, **kwargs)
    if name == "inverse_sqrt":
        return _call(
            name, tro.get_inverse_sqrt_schedule, optimizer, num_warmup_steps=warmup, timescale=timescale, **kwargs
        )
    if check_length and warmup > num_training_steps:
        raise AnimaError(f"--lr_warmup_steps ({warmup}) is longer than the whole run ({num_training_steps} steps)")
    if name == "cosine_with_restarts":
        return _call(
            name,
            tro.get_cosine_with_hard_restarts_schedule_with_warmup,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=num_training_steps,
            num_cycles=num_cycles,
            **kwargs,
        )
    if name == "polynomial":
        return _call(
            name,
            tro.get_polynomial_decay_schedule_with_warmup,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=num_training_steps,
            power=power,
            **kwargs,
        )
    if name == "cosine_with_min_lr":
        if min_lr_ratio is None and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
            raise AnimaError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio (e.g. 0.1)")
        if min_lr_ratio is not None:
            kwargs.setdefault("min_lr_rate", min_lr_ratio)
        return _call(
            name,
            tro.get_cosine_with_min_lr_schedule_with_warmup,
            optimizer,
            num_warmup_steps=warmup,
            num_training_steps=num_training_steps,
            num_cycles=num_cycles / 2,
            **kwargs,
        )
    if name == "warmup_stable_decay":
        stable = num_training_steps - warmup - decay
        if check_length and stable < 0:
            raise AnimaError(
                f"--lr_warmup_steps ({warmup}) + --lr_decay_steps ({decay}) exceed the run ({num_training_steps} steps)"
            )
        return _call(
            name,
            tro.get_wsd_schedule,
            optimizer,
            num_warmup_steps=warmup,
            num_stable_steps=stable,
            num_decay_steps=decay,
            num_cycles=num_cycles / 2,
            min_lr_ratio=min_lr_ratio or 0.0,
            **kwargs,
        )
    factory = tro.get_linear_schedule_with_warmup if name == "linear" else tro.get_cosine_schedule_with_warmup
    return _call(name, factory, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps, **kwargs)


def lr_scheduler_from_args(args: argparse.Namespace, optimizer: torch.optim.Optimizer, num_steps: int, *,
                           check_length: bool = True) -> Any:
    """The run's LR scheduler from its flags; `num_steps` is the run's optimizer-step count (`check_length`: see
    `create_lr_scheduler`). The one place the scheduler flags are read (the input check and the run build it
    alike)."""
    return create_lr_scheduler(
        resolve_lr_scheduler_name(args.lr_scheduler, optimizer, args.learning_rate), optimizer,
        num_steps, args.lr_warmup_steps, num_decay_steps=args.lr_decay_steps,
        num_cycles=args.lr_scheduler_num_cycles, power=args.lr_scheduler_power,
        timescale=args.lr_scheduler_timescale, min_lr_ratio=args.lr_scheduler_min_lr_ratio,
        scheduler_type=args.lr_scheduler_type, scheduler_args=args.lr_scheduler_args, check_length=check_length)
