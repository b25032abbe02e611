"""Against sd-scripts' own parser: every flag of its Anima trainer is accepted here, and each is honoured, refused
with advice, or warned as having no effect; none is accepted and silently ignored.

`tests/data/sd_scripts_anima_flags.txt` lists the flags of sd-scripts' `anima_train_network.py` parser. Whether a
flag is honoured is checked at run time: two tiny training runs (a dataset TOML run with saving, pruning, states,
sampling and base weights; a command-line dataset run with bucket and caption flags) record every attribute of
the parsed arguments that the trainer reads after argparse is done. A flag that is never read must be in the
table of refused flags (`UNSUPPORTED_FLAGS`) or of no-effect flags (`NO_EFFECT_FLAGS`, warned about).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
from train_helpers import tiny_train_argv

import anima_train_network
from library.training.args import NO_EFFECT_FLAGS, UNSUPPORTED_FLAGS, setup_parser

UPSTREAM_FLAGS = [line.strip() for line in (Path(__file__).parent / "data" / "sd_scripts_anima_flags.txt")
                  .read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
# Flags of the parser itself, not of training.
NOT_TRAINING_FLAGS = {"help"}


class RecordingNamespace(argparse.Namespace):
    """A Namespace that remembers every attribute read outside argparse."""

    reads: set[str] = set()
    paused = 0

    def __getattribute__(self, name: str):
        if not name.startswith("_") and not RecordingNamespace.paused:
            RecordingNamespace.reads.add(name)
        return super().__getattribute__(name)


@pytest.fixture()
def recorded_reads(monkeypatch) -> set[str]:
    """Parsers hand out RecordingNamespace objects; argparse's own reads (defaults, checks) are not counted."""
    real_parse = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        RecordingNamespace.paused += 1
        try:
            return real_parse(self, args, RecordingNamespace() if namespace is None else namespace)
        finally:
            RecordingNamespace.paused -= 1

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    RecordingNamespace.reads = set()
    return RecordingNamespace.reads


def test_every_upstream_flag_is_accepted() -> None:
    ours = {o[2:] for action in setup_parser()._actions for o in action.option_strings if o.startswith("--")}
    missing = [name for name in UPSTREAM_FLAGS if name not in ours]
    assert not missing, f"sd-scripts flags unknown here: {missing}"


def test_flag_tables_name_only_real_flags() -> None:
    ours = {o[2:] for action in setup_parser()._actions for o in action.option_strings if o.startswith("--")}
    assert not (set(NO_EFFECT_FLAGS) | set(UNSUPPORTED_FLAGS)) - ours


@pytest.mark.slow
def test_every_upstream_flag_is_read_refused_or_warned(tiny_setup, tmp_path, recorded_reads) -> None:
    tiny = tiny_setup
    base = tmp_path / "base"
    assert anima_train_network.main(tiny_train_argv(tiny, base, "--max_train_steps", "1")) == 0
    # Run 1: dataset TOML, periodic saves with pruning and states, sampling, base weights, checkpointing.
    toml_run = tiny_train_argv(
        tiny, tmp_path / "toml_run", "--max_train_epochs", "2", "--gradient_checkpointing",
        "--save_every_n_steps", "3", "--save_last_n_steps", "3", "--save_state", "--save_last_n_steps_state", "3",
        "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--save_last_n_epochs_state", "1",
        "--save_state_on_train_end", "--sample_prompts", str(tiny.sample_prompts), "--sample_every_n_steps", "6",
        "--base_weights", str(base / "tiny.safetensors"), "--base_weights_multiplier", "0.5",
        "--console_log_level", "INFO", "--initial_step", "1", "--skip_until_initial_step", "--sdpa")
    assert anima_train_network.main(toml_run) == 0
    # Run 2: the command-line dataset with bucket and caption flags (read only without a dataset TOML).
    train_dir = tmp_path / "train"
    shutil.copytree(tiny.image_dir, train_dir / "1_tiny")
    cli_run = tiny_train_argv(tiny, tmp_path / "cli_run", "--max_train_steps", "1", cache_text=False)
    at = cli_run.index("--dataset_config")
    del cli_run[at: at + 2]
    cli_run += ["--train_data_dir", str(train_dir), "--resolution", "64", "--enable_bucket", "--min_bucket_reso",
                "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16", "--caption_extension", ".txt",
                "--shuffle_caption", "--keep_tokens", "1"]
    assert anima_train_network.main(cli_run) == 0

    accounted = recorded_reads | set(UNSUPPORTED_FLAGS) | set(NO_EFFECT_FLAGS) | NOT_TRAINING_FLAGS
    ignored = [name for name in UPSTREAM_FLAGS if name not in accounted]
    assert not ignored, f"accepted but never read, refused or warned about: {ignored}"
