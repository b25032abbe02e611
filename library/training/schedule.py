"""The step/epoch schedule of a run as pure arithmetic: steps per epoch, epochs, where a (resumed) run starts,
which batches it skips, and when it saves, samples and validates.

Counting rules (one owner for each):
  * batches are counted per process after sharding; an optimizer step takes `gradient_accumulation_steps`
    batches, the last step of an epoch may take fewer;
  * `Position` is where a run stands: the epoch in progress (0-based), the batches of it already trained and
    the optimizer steps done. A state saved after the last step of an epoch but before that epoch's
    end-of-epoch work holds `batches_done == batches_per_epoch`; a state saved by the end-of-epoch work holds
    the next epoch with 0 batches. Resuming either continues exactly where the run stood;
  * a step skipped by the non-finite guard consumed its batches but is not an optimizer step, so
    `global_step` does not count it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from library.errors import AnimaError


@dataclass(frozen=True)
class Schedule:
    """The derived counts of a run (the command line is never rewritten with them)."""

    batches_per_epoch: int  # per process
    gradient_accumulation_steps: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    save_every_n_epochs: int | None


def make_schedule(num_batches: int, *, num_processes: int, gradient_accumulation_steps: int,
                  max_train_steps: int, max_train_epochs: int | None, save_every_n_epochs: int | None,
                  save_n_epoch_ratio: int | None) -> Schedule:
    """num_batches: batches of the whole dataset per epoch (before sharding over processes).
    max_train_epochs, when given, wins over max_train_steps; save_n_epoch_ratio, when given, sets
    save_every_n_epochs so that about that many epoch saves happen over the run."""
    batches = math.ceil(num_batches / num_processes)
    steps_per_epoch = max(math.ceil(batches / gradient_accumulation_steps), 1)
    steps = max_train_epochs * steps_per_epoch if max_train_epochs is not None else max_train_steps
    num_epochs = math.ceil(steps / steps_per_epoch)
    if save_n_epoch_ratio:
        save_every_n_epochs = max(1, num_epochs // save_n_epoch_ratio)
    return Schedule(batches_per_epoch=batches, gradient_accumulation_steps=gradient_accumulation_steps,
                    steps_per_epoch=steps_per_epoch, max_train_steps=steps, num_epochs=num_epochs,
                    save_every_n_epochs=save_every_n_epochs)


@dataclass(frozen=True)
class Position:
    """Where a run stands (see the module docstring)."""

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0


def schedule_from_args(args: Any, num_batches: int, num_processes: int) -> Schedule:
    """The schedule the flags (--gradient_accumulation_steps, --max_train_steps/--max_train_epochs,
    --save_every_n_epochs/--save_n_epoch_ratio) give for `num_batches` batches per epoch."""
    return make_schedule(num_batches, num_processes=num_processes,
                         gradient_accumulation_steps=args.gradient_accumulation_steps,
                         max_train_steps=args.max_train_steps, max_train_epochs=args.max_train_epochs,
                         save_every_n_epochs=args.save_every_n_epochs, save_n_epoch_ratio=args.save_n_epoch_ratio)


def start_position(resumed: Position | None, schedule: Schedule, *, initial_step: int | None,
                   initial_epoch: int | None, skip_until_initial_step: bool, resume_flag: str | None) -> Position:
    """Where the run starts: the resumed state's position (`resume_flag`: the --resume folder) or the start,
    then --initial_step / --initial_epoch when given (they override a resumed step)."""
    position = resumed or Position()
    if resumed is not None and steps_left(resumed, schedule) <= 0:
        raise AnimaError(f"--resume {resume_flag}: nothing left to train (the state is at step "
                         f"{resumed.global_step} of {schedule.max_train_steps}); raise --max_train_steps or "
                         "--max_train_epochs")
    if not initial_step and not initial_epoch:
        return position
    step = step_named_by_flags(initial_step, initial_epoch, schedule)
    if step >= schedule.max_train_steps:
        raise AnimaError(f"--initial_step {step} must be below --max_train_steps {schedule.max_train_steps}")
    return position_from_initial_step(step, schedule, skip_until_initial_step)


def resume_start(position: Position, schedule: Schedule) -> tuple[int, int]:
    """(first epoch to enter, batches of it to skip) for a run continuing from `position`."""
    return position.epoch, min(position.batches_done, schedule.batches_per_epoch)


def steps_left(position: Position, schedule: Schedule) -> int:
    """Optimizer steps a run continuing from `position` can still make: the fewer of what --max_train_steps
    allows and what the remaining batches of the last epoch hold."""
    by_count = schedule.max_train_steps - position.global_step
    done_in_epoch = math.ceil(min(position.batches_done, schedule.batches_per_epoch)
                              / schedule.gradient_accumulation_steps)
    by_data = (schedule.num_epochs - position.epoch) * schedule.steps_per_epoch - done_in_epoch
    return max(min(by_count, by_data), 0)


def position_from_initial_step(step: int, schedule: Schedule, skip_data: bool) -> Position:
    """`--initial_step` / `--initial_epoch`: count from `step`; only with --skip_until_initial_step is the data
    before it skipped (otherwise the epoch it falls in starts from its first batch)."""
    epoch = step // schedule.steps_per_epoch
    in_epoch_steps = step - epoch * schedule.steps_per_epoch
    batches = in_epoch_steps * schedule.gradient_accumulation_steps if skip_data else 0
    return Position(epoch=epoch, batches_done=batches, global_step=step)


def step_named_by_flags(initial_step: int | None, initial_epoch: int, schedule: Schedule) -> int:
    """The step --initial_step names, else the first step of --initial_epoch (1-based)."""
    if initial_step is not None:
        return initial_step
    return (initial_epoch - 1) * schedule.steps_per_epoch


# --- when things happen ---------------------------------------------------------------------------------------


def every(n: int | None, count: int) -> bool:
    """True every n-th count (never without n)."""
    return bool(n) and count % n == 0


def step_save_due(step: int, save_every_n_steps: int | None) -> bool:
    """A step checkpoint is written every N steps, the last step included (as in sd-scripts: a run of a multiple of
    N steps ends with both `<name>-step<N>` and the final file). Only epoch saves skip the final epoch."""
    return every(save_every_n_steps, step)


def epoch_save_due(epoch: int, save_every_n_epochs: int | None, num_epochs: int) -> bool:
    """epoch is 1-based; the final epoch is covered by the final save."""
    return every(save_every_n_epochs, epoch) and epoch < num_epochs


def step_sampling_due(step: int, sample_every_n_steps: int | None, sample_every_n_epochs: int | None) -> bool:
    """Step sampling applies only when no epoch sampling is set (as in sd-scripts)."""
    return not sample_every_n_epochs and every(sample_every_n_steps, step)


def epoch_validation_due(epoch: int, validate_every_n_epochs: int | None) -> bool:
    """Validation runs after every epoch unless --validate_every_n_epochs says which (as in sd-scripts, also when
    --validate_every_n_steps validates between epochs)."""
    return every(validate_every_n_epochs, epoch) if validate_every_n_epochs else True
