"""No flag is accepted silently without effect: each sd-scripts flag that changes nothing for Anima warns once
(one table, args.NO_EFFECT_FLAGS, also behind --help and docs/flags.md); --min_timestep/--max_timestep restrict
the trained sigma range; a bad command line is one `error:` line with a suggestion, never the usage block."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import anima_train_network
from anima_train_network import AnimaNetworkTrainer
from library.errors import AnimaError
from library.training import flow_matching
from library.training.args import EULER_SAMPLERS, NO_EFFECT_FLAGS, parse_args, setup_parser
from library.training.flags_doc import render_flags_markdown
from networks import convert_lora


def non_default_value(action: argparse.Action) -> list[str]:
    """Command-line tokens that give `action` a value other than its default."""
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction):
        return [flag]
    if action.choices is not None:
        return [flag, str(next(c for c in action.choices if c is not None and c != action.default))]
    if action.dest == "sample_sampler":
        return [flag, "ddim"]
    return [flag, {int: "2", float: "0.5"}.get(action.type, "x")]


@pytest.mark.parametrize("name", sorted(NO_EFFECT_FLAGS))
def test_each_no_effect_flag_warns_once_with_its_reason(name):
    action = setup_parser()._option_string_actions[f"--{name}"]
    _, warnings = parse_args(non_default_value(action))
    assert [w for w in warnings if f"--{name} " in w] == [
        f"--{name} has no effect for Anima ({NO_EFFECT_FLAGS[name]}); ignored"]
    assert NO_EFFECT_FLAGS[name] in action.help


def test_flags_the_issue_found_silently_ignored_are_in_the_table_and_the_docs():
    listed = {"highvram", "lowram", "disable_mmap_load_safetensors", "multires_noise_discount", "sample_sampler"}
    assert listed <= set(NO_EFFECT_FLAGS)
    section = render_flags_markdown(setup_parser()).split("## Flags with no effect for Anima", 1)[1]
    assert all(f"- `--{name}`: {NO_EFFECT_FLAGS[name]}" in section for name in NO_EFFECT_FLAGS)


def test_defaults_and_the_euler_sampler_do_not_warn():
    assert parse_args([])[1] == []
    for sampler in EULER_SAMPLERS:
        assert parse_args(["--sample_sampler", sampler])[1] == []


def test_dynamo_backend_without_compile_warns_and_compile_defaults_to_inductor():
    args, warnings = parse_args(["--dynamo_backend", "eager"])
    assert warnings == ["--dynamo_backend eager has no effect without --torch_compile; ignored"]
    args, warnings = parse_args(["--dynamo_backend", "eager", "--torch_compile"])
    assert warnings == [] and args.dynamo_backend == "eager"
    args, _ = parse_args(["--torch_compile"])
    assert args.dynamo_backend == "inductor"


def test_persistent_loader_workers_without_workers_warn_and_a_negative_worker_count_is_an_error():
    _, warnings = parse_args(["--persistent_data_loader_workers", "--max_data_loader_n_workers", "0"])
    assert warnings == ["--persistent_data_loader_workers has no effect with --max_data_loader_n_workers 0 (no "
                        "worker processes); ignored"]
    assert parse_args(["--persistent_data_loader_workers", "--max_data_loader_n_workers", "2"])[1] == []
    with pytest.raises(AnimaError, match="--max_data_loader_n_workers -1 is negative"):
        parse_args(["--max_data_loader_n_workers", "-1"])


# --- --min_timestep / --max_timestep ------------------------------------------------------------------------


def test_timestep_range_maps_sigmas_linearly_into_the_range():
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(flow_matching.restrict_to_timestep_range(sigmas, 200, 600),
                               torch.tensor([0.2, 0.4, 0.6]))
    torch.testing.assert_close(flow_matching.restrict_to_timestep_range(sigmas, None, 500),
                               torch.tensor([0.0, 0.25, 0.5]))
    torch.testing.assert_close(flow_matching.restrict_to_timestep_range(sigmas, 300, None),
                               torch.tensor([0.3, 0.65, 1.0]))
    assert flow_matching.restrict_to_timestep_range(sigmas) is sigmas
    with pytest.raises(AnimaError, match="--min_timestep"):
        flow_matching.restrict_to_timestep_range(sigmas, 700, 100)


@pytest.mark.parametrize(("argv", "message"), [
    (["--min_timestep", "-1"], "--min_timestep -1: must be between 0 and 1000"),
    (["--max_timestep", "1001"], "--max_timestep 1001: must be between 0 and 1000"),
    (["--min_timestep", "800", "--max_timestep", "100"], "--min_timestep 800 must not exceed --max_timestep 100"),
])
def test_bad_timestep_ranges_are_rejected(argv, message):
    with pytest.raises(AnimaError, match=message):
        parse_args(argv)


class RecordingDiT(torch.nn.Module):
    """Stands in for the DiT: records the timesteps it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.timesteps: list[torch.Tensor] = []

    def encode_text(self, *args):
        return torch.zeros(1)

    def forward(self, noisy, timesteps, context):
        self.timesteps.append(timesteps)
        return torch.zeros_like(noisy)


def test_training_step_draws_sigmas_only_inside_the_timestep_range():
    args, _ = parse_args(["--min_timestep", "200", "--max_timestep", "300", "--timestep_sampling", "uniform"])
    trainer = AnimaNetworkTrainer()
    trainer.dit = RecordingDiT()
    trainer.accelerator, trainer.weight_dtype = SimpleNamespace(autocast=nullcontext), torch.float32
    latents = torch.zeros(64, 16, 2, 2)
    text = {"qwen3_embeds": torch.zeros(64, 1, 4), "qwen3_mask": None, "t5_ids": None, "t5_mask": None}
    sigmas = trainer.noise_pred_and_target(args, latents, text).sigmas
    assert 0.2 <= float(sigmas.min()) and float(sigmas.max()) <= 0.3 and float(sigmas.std()) > 0
    torch.testing.assert_close(trainer.dit.timesteps[0], sigmas)


# --- argparse errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [
    (["--learnign_rate", "1e-4"], "unrecognized arguments: --learnign_rate 1e-4 (--learnign_rate: did you mean "
                                  "--learning_rate?); see anima_train_network.py --help"),
    (["--max_train_steps", "many"], "argument --max_train_steps: invalid int value: 'many'; see"),
    (["--mixed_precision", "fp32"], "argument --mixed_precision: invalid choice: 'fp32'"),
    (["--zzzz"], "unrecognized arguments: --zzzz; see anima_train_network.py --help"),
])
def test_argparse_errors_are_one_line_without_the_usage_block(argv, expected, capsys):
    assert anima_train_network.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "usage:" not in captured.err + captured.out


def test_converter_argparse_errors_are_one_line_with_a_suggestion(capsys):
    assert convert_lora.main(["--srcc", "a.safetensors", "--dst", "b.safetensors", "--to", "comfy"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--srcc: did you mean --src?" in lines[0] and lines[0].startswith("error: ")


@pytest.mark.parametrize(("extra", "expected"), [([], torch.bfloat16), (["--no_half_vae"], torch.float32)])
def test_vae_loads_in_the_mixed_precision_dtype_unless_no_half_vae(golden_dir, extra, expected):
    args, _ = parse_args(["--vae", str(golden_dir / "vae_tiny.safetensors"), "--mixed_precision", "bf16", *extra])
    trainer = AnimaNetworkTrainer()
    trainer.args, trainer.weight_dtype = args, torch.bfloat16
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"))
    vae, _identity = trainer.load_vae(args)
    assert {p.dtype for p in vae.parameters()} == {expected}
