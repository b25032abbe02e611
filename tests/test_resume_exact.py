"""Resume continues exactly from any state (periodic, end of run, Ctrl-C), with or without --seed; changed settings
are listed and the ones that break the continuation refused; a finished state or a broken folder is one error line
before datasets or models load."""

from __future__ import annotations

import json
import logging
import shutil
import signal
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from train_helpers import tiny_train_argv

import anima_train_network
import train_network
from anima_train_network import AnimaNetworkTrainer
from bench.bench_host_syncs import with_cpu_loss_scaler
from library.errors import AnimaError
from library.training import schedule
from library.training.args import parse_args
from library.training.schedule import Position

COMMON = ("--network_args", "train_llm_adapter=false", "--learning_rate", "5e-3")


def argv(tiny, out: Path, *extra: str, seed: bool = True) -> list[str]:
    args = tiny_train_argv(tiny, out, *COMMON, *extra)
    if not seed:  # tiny_train_argv fixes --seed 11
        index = args.index("--seed")
        del args[index:index + 2]
    return args


def run(args: list[str], trainer_cls=AnimaNetworkTrainer) -> AnimaNetworkTrainer:
    parsed, _ = parse_args(args)
    trainer = trainer_cls()
    trainer.train(parsed)
    return trainer


def lora(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    # The same computation repeated (same kernels, shapes and order), so equality is exact.
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _must_not_run(*_args, **_kwargs):
    raise AssertionError("datasets or models were loaded before the error")


# --- the schedule arithmetic ------------------------------------------------------------------------------------


def test_schedule_counts_steps_epochs_and_where_a_resumed_run_starts():
    sched = schedule.make_schedule(5, num_processes=1, gradient_accumulation_steps=1, max_train_steps=4,
                                   max_train_epochs=None, save_every_n_epochs=None, save_n_epoch_ratio=None)
    assert (sched.steps_per_epoch, sched.num_epochs, sched.max_train_steps) == (5, 1, 4)
    # The end of a 4-step run stands at batch 4 of epoch 1: resumed to 8 steps it trains batch 5 next.
    longer = schedule.make_schedule(5, num_processes=1, gradient_accumulation_steps=1, max_train_steps=8,
                                    max_train_epochs=None, save_every_n_epochs=None, save_n_epoch_ratio=None)
    assert schedule.resume_start(Position(0, 4, 4), longer) == (0, 4)
    assert schedule.steps_left(Position(0, 4, 4), longer) == 4
    assert schedule.steps_left(Position(0, 4, 4), sched) == 0
    by_epochs = schedule.make_schedule(10, num_processes=2, gradient_accumulation_steps=2, max_train_steps=1,
                                       max_train_epochs=3, save_every_n_epochs=None, save_n_epoch_ratio=3)
    assert (by_epochs.batches_per_epoch, by_epochs.steps_per_epoch, by_epochs.max_train_steps) == (5, 3, 9)
    assert by_epochs.save_every_n_epochs == 1
    # A state written after the last step of an epoch (end-of-epoch work pending) still has steps left.
    assert schedule.steps_left(Position(1, 5, 6), by_epochs) == 3
    assert schedule.position_from_initial_step(4, by_epochs, skip_data=True) == Position(1, 2, 4)
    assert schedule.position_from_initial_step(4, by_epochs, skip_data=False) == Position(1, 0, 4)
    assert schedule.step_save_due(4, 2) and schedule.step_save_due(8, 2) and not schedule.step_save_due(7, 2)
    assert schedule.epoch_validation_due(3, None) and schedule.epoch_validation_due(4, 2)
    assert not schedule.epoch_validation_due(3, 2)


# --- exact continuation -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eight_steps(tiny_setup, tmp_path_factory):
    """The uninterrupted reference: 8 steps over 5 batches per epoch, seed 11."""
    out = tmp_path_factory.mktemp("eight")
    run(argv(tiny_setup, out, "--max_train_steps", "8"))
    return out


def test_end_of_run_state_of_a_part_epoch_resumes_to_the_uninterrupted_run(tiny_setup, eight_steps, tmp_path):
    run(argv(tiny_setup, tmp_path, "--max_train_steps", "4", "--save_state"))
    counters = json.loads((tmp_path / "tiny-state" / "train_state.json").read_text())
    assert (counters["epoch_in_progress"], counters["epoch_step"], counters["global_step"]) == (0, 4, 4)
    assert (counters["current_epoch"], counters["current_step"]) == (1, 4)  # sd-scripts' counters
    assert counters["kind"] == "end of run" and counters["seed"] == 11
    resumed = run(argv(tiny_setup, tmp_path, "--max_train_steps", "8", "--resume", str(tmp_path / "tiny-state")))
    assert resumed.global_step == 8
    assert_bit_identical(lora(eight_steps / "tiny.safetensors"), lora(tmp_path / "tiny.safetensors"))


# The scale doubles after every step without inf/NaN, so it differs step by step.
_GrowingScaleAccelerator = with_cpu_loss_scaler(Accelerator, init_scale=1024.0, growth_interval=1)


def test_fp16_loss_scaler_state_is_saved_and_resumed_exactly(tiny_setup, tmp_path, monkeypatch,
                                                             fresh_accelerate_state):
    """With a loss scaler (CUDA fp16) a state holds its scale and growth counter, and the resumed run goes on
    from them: the same LoRA bits and the same scale as the uninterrupted run."""
    monkeypatch.setattr(train_network, "Accelerator", _GrowingScaleAccelerator)
    fp16 = ("--mixed_precision", "fp16", "--full_fp16", "--optimizer_args", "eps=1e-4")
    whole = run(argv(tiny_setup, tmp_path / "whole", *fp16, "--max_train_steps", "8"))
    first = run(argv(tiny_setup, tmp_path / "parts", *fp16, "--max_train_steps", "4", "--save_state"))
    state = tmp_path / "parts" / "tiny-state"
    saved = torch.load(state / "scaler.pt", weights_only=True)
    assert saved["scale"] == first.accelerator.scaler.get_scale() != _GrowingScaleAccelerator.options["init_scale"]
    resumed = run(argv(tiny_setup, tmp_path / "parts", *fp16, "--max_train_steps", "8", "--resume", str(state)))
    assert resumed.accelerator.scaler.get_scale() == whole.accelerator.scaler.get_scale()
    assert_bit_identical(lora(tmp_path / "whole" / "tiny.safetensors"), lora(tmp_path / "parts" / "tiny.safetensors"))


def test_resume_without_seed_reuses_the_seed_the_state_recorded(tiny_setup, eight_steps, tmp_path):
    first = run(argv(tiny_setup, tmp_path, "--max_train_steps", "3", "--save_every_n_steps", "2", "--save_state",
                     seed=False))
    drawn = first.seed
    state = tmp_path / "tiny-step00000002-state"
    assert json.loads((state / "train_state.json").read_text())["seed"] == drawn
    reference = tmp_path / "reference"
    run(argv(tiny_setup, reference, "--max_train_steps", "8", seed=False) + ["--seed", str(drawn)])
    resumed = run(argv(tiny_setup, tmp_path / "resumed", "--max_train_steps", "8", "--resume", str(state),
                       seed=False))
    assert resumed.seed == drawn and resumed.args.seed is None  # the flag is not rewritten
    assert_bit_identical(lora(reference / "tiny.safetensors"), lora(tmp_path / "resumed" / "tiny.safetensors"))


class InterruptAtStep3(AnimaNetworkTrainer):
    """Sends itself Ctrl-C in the middle of step 3 (as a user would)."""

    def train_step(self, args, batch):
        if self.global_step == 2:
            signal.raise_signal(signal.SIGINT)
        return super().train_step(args, batch)


def test_ctrl_c_finishes_the_step_saves_a_state_and_the_resume_is_exact(tiny_setup, eight_steps, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setattr(anima_train_network, "AnimaNetworkTrainer", InterruptAtStep3)
    assert anima_train_network.main(argv(tiny_setup, tmp_path, "--max_train_steps", "8", "--save_state")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    state = tmp_path / "tiny-step00000003-state"
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]] and err[-1].startswith("error: interrupted") and str(state) in err[-1], err
    assert json.loads((state / "train_state.json").read_text())["kind"] == "interrupted"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = run(argv(tiny_setup, tmp_path, "--max_train_steps", "8", "--resume", str(state)))
    assert resumed.global_step == 8
    assert_bit_identical(lora(eight_steps / "tiny.safetensors"), lora(tmp_path / "tiny.safetensors"))


# --- what a resume refuses --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_state(tiny_setup, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    run(argv(tiny_setup, out, "--max_train_steps", "2", "--save_state"))
    return out / "tiny-state"


def _main_error(args, monkeypatch, capsys, *blocked: str) -> str:
    """Run the CLI; exactly one error line (the last stderr line; warnings may come before it), exit code 2."""
    for name in blocked:
        monkeypatch.setattr(AnimaNetworkTrainer, name, _must_not_run)
    assert anima_train_network.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]], err
    return err[-1]


