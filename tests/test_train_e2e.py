"""End-to-end training on tiny random models (CPU): loss decreases, save/resume equals an uninterrupted run,
metadata is complete, cached caption dropout uses the empty-caption encoding, 2-process DDP stays in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from train_helpers import tiny_train_argv, trainer_through_caches

from anima_train_network import AnimaNetworkTrainer
from library.io.run_lock import is_run_lock_file
from library.training.args import parse_args

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    return tiny_setup  # the session's shared tiny models and images (see conftest.py)


def base_argv(tiny, out: Path, *extra: str) -> list[str]:
    return tiny_train_argv(tiny, out, *extra)


def run(argv: list[str]) -> AnimaNetworkTrainer:
    args, _ = parse_args(argv)
    trainer = AnimaNetworkTrainer()
    trainer.train(args)
    return trainer


def fixed_seed_loss(trainer: AnimaNetworkTrainer) -> float:
    """Mean loss over the whole tiny set with the same noise and σ every time."""
    torch.manual_seed(1234)
    losses = []
    with torch.no_grad():
        for batch in trainer.train_loader:
            losses.append(trainer.batch_loss(trainer.args, batch, training=False).item())
    return sum(losses) / len(losses)


@pytest.fixture(scope="module")
def two_epoch_run(tiny, tmp_path_factory):
    """2 epochs with an epoch checkpoint + state after epoch 1 (shared by several tests)."""
    out = tmp_path_factory.mktemp("full")
    trainer = run(base_argv(tiny, out, "--max_train_epochs", "2", "--learning_rate", "5e-3",
                            "--save_every_n_epochs", "1", "--save_state", "--network_args", "train_llm_adapter=false"))
    return trainer, out


def test_training_lowers_the_loss_on_a_fixed_set(two_epoch_run):
    trainer, _ = two_epoch_run
    trained = fixed_seed_loss(trainer)
    trainer.network.set_multiplier(0.0)
    untrained = fixed_seed_loss(trainer)
    trainer.network.set_multiplier(1.0)
    assert trained < untrained * 0.98, (trained, untrained)


def test_outputs_are_named_and_carry_metadata(two_epoch_run):
    trainer, out = two_epoch_run
    assert (out / "tiny-000001.safetensors").is_file()
    assert (out / "tiny-000001-state" / "train_state.json").is_file()
    assert (out / "tiny-state").is_dir() and (out / "tiny.safetensors").is_file()
    assert not any(p.name.startswith(".") and not is_run_lock_file(p.name) for p in out.iterdir()), \
        "temporary files left behind"
    with safe_open(str(out / "tiny.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert all(k.startswith("lora_unet_") for k in keys)
    for key, value in {"ss_timestep_sampling": "sigmoid", "ss_weighting_scheme": "uniform", "ss_logit_mean": "0.0",
                       "ss_logit_std": "1.0", "ss_mode_scale": "1.29", "ss_sigmoid_scale": "1.0",
                       "ss_discrete_flow_shift": "1.0", "ss_network_dim": "4", "ss_network_alpha": "4.0",
                       "ss_network_module": "networks.lora_anima", "ss_base_model_version": "anima",
                       "ss_steps": str(trainer.global_step), "ss_epoch": "2", "ss_seed": "11",
                       "modelspec.architecture": "anima-preview/lora", "modelspec.title": "tiny"}.items():
        assert meta.get(key) == value, key
    assert "ss_network_args" in meta and '"dropout"' in meta["ss_network_args"]
    assert meta["ss_multires_noise_discount"] == "0.3"  # unset: the flag's documented default, not "None"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["ss_new_sd_model_hash"]) == 64
    with safe_open(str(out / "tiny-000001.safetensors"), "pt") as f:
        assert f.metadata()["ss_epoch"] == "1"


def test_resume_from_state_matches_the_uninterrupted_run(tiny, two_epoch_run, tmp_path):
    trainer, out = two_epoch_run
    resumed = run(base_argv(tiny, tmp_path, "--max_train_epochs", "2", "--learning_rate", "5e-3",
                            "--network_args", "train_llm_adapter=false", "--resume", str(out / "tiny-000001-state")))
    assert resumed.global_step == trainer.global_step
    full = load_file(str(out / "tiny.safetensors"))
    again = load_file(str(tmp_path / "tiny.safetensors"))
    assert full.keys() == again.keys()
    for key in full:
        torch.testing.assert_close(again[key], full[key], rtol=0, atol=1e-6, msg=key)
    # And the resumed run really continued: its weights differ from the epoch-1 checkpoint.
    epoch1 = load_file(str(out / "tiny-000001.safetensors"))
    assert any(not torch.equal(epoch1[k], again[k]) for k in again if k.endswith("lora_up.weight"))


def test_cached_caption_dropout_feeds_the_empty_caption_encoding(tiny, tmp_path):
    config = tmp_path / "dropout.toml"
    config.write_text(tiny.dataset_toml.read_text().replace("num_repeats = 1", "num_repeats = 1\ncaption_dropout_rate = 1.0"))
    trainer = trainer_through_caches(tiny_train_argv(tiny, tmp_path, "--max_train_steps", "1", dataset=config))
    args = trainer.args
    empty = trainer.load_text_encoding(args).encode([""])
    batch = trainer.train_group[0]
    text = trainer.batch_text(batch, train_text_encoder=False)
    for key, value in empty.items():
        assert torch.equal(text[key], value.expand_as(text[key]).to(text[key].dtype)), key


DDP_WORKER = """
import json, os, sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {repo!r})
from anima_train_network import AnimaNetworkTrainer
from library.io.run_lock import is_run_lock_file
from library.training.args import parse_args

