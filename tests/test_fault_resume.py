"""Kill-and-resume: a CPU run killed with SIGKILL during a state save, in the middle of the run and after the
end-of-run state, and resumed each time, ends with a LoRA bit-identical to an uninterrupted run, with and without
--seed. The kills come from the trainer's fault hook (library.io.files.fault_point, env ANIMA_TEST_KILL_AT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_train_argv

from anima_train_network import AnimaNetworkTrainer
from library.io.files import FAULT_ENV
from library.training.args import parse_args

REPO = Path(__file__).resolve().parent.parent
COMMON = ("--network_args", "train_llm_adapter=false", "--learning_rate", "5e-3", "--save_every_n_steps", "3",
          "--save_state")


def argv(tiny, out: Path, steps: int, *extra: str, seed: int | None) -> list[str]:
    args = tiny_train_argv(tiny, out, *COMMON, "--max_train_steps", str(steps), *extra)
    index = args.index("--seed")
    if seed is None:
        del args[index:index + 2]
    else:
        args[index + 1] = str(seed)
    return args


def killed_run(args: list[str], kill_at: str) -> None:
    """The trainer in its own process (one thread, as the tests run), killed at `kill_at`."""
    env = {**os.environ, FAULT_ENV: kill_at, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "anima_train_network.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, (kill_at, done.returncode, done.stderr[-2000:])


def in_process_run(args: list[str]) -> None:
    parsed, _ = parse_args(args)
    AnimaNetworkTrainer().train(parsed)


def recorded_seed(state: Path) -> int:
    return json.loads((state / "train_state.json").read_text())["seed"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, None], ids=["with_seed", "without_seed"])
def test_killed_three_times_and_resumed_ends_bit_identical_to_the_uninterrupted_run(seed, tiny_setup, tmp_path):
    out = tmp_path / "out"
    # 1. Killed inside the atomic write of the step-6 state: the step-3 state is the newest complete one.
    killed_run(argv(tiny_setup, out, 8, seed=seed), "state_write:6")
    assert (out / "tiny-step00000003-state").is_dir() and not (out / "tiny-step00000006-state").exists()
    drawn = recorded_seed(out / "tiny-step00000003-state")
    if seed is not None:
        assert drawn == seed
    # 2. Resumed, then killed right after step 7 (mid-epoch 2, between saves): the step-6 state is complete.
    killed_run(argv(tiny_setup, out, 8, "--resume", str(out / "tiny-step00000003-state"), seed=seed), "step:7")
    assert (out / "tiny-step00000006-state").is_dir()
    # 3. Resumed, runs to its end; killed after the end-of-run state, before the final LoRA is written.
    killed_run(argv(tiny_setup, out, 8, "--resume", str(out / "tiny-step00000006-state"), seed=seed), "end_state")
    assert (out / "tiny-state").is_dir() and not (out / "tiny.safetensors").exists()
    # 4. The end-of-run state (step 8, batch 3 of epoch 2) continued to 10 steps.
    in_process_run(argv(tiny_setup, out, 10, "--resume", str(out / "tiny-state"), seed=seed))

    reference = tmp_path / "reference"
    in_process_run(argv(tiny_setup, reference, 10, seed=drawn))
    expected, actual = load_file(str(reference / "tiny.safetensors")), load_file(str(out / "tiny.safetensors"))
    assert expected.keys() == actual.keys()
    for key in expected:  # the same computation, interrupted or not: exact equality
        assert torch.equal(expected[key], actual[key]), key