def test_resuming_a_finished_state_is_one_error_before_datasets_load(tiny_setup, finished_state, tmp_path,
                                                                     monkeypatch, capsys):
    line = _main_error(argv(tiny_setup, tmp_path / "out", "--max_train_steps", "2", "--resume", str(finished_state)),
                       monkeypatch, capsys, "build_datasets", "load_frozen_models")
    assert "already at step 2" in line and "--max_train_steps" in line
    assert not (tmp_path / "out").exists()


def test_resuming_a_state_with_no_epoch_left_is_one_error_before_models_load(tiny_setup, finished_state, tmp_path,
                                                                             monkeypatch, capsys):
    # A state at the start of epoch 2 (after 5 steps of 5 batches) cannot continue a --max_train_epochs 1 run;
    # the step count comes from the image scan, so this is found after it and before any model loads.
    at_epoch_end = tmp_path / "epoch-end-state"
    shutil.copytree(finished_state, at_epoch_end)
    counters = json.loads((at_epoch_end / "train_state.json").read_text())
    counters.update(epoch_in_progress=1, current_epoch=1, epoch_step=0, global_step=5, current_step=5)
    (at_epoch_end / "train_state.json").write_text(json.dumps(counters))
    line = _main_error(argv(tiny_setup, tmp_path / "out", "--max_train_epochs", "1", "--resume", str(at_epoch_end)),
                       monkeypatch, capsys, "load_frozen_models")
    assert "nothing left to train" in line and "epoch 2 of 1" in line


