"""--dry_run checks everything that needs no weights, prints the plan and exits 0, or one error line and exit 2;
nothing is loaded or written either way. A real run makes the same checks before any model load or cache write."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_train_argv

import anima_train_network
from anima_train_network import AnimaNetworkTrainer
from library.training import preflight

COMMON = ("--network_args", "train_llm_adapter=false", "--cache_latents_to_disk")


@pytest.fixture
def no_weights_read(monkeypatch):
    def must_not_run(*_a, **_k):
        raise AssertionError("a model was loaded or a cache written")

    for name in ("load_frozen_models", "load_dit", "write_caches_only"):
        monkeypatch.setattr(AnimaNetworkTrainer, name, must_not_run)


@pytest.fixture
def dataset(tiny_setup, tmp_path) -> Path:
    """A private copy of the tiny images (so that 'no cache file written' is checked on a clean folder)."""
    images = tmp_path / "images"
    shutil.copytree(tiny_setup.image_dir, images)
    toml = tmp_path / "dataset.toml"
    toml.write_text(Path(tiny_setup.dataset_toml).read_text().replace(str(tiny_setup.image_dir), str(images)))
    return toml


def npz_files(toml: Path) -> list[Path]:
    return sorted(toml.parent.rglob("*.npz"))


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_setup, dataset, tmp_path, no_weights_read, capsys):
    out = tmp_path / "out"
    args = tiny_train_argv(tiny_setup, out, *COMMON, "--max_train_steps", "12", "--dry_run", dataset=dataset)
    assert anima_train_network.main(args) == 0
    plan = capsys.readouterr().out
    for expected in ("dry run: every check passed", "8 images", "buckets 48x80, 64x64, 80x48",
                     "5 batches per epoch per process", "3 epochs, 12 steps", "latents of 8 images (disk)",
                     "25,600 LoRA parameters", "memory estimate: about", str(out / "tiny.safetensors")):
        assert expected in plan, (expected, plan)
    assert not out.exists() and not npz_files(dataset)


@pytest.mark.parametrize(("extra", "expected"), [
    (["--optimizer_type", "NoSuchOptimizer"], "NoSuchOptimizer"),
    (["--lr_scheduler", "cosine_typo"], "--lr_scheduler"),
    (["--optimizer_args", "no_such_arg=1"], "AdamW rejected its settings"),
    (["--optimizer_args", "betas=oops"], "--optimizer_args"),
    (["--learning_rate", "nan"], "--learning_rate must be a finite number >= 0"),
    (["--learning_rate=-1e-4"], "--learning_rate must be a finite number >= 0"),
    (["--unet_lr", "inf"], "--unet_lr must be a finite number >= 0"),
    (["--max_nonfinite_steps", "-1"], "--max_nonfinite_steps"),
])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry_run", "real_run"])
def test_bad_optimizer_scheduler_and_learning_rate_fail_before_any_model_or_cache(
        extra, expected, dry_run, tiny_setup, dataset, tmp_path, no_weights_read, capsys):
    out = tmp_path / "out"
    args = tiny_train_argv(tiny_setup, out, *COMMON, *extra, *(["--dry_run"] if dry_run else []), dataset=dataset)
    assert anima_train_network.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]] and expected in err[-1], err
    assert not out.exists() and not npz_files(dataset)


def test_warmup_is_checked_against_the_epoch_count_not_max_train_steps(tiny_setup, dataset, tmp_path,
                                                                         no_weights_read, capsys):
    # 5 batches per epoch: --max_train_epochs 3 is 15 steps and overrides --max_train_steps 2.
    flags = (*COMMON, "--max_train_steps", "2", "--max_train_epochs", "3", "--lr_scheduler", "cosine", "--dry_run")
    ok = tiny_train_argv(tiny_setup, tmp_path / "ok", *flags, "--lr_warmup_steps", "5", dataset=dataset)
    assert anima_train_network.main(ok) == 0
    assert "3 epochs, 15 steps" in capsys.readouterr().out
    too_long = tiny_train_argv(tiny_setup, tmp_path / "long", *flags, "--lr_warmup_steps", "16", dataset=dataset)
    assert anima_train_network.main(too_long) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: --lr_warmup_steps (16) is longer than the whole run (15 steps)", err


def test_a_read_only_image_folder_with_disk_caches_fails_before_any_model(tiny_setup, dataset, tmp_path,
                                                                          no_weights_read, monkeypatch, capsys):
    images = dataset.parent / "images"
    real_access = os.access
    # Root can write anywhere, so the permission is simulated at the one place the trainer asks.
    monkeypatch.setattr(preflight.os, "access",
                        lambda path, mode: False if Path(path) == images else real_access(path, mode))
    args = tiny_train_argv(tiny_setup, tmp_path / "out", *COMMON, "--dry_run", dataset=dataset)
    assert anima_train_network.main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: cache folder") and str(images) in line and "not writable" in line


def test_dry_run_checks_the_resume_folder(tiny_setup, dataset, tmp_path, no_weights_read, capsys):
    state = tmp_path / "state"
    state.mkdir()
    (state / "train_state.json").write_text('{"current_epoch": 0, "global_step": 1}')
    args = tiny_train_argv(tiny_setup, tmp_path / "out", *COMMON, "--dry_run", "--resume", str(state),
                           dataset=dataset)
    assert anima_train_network.main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --resume {state}: missing network.safetensors")


class ReadsItsParametersAdamW(torch.optim.AdamW):
    """An optimizer that reads parameter values when it is built (meta tensors have none)."""

    def __init__(self, params, **kwargs):
        params = list(params)
        first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
        self.initial_norm = float(first.detach().norm())
        super().__init__(params, **kwargs)


def test_dry_run_builds_an_optimizer_that_reads_its_parameters_on_cpu_copies(tiny_setup, dataset, tmp_path,
                                                                              no_weights_read, capsys):
    args = tiny_train_argv(tiny_setup, tmp_path / "out", *COMMON, "--dry_run", "--optimizer_type",
                           "test_dry_run.ReadsItsParametersAdamW", dataset=dataset)
    assert anima_train_network.main(args) == 0
    assert "dry run: every check passed" in capsys.readouterr().out


def test_memory_estimate_is_the_block_swap_planners_peak_plus_a_resident_text_encoder(tiny_setup):
    from types import SimpleNamespace

    from library.models import block_swap
    from library.models.dit_loading import load_anima_model
    from library.training.args import parse_args
    from library.training.memory import estimate_training_memory

    group = SimpleNamespace(datasets=[SimpleNamespace(bucket_sizes=[(64, 64), (128, 64)],
                                                      config=SimpleNamespace(batch_size=2))])

    def estimate(*extra: str):
        args, _ = parse_args(tiny_train_argv(tiny_setup, Path("out"), *extra))
        dit = load_anima_model(tiny_setup.dit, device="meta")
        return args, dit, estimate_training_memory(args, dit, 1000, group, text_encoder_parameters=500)

    args, dit, plain = estimate()
    memory = block_swap.dit_training_memory(dit, batch_size=2, tokens=(128 // 16) * (64 // 16),
                                            context_tokens=args.t5_max_token_length,
                                            adapter_context_tokens=args.qwen3_max_token_length, fp8=False,
                                            trainable_bytes=4000, compute_dtype=torch.float32)
    assert plain.training_peak == memory.peak_bytes(0, "none") and plain.text_encoder == 0  # cached text: freed
    _, _, checkpointed = estimate("--gradient_checkpointing", "--blocks_to_swap", "1")
    assert checkpointed.training_peak == memory.peak_bytes(1, "ckpt") < plain.training_peak
    _, bf16_dit, bf16 = estimate("--mixed_precision", "bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16_dit.parameters()) and bf16.training_peak < plain.training_peak
    _, _, live_text = estimate("--gradient_checkpointing")
    assert live_text.total == live_text.training_peak
    args, _, resident = estimate()
    args.cache_text_encoder_outputs = False
    args.network_train_unet_only = False
    assert estimate_training_memory(args, load_anima_model(tiny_setup.dit, device="meta"), 1000, group,
                                    text_encoder_parameters=500).text_encoder == 500 * 4


def test_dry_run_with_cache_only_plans_the_caches_and_writes_none(tiny_setup, dataset, tmp_path, no_weights_read,
                                                                  capsys):
    args = tiny_train_argv(tiny_setup, tmp_path / "out", *COMMON, "--cache_only", "--dry_run", dataset=dataset)
    assert anima_train_network.main(args) == 0
    plan = capsys.readouterr().out
    assert "latents of 8 images (disk)" in plan and "--cache_only" in plan
    assert not npz_files(dataset)