def prepare_and_record(self, args):
    # What the trainer handed to DDP, read while the process group is alive (end_training destroys it).
    prepared = AnimaNetworkTrainer.prepare_for_real(self, args)
    model = prepared[0]
    group = torch.distributed.distributed_c10d._get_default_group()
    info = {{"wrapper": type(model).__name__, "inner": type(model.module).__name__,
            "owns_network": model.module.network is self.network,
            "gradient_as_bucket_view": model.gradient_as_bucket_view, "static_graph": model.static_graph,
            "find_unused_parameters": model.find_unused_parameters,
            "timeout_s": group._get_backend(torch.device("cpu")).options._timeout.total_seconds()}}
    os.makedirs(args.output_dir, exist_ok=True)
    with open(f"{{args.output_dir}}/ddp{{self.accelerator.process_index}}.json", "w") as f:
        json.dump(info, f)
    return prepared


no_sync_entries = []
ddp_no_sync = torch.nn.parallel.DistributedDataParallel.no_sync


def counting_no_sync(self):
    no_sync_entries.append(1)
    return ddp_no_sync(self)


torch.nn.parallel.DistributedDataParallel.no_sync = counting_no_sync
AnimaNetworkTrainer.prepare_for_real = AnimaNetworkTrainer.prepare
AnimaNetworkTrainer.prepare = prepare_and_record
args, _ = parse_args(sys.argv[1:])
trainer = AnimaNetworkTrainer()
trainer.train(args)
rank = trainer.accelerator.process_index
state = {{k: v.detach().cpu().contiguous() for k, v in trainer.network.state_dict().items()}}
save_file(state, f"{{args.output_dir}}/rank{{rank}}.safetensors")
with open(f"{{args.output_dir}}/no_sync{{rank}}.txt", "w") as f:
    f.write(str(len(no_sync_entries)))
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(tiny, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path, list[dict]]:
    """Train on the tiny setup with 2 CPU processes (gloo); returns the run, its output dir and each rank's
    DDP wrapper facts."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER.format(repo=str(REPO)))
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # `--multi_gpu` is accelerate's multi-process mode; without CUDA it runs on CPU with the gloo backend.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           str(worker), *base_argv(tiny, out, "--learning_rate", "5e-3", *extra)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    infos = [json.loads((out / f"ddp{rank}.json").read_text()) for rank in (0, 1)]
    for rank, info in enumerate(infos):
        info["no_sync_entries"] = int((out / f"no_sync{rank}.txt").read_text())
    return result, out, infos


def assert_identical_ranks(out: Path) -> None:
    """Both processes end with the same LoRA (the same computation, so bitwise) and it was trained."""
    rank0 = load_file(str(out / "rank0.safetensors"))
    rank1 = load_file(str(out / "rank1.safetensors"))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if k.endswith("lora_up.weight")), "nothing was trained"


def test_two_process_ddp_keeps_identical_weights(tiny, tmp_path):
    result, out, infos = run_two_processes(tiny, tmp_path, "--max_train_steps", "3")
    # The network trains inside accelerate's DistributedDataParallel wrapper, with DDP's default options.
    for info in infos:
        assert info == {"wrapper": "DistributedDataParallel", "inner": "TrainingModule", "owns_network": True,
                        "gradient_as_bucket_view": False, "static_graph": False, "find_unused_parameters": False,
                        "timeout_s": info["timeout_s"],
                        "no_sync_entries": 0}  # no accumulation: every micro-batch all-reduces
    assert_identical_ranks(out)
    rank0 = load_file(str(out / "rank0.safetensors"))
    saved = load_file(str(out / "tiny.safetensors"))
    for key in saved:
        assert torch.equal(saved[key], rank0[key]), key
    # Only the main process writes outputs.
    assert result.stdout.count("training finished") == 1


def test_two_process_accumulation_skips_the_all_reduce_and_ddp_flags_reach_the_wrapper(tiny, tmp_path):
    # With gradient checkpointing (the LoRA layers run again inside the backward) and module dropout (a skipped
    # LoRA module gets no gradient in that step, which DDP must expect).
    _, out, infos = run_two_processes(tiny, tmp_path, "--max_train_steps", "2", "--gradient_accumulation_steps", "2",
                                      "--ddp_gradient_as_bucket_view", "--ddp_timeout", "7", "--gradient_checkpointing",
                                      "--network_args", "module_dropout=0.5")
    for info in infos:
        assert info["wrapper"] == "DistributedDataParallel"
        assert info["gradient_as_bucket_view"] is True and info["static_graph"] is False
        assert info["find_unused_parameters"] is True
        assert info["timeout_s"] == 7 * 60
        # Accumulation micro-batches ran under DDP's no_sync (a step that ends the epoch early syncs at once).
        assert info["no_sync_entries"] >= 1
    assert_identical_ranks(out)


# The noise and noise levels become functions of each sample (random draws differ between processes), so a
# 2-process step and a 1-process step over the same batches compute the same gradients.
FIXED_DRAWS_WORKER = """
import sys, torch
sys.path.insert(0, {repo!r})
import anima_train_network
from library.training import flow_matching

