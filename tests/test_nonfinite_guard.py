"""The non-finite guard: a NaN/inf step changes nothing and is not counted, K in a row stop the run with a resumable
state of the last good step and one error line; no LoRA file or state with a non-finite value is ever written;
checkpoints with non-finite weights are refused when read."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_helpers import tiny_train_argv

import anima_train_network
from anima_train_network import AnimaNetworkTrainer
from library.errors import AnimaError
from library.io.checkpoints import open_checkpoint
from library.training.args import parse_args
from library.training.state import validate_state_folder
from networks.lora_format import save_lora_file

COMMON = ("--network_args", "train_llm_adapter=false")


def run(args: list[str], trainer_cls=AnimaNetworkTrainer) -> AnimaNetworkTrainer:
    parsed, _ = parse_args(args)
    trainer = trainer_cls()
    trainer.train(parsed)
    return trainer


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]], err
    return err[-1]


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


def test_huge_learning_rate_stops_after_k_steps_with_a_resumable_state_and_no_nan_file(tiny_setup, tmp_path,
                                                                                       capsys):
    out = tmp_path / "out"
    args = tiny_train_argv(tiny_setup, out, *COMMON, "--learning_rate", "1e6", "--max_train_steps", "12",
                           "--save_every_n_steps", "1", "--save_state")
    assert anima_train_network.main(args) == 2
    line = last_error(capsys)
    assert "3 steps in a row had a non-finite loss or gradient" in line and "--resume" in line
    states = sorted(out.glob("*-state"))
    guard_state = Path(line.split("saved in ")[1].split(";")[0])
    assert guard_state in states
    counters = json.loads((guard_state / "train_state.json").read_text())
    assert counters["kind"] == "non-finite guard"
    loras = sorted(out.glob("*.safetensors"))
    assert loras and all(all_finite(p) for p in loras), "a LoRA file with NaN/inf was written"
    assert not (out / "tiny.safetensors").exists()
    # The state holds the last good (finite) weights and passes the resume check.
    validate_state_folder(guard_state, {k: tuple(v.shape) for k, v in
                                        load_file(str(guard_state / "network.safetensors")).items()})


def test_an_update_that_breaks_the_weights_stops_at_once_without_saving_them(tiny_setup, tmp_path, monkeypatch,
                                                                            capsys):
    """Step 1's loss and gradients are finite, but its update writes NaN into the weights (as AdamW does with
    float16 state): the next loss is NaN, and no 'last good' state can be saved, since none is in memory."""
    real_step = torch.optim.AdamW.step

    def nan_writing_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_writing_step)
    out = tmp_path / "out"
    args = tiny_train_argv(tiny_setup, out, *COMMON, "--max_train_steps", "6", "--max_nonfinite_steps", "3",
                           "--save_state")
    assert anima_train_network.main(args) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the update of step 1 turned the LoRA weights NaN or infinite (lora_unet_"), line
    assert err.count("step skipped") == 1  # stopped at the first skipped step, not after three
    assert not list(out.glob("*-state")) and not list(out.glob("*.safetensors"))


def test_full_fp16_with_an_eps_that_is_zero_in_float16_is_refused_before_work_starts(tiny_setup, tmp_path, capsys,
                                                                                    fresh_accelerate_state):
    out = tmp_path / "out"
    args = tiny_train_argv(tiny_setup, out, *COMMON, "--mixed_precision", "fp16", "--full_fp16",
                           "--max_train_steps", "2")
    assert anima_train_network.main([*args, "--optimizer_type", "AdamW"]) == 2
    line = last_error(capsys)
    assert "--full_fp16 with --optimizer_type AdamW" in line and "eps=1e-08 is 0 in float16" in line
    assert not out.exists() or not any(out.iterdir())
    assert anima_train_network.main([*args, "--optimizer_type", "RAdam", "--optimizer_args", "eps=1e-9"]) == 2
    assert "--optimizer_args eps=1e-09 is 0 in float16" in last_error(capsys)
    # An eps that float16 holds, and an optimizer without one, train.
    assert anima_train_network.main([*args, "--optimizer_type", "AdamW", "--optimizer_args", "eps=1e-4"]) == 0
    assert all_finite(out / "tiny.safetensors")
    assert anima_train_network.main([*args, "--optimizer_type", "Lion", "--output_name", "lion"]) == 0
    assert all_finite(out / "lion.safetensors")

class PoisonThreeBatches(AnimaNetworkTrainer):
    """The three batches after step 2 give a NaN loss: with --max_nonfinite_steps 3 the run stops there."""

    def batch_loss(self, args, batch, training):
        loss = super().batch_loss(args, batch, training)
        return loss * float("nan") if training and self.global_step == 2 else loss


def test_the_guard_state_is_the_exact_state_of_the_last_good_step(tiny_setup, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    run(tiny_train_argv(tiny_setup, reference, *COMMON, "--learning_rate", "5e-3", "--max_train_steps", "6"))
    out = tmp_path / "out"
    args = tiny_train_argv(tiny_setup, out, *COMMON, "--learning_rate", "5e-3", "--max_train_steps", "6")
    monkeypatch.setattr(anima_train_network, "AnimaNetworkTrainer", PoisonThreeBatches)
    assert anima_train_network.main(args) == 2
    assert "tiny-step00000002-state" in last_error(capsys)
    monkeypatch.undo()
    run(args + ["--resume", str(out / "tiny-step00000002-state")])
    a, b = load_file(str(reference / "tiny.safetensors")), load_file(str(out / "tiny.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same computation repeated: exact


class PoisonOneBatch(AnimaNetworkTrainer):
    """Makes the loss of the batch after step 2 NaN, and records what that skipped step changed."""

    def train_step(self, args, batch):
        if self.global_step != 2 or hasattr(self, "before"):
            return super().train_step(args, batch)
        self.before = ({k: v.clone() for k, v in self.network.state_dict().items()},
                       copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.lr_scheduler.state_dict()))
        original = self.batch_loss
        self.batch_loss = lambda *a, **k: original(*a, **k) * float("nan")
        try:
            loss = super().train_step(args, batch)
        finally:
            self.batch_loss = original
        self.after = ({k: v.clone() for k, v in self.network.state_dict().items()},
                      copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.lr_scheduler.state_dict()))
        return loss


def _same_optimizer_state(a: dict, b: dict) -> bool:
    for key in a["state"]:
        for name, value in a["state"][key].items():
            other = b["state"][key][name]
            if isinstance(value, torch.Tensor) and not torch.equal(value, other):
                return False
            if not isinstance(value, torch.Tensor) and value != other:
                return False
    return a["state"].keys() == b["state"].keys()


@pytest.mark.parametrize("optimizer", [(), ("--optimizer_type", "Adafactor", "--fused_backward_pass")],
                         ids=["adamw", "adafactor_fused_backward"])
def test_a_non_finite_step_changes_no_weight_optimizer_state_or_schedule_and_is_not_counted(optimizer, tiny_setup,
                                                                                            tmp_path):
    args = tiny_train_argv(tiny_setup, tmp_path, *COMMON, "--learning_rate", "5e-3", "--max_train_steps", "6",
                           "--lr_scheduler", "linear", *optimizer)
    trainer = run(args, PoisonOneBatch)
    weights_before, optimizer_before, lr_step_before = trainer.before
    weights_after, optimizer_after, lr_step_after = trainer.after
    for key in weights_before:
        assert torch.equal(weights_before[key], weights_after[key]), key
    assert _same_optimizer_state(optimizer_before, optimizer_after)
    assert lr_step_before == lr_step_after
    assert trainer.global_step == 6 and trainer.guard.skipped == 1  # the skipped step was not counted
    assert all_finite(tmp_path / "tiny.safetensors")


class InfInDiT(AnimaNetworkTrainer):
    """An inf weight in the loaded DiT (as a diverged merge would leave), past the file check."""

    def load_dit(self, args):
        dit = super().load_dit(args)
        with torch.no_grad():
            next(p for p in dit.parameters() if p.dim() == 2).view(-1)[0] = float("inf")
        return dit


def test_an_inf_weight_in_the_dit_stops_the_run_after_k_steps_with_a_state_at_step_0(tiny_setup, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.setattr(anima_train_network, "AnimaNetworkTrainer", InfInDiT)
    out = tmp_path / "out"
    args = tiny_train_argv(tiny_setup, out, *COMMON, "--learning_rate", "5e-3", "--max_train_steps", "8",
                           "--max_nonfinite_steps", "2")
    assert anima_train_network.main(args) == 2
    line = last_error(capsys)
    assert line.startswith("error: 2 steps in a row") and "tiny-step00000000-state" in line
    assert not list(out.glob("*.safetensors"))
    assert json.loads((out / "tiny-step00000000-state" / "train_state.json").read_text())["global_step"] == 0


def test_an_inf_weight_in_the_dit_file_is_reported_when_it_is_read(tiny_setup, tmp_path, capsys):
    weights = load_file(str(tiny_setup.dit))
    key = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() == 2)
    weights[key].view(-1)[0] = float("inf")
    dit = tmp_path / "inf_dit.safetensors"
    save_file(weights, str(dit))
    out = tmp_path / "out"
    assert anima_train_network.main(tiny_train_argv(tiny_setup, out, *COMMON, "--max_train_steps", "2",
                                                    dit=dit)) == 2
    line = last_error(capsys)
    assert "--pretrained_model_name_or_path" in line and key in line and "NaN or infinite" in line
    assert not list(out.glob("*.safetensors"))


def test_a_nan_lora_is_refused_as_network_weights_before_any_work(tiny_setup, tmp_path, monkeypatch, capsys):
    from library.models.dit_loading import load_anima_model
    from networks.lora_anima import create_network

    network = create_network(1.0, 4, 4, None, [], load_anima_model(tiny_setup.dit, device="meta"))
    state = {k: torch.zeros(v.shape) for k, v in network.state_dict().items()}
    key = next(k for k in state if k.endswith("lora_up.weight"))
    state[key][0, 0] = float("nan")
    path = tmp_path / "nan_lora.safetensors"
    save_file(state, str(path))

    def must_not_run(*_a, **_k):
        raise AssertionError("datasets loaded before the bad --network_weights was reported")

    monkeypatch.setattr(AnimaNetworkTrainer, "build_datasets", must_not_run)
    args = tiny_train_argv(tiny_setup, tmp_path / "out", *COMMON, "--network_weights", str(path))
    assert anima_train_network.main(args) == 2
    line = last_error(capsys)
    assert "--network_weights" in line and "NaN or infinite" in line


def test_saving_a_lora_with_a_nan_value_is_refused_and_writes_nothing(tmp_path):
    path = tmp_path / "lora.safetensors"
    with pytest.raises(AnimaError, match="refusing to write .*lora_up.weight is NaN or infinite"):
        save_lora_file(path, {"a.lora_down.weight": torch.zeros(2, 2),
                              "a.lora_up.weight": torch.tensor([[float("nan"), 0.0], [0.0, 0.0]])})
    assert list(tmp_path.iterdir()) == []


def test_a_finite_checkpoint_that_overflows_the_training_dtype_says_so(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.full((2,), 1e6)}, str(path))
    with open_checkpoint(path, "--vae", "a VAE") as checkpoint:
        with pytest.raises(AnimaError, match="--vae: tensor w .* overflows torch.float16"):
            checkpoint.tensor("w", dtype=torch.float16)
        assert torch.equal(checkpoint.tensor("w"), torch.full((2,), 1e6))


class PoisonOneMicroBatch(AnimaNetworkTrainer):
    """With gradient accumulation: the first micro-batch after step 2 has a NaN loss, the second a finite one."""

    poisoned = False

    def batch_loss(self, args, batch, training):
        loss = super().batch_loss(args, batch, training)
        if training and self.global_step == 2 and not self.poisoned:
            self.poisoned = True
            return loss * float("nan")
        return loss

    def after_step(self, args, epoch):
        super().after_step(args, epoch)
        self.weights_after_last_good_step = {k: v.clone() for k, v in self.network.state_dict().items()}

    def skip_nonfinite_step(self, batch, started):
        self.unchanged = all(torch.equal(v, self.weights_after_last_good_step[k])
                             for k, v in self.network.state_dict().items())
        super().skip_nonfinite_step(batch, started)


def test_a_non_finite_micro_batch_skips_its_whole_accumulated_step(tiny_setup, tmp_path):
    # 5 batches per epoch in steps of 2 + 2 + 1: two epochs hold 6 steps, one is skipped, 4 are asked for.
    args = tiny_train_argv(tiny_setup, tmp_path, *COMMON, "--learning_rate", "5e-3", "--max_train_steps", "4",
                           "--gradient_accumulation_steps", "2")
    trainer = run(args, PoisonOneMicroBatch)
    assert trainer.poisoned and trainer.unchanged and trainer.guard.skipped == 1
    assert trainer.global_step == 4 and all_finite(tmp_path / "tiny.safetensors")


class AlwaysNaN(AnimaNetworkTrainer):
    def batch_loss(self, args, batch, training):
        loss = super().batch_loss(args, batch, training)
        return loss * float("nan") if training else loss


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_the_guard_stop_names_float16_overflow_only_under_fp16(tiny_setup, tmp_path, monkeypatch, capsys, precision,
                                                              fresh_accelerate_state):
    out = tmp_path / precision
    args = tiny_train_argv(tiny_setup, out, *COMMON, "--mixed_precision", precision, "--max_train_steps", "4")
    monkeypatch.setattr(anima_train_network, "AnimaNetworkTrainer", AlwaysNaN)
    assert anima_train_network.main(args) == 2
    line = last_error(capsys)
    assert "3 steps in a row had a non-finite loss or gradient" in line
    assert ("--mixed_precision bf16 or no" in line) == (precision == "fp16")