@pytest.mark.parametrize(("change", "flag"), [
    (["--train_batch_size", "2"], "--train_batch_size"),
    (["--network_args", "train_llm_adapter=false", "rank_dropout=0.1"], "--network_args"),
    (["--seed", "12"], "seed"),
    (["--optimizer_type", "Lion"], "optimizer"),
])
def test_a_change_that_breaks_the_continuation_is_refused_naming_it(change, flag, tiny_setup, finished_state,
                                                                    tmp_path, monkeypatch, capsys):
    args = argv(tiny_setup, tmp_path / "out", "--max_train_steps", "4", "--resume", str(finished_state))
    if change[0] == "--seed":
        args[args.index("--seed") + 1] = change[1]
    else:
        args += change
    line = _main_error(args, monkeypatch, capsys, "build_datasets", "load_frozen_models")
    assert flag in line and "--resume" in line


def test_changed_dataset_is_refused_before_models_load_and_accepted_with_resume_allow_changes(
        tiny_setup, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny_setup.image_dir, images)
    toml = tmp_path / "dataset.toml"
    toml.write_text(Path(tiny_setup.dataset_toml).read_text().replace(str(tiny_setup.image_dir), str(images)))
    first = tiny_train_argv(tiny_setup, tmp_path / "first", *COMMON, "--max_train_steps", "2", "--save_state",
                            dataset=toml)
    run(first)
    next(images.glob("*.txt")).write_text("a changed caption")
    args = tiny_train_argv(tiny_setup, tmp_path / "out", *COMMON, "--max_train_steps", "3", "--resume",
                           str(tmp_path / "first" / "tiny-state"), dataset=toml)
    line = _main_error(args, monkeypatch, capsys, "load_frozen_models")
    assert "dataset_fingerprint" in line and "--resume_allow_changes" in line
    monkeypatch.undo()
    trainer = run(args + ["--resume_allow_changes"])
    assert trainer.global_step == 3


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_a_changed_learning_rate_is_listed_and_taken(tiny_setup, finished_state, tmp_path):
    args = argv(tiny_setup, tmp_path, "--max_train_steps", "3", "--resume", str(finished_state))
    args[args.index("--learning_rate") + 1] = "1e-3"
    collect = Collect()
    logging.getLogger("anima_train").addHandler(collect)
    try:
        trainer = run(args)
    finally:
        logging.getLogger("anima_train").removeHandler(collect)
    assert trainer.global_step == 3
    warnings = [m for m in collect.messages if "changed since the state" in m]
    assert any("--learning_rate: 0.005 in the state, 0.001 now" in w for w in warnings), warnings
    assert any("--max_train_steps: 2 in the state, 3 now" in w for w in warnings), warnings