real_levels = flow_matching.training_noise_levels

def fixed_levels(*args, **kwargs):
    sigmas, timesteps = real_levels(*args, **kwargs)
    return sigmas.fill_(0.6), timesteps.fill_(0.6)

flow_matching.training_noise = lambda latents: torch.sin(latents * 37.0 + 1.0)
flow_matching.training_noise_levels = fixed_levels
sys.exit(anima_train_network.main(sys.argv[1:]))
"""


def test_two_processes_take_the_mean_gradient_of_their_batches_as_one_process_accumulating_both(tiny, tmp_path):
    """Process i trains on batches i, i+2, ... and DDP averages: 2 steps on 2 processes equal 2 steps of one
    process accumulating the same batch pairs (batch means weighted equally either way)."""
    worker = tmp_path / "fixed_draws.py"
    worker.write_text(FIXED_DRAWS_WORKER.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # Plain SGD: the update is linear in the gradient, so a sum instead of a mean would show (Adam hides it).
    flags = ["--max_train_steps", "2", "--learning_rate", "0.5", "--optimizer_type", "SGD"]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(worker), *base_argv(tiny, tmp_path / "two", *flags)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(worker), *base_argv(tiny, tmp_path / "one", *flags, "--gradient_accumulation_steps", "2")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "2 process(es), grad accumulation 1" in two.stderr and "1 process(es), grad accumulation 2" in one.stderr
    a, b = load_file(str(tmp_path / "two" / "tiny.safetensors")), load_file(str(tmp_path / "one" / "tiny.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
        moved += int(key.endswith("lora_up.weight") and bool(a[key].abs().sum() > 0))
    assert moved > 0, "nothing was trained"

# Counts each process's cache-file writes.
WRITE_COUNTING_WORKER = """
import json, os, sys
sys.path.insert(0, {repo!r})
import anima_train_network
from library.data import latent_cache, text_cache

writes = {{"latents": 0, "text": 0}}

def counting(kind, real):
    def merge(path, arrays):
        writes[kind] += 1
        return real(path, arrays)
    return merge

latent_cache.merge_into_npz = counting("latents", latent_cache.merge_into_npz)
text_cache.merge_into_npz = counting("text", text_cache.merge_into_npz)
code = anima_train_network.main(sys.argv[1:])
with open(os.path.join({out!r}, "writes" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump(writes, f)
sys.exit(code)
"""


def test_two_processes_write_disk_caches_and_sample_images_once(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    worker = tmp_path / "count_writes.py"
    worker.write_text(WRITE_COUNTING_WORKER.format(repo=str(REPO), out=str(out)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(worker), *base_argv(tiny, out, "--max_train_steps", "1", "--cache_latents_to_disk",
                                 "--cache_text_encoder_outputs_to_disk", "--sample_prompts", str(tiny.sample_prompts),
                                 "--sample_at_first")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    images = len(list(tiny.image_dir.glob("*.png"))) + len(list(tiny.image_dir.glob("*.jpg")))
    writes = [json.loads((out / f"writes{rank}.json").read_text()) for rank in (0, 1)]
    assert writes[0] == {"latents": images, "text": images}  # the main process encodes and writes every file
    assert writes[1] == {"latents": 0, "text": 0}  # the other finds them written and only reads them
    prompts = [line for line in tiny.sample_prompts.read_text().splitlines() if line and not line.startswith("#")]
    assert len(list((out / "sample").glob("*.png"))) == len(prompts)  # once, not once per process

def test_accelerate_cpu_launch_with_two_processes_warns_that_it_started_one(tiny, tmp_path):
    """`accelerate launch --cpu --num_processes 2` without mpirun starts one process; the run says so."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(REPO / "anima_train_network.py"), *base_argv(tiny, tmp_path / "out", "--max_train_steps", "1")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate launch --cpu with --num_processes above 1 started one process" in result.stderr
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu" in result.stderr
    assert "1 process(es)" in result.stderr and (tmp_path / "out" / "tiny.safetensors").is_file()


def test_lone_cpu_launch_is_told_from_real_multi_process_and_plain_launches():
    from library.training.distributed import lone_cpu_launch_warning

    lone = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert lone_cpu_launch_warning(lone) is not None
    assert lone_cpu_launch_warning({**lone, "WORLD_SIZE": "2"}) is None  # --multi_gpu (torchrun)
    assert lone_cpu_launch_warning({**lone, "OMPI_COMM_WORLD_SIZE": "2"}) is None  # --cpu under mpirun
    assert lone_cpu_launch_warning({"ACCELERATE_USE_CPU": "True"}) is None  # --cpu --num_processes 1
    assert lone_cpu_launch_warning({"MASTER_ADDR": "127.0.0.1"}) is None

def test_two_process_ddp_static_graph_reaches_the_wrapper(tiny, tmp_path):
    # With CPU-offload checkpointing: its inner backward gives the LoRA parameters their gradients.
    _, out, infos = run_two_processes(tiny, tmp_path, "--max_train_steps", "2", "--ddp_static_graph",
                                      "--cpu_offload_checkpointing")
    assert [info["static_graph"] for info in infos] == [True, True]
    assert_identical_ranks(out)