def _broken(folder: Path, tmp_path: Path, case: str) -> Path:
    broken = tmp_path / "broken-state"
    shutil.copytree(folder, broken)
    if case == "missing_scheduler":
        (broken / "scheduler.pt").unlink()
    elif case == "truncated_optimizer":
        data = (broken / "optimizer.pt").read_bytes()
        (broken / "optimizer.pt").write_bytes(data[: len(data) // 2])
    elif case == "pickle_in_rng":
        import pickle

        class Evil:
            def __reduce__(self):
                return (print, ("code ran",))

        (broken / "rng_0.pt").write_bytes(pickle.dumps(Evil()))
    elif case == "other_rank":
        weights = load_file(str(broken / "network.safetensors"))
        from safetensors.torch import save_file

        save_file({k: torch.cat([v, v]) if k.endswith("lora_down.weight") else v for k, v in weights.items()},
                  str(broken / "network.safetensors"))
    elif case == "nan_in_network":
        weights = load_file(str(broken / "network.safetensors"))
        key = next(k for k in weights if k.endswith("lora_up.weight"))
        weights[key][0, 0] = float("nan")
        from safetensors.torch import save_file

        save_file(weights, str(broken / "network.safetensors"))
    return broken


@pytest.mark.parametrize(("case", "expected"), [
    ("missing_scheduler", "missing scheduler.pt"),
    ("truncated_optimizer", "optimizer.pt cannot be read"),
    ("pickle_in_rng", "rng_0.pt cannot be read"),
    ("other_rank", "does not match"),
    ("nan_in_network", "NaN or infinite"),
])
def test_a_broken_state_folder_is_one_error_before_datasets_load(case, expected, tiny_setup, finished_state,
                                                                 tmp_path, monkeypatch, capsys):
    broken = _broken(finished_state, tmp_path, case)
    line = _main_error(argv(tiny_setup, tmp_path / "out", "--max_train_steps", "4", "--resume", str(broken)),
                       monkeypatch, capsys, "build_datasets", "load_frozen_models")
    assert expected in line and str(broken) in line
    assert "code ran" not in capsys.readouterr().out


def test_resume_folder_validation_does_not_depend_on_check_inputs_order():
    with pytest.raises(AnimaError, match="not a folder"):
        from library.training.state import validate_state_folder

        validate_state_folder(Path("/nonexistent-state"), {})


def test_a_state_from_more_visible_gpus_restores_the_generators_of_the_gpus_there_are(monkeypatch):
    """A state saved where 3 GPUs were visible, resumed where 1 is: device 0's generator is restored and the rest
    are left (setting all three would fail on device 1)."""
    from library.training.state import capture_rng, restore_rng

    state = capture_rng()
    state["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in range(3)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda generator_state, device: restored.append(
        (int(generator_state[0]), device)))
    restore_rng(state)
    assert restored == [(0, 0)]
