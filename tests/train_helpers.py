"""Helpers shared by the trainer tests: the tiny-model command line and a trainer built up to a phase."""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator

from anima_train_network import AnimaNetworkTrainer
from bench.bench_host_syncs import with_cpu_loss_scaler
from library.training.args import MIXED_PRECISION_DTYPES, parse_args


def tiny_train_argv(tiny, out: Path, *extra: str, cache_text: bool = True, dataset: Path | None = None,
                    dit: Path | None = None, learning_rate: str | None = None) -> list[str]:
    """Trainer flags for the tiny setup (`library.models.tiny.TinySetup`), then `extra`."""
    argv = [
        "--pretrained_model_name_or_path", str(dit or tiny.dit), "--qwen3", str(tiny.qwen3_dir),
        "--vae", str(tiny.vae), "--t5_tokenizer_path", str(tiny.t5_tokenizer_dir),
        "--dataset_config", str(dataset or tiny.dataset_toml), "--output_dir", str(out), "--output_name", "tiny",
        "--network_module", "networks.lora_anima", "--network_dim", "4", "--network_alpha", "4", "--seed", "11",
        "--max_data_loader_n_workers", "0", "--qwen3_max_token_length", "8", "--t5_max_token_length", "8",
        "--cache_latents",
    ]
    if learning_rate is not None:
        argv += ["--learning_rate", learning_rate]
    if cache_text:
        argv.append("--cache_text_encoder_outputs")
    return argv + list(extra)


def trainer_through_caches(argv: list[str]) -> AnimaNetworkTrainer:
    """Run the trainer's phases up to and including the caches (datasets, frozen models, caches)."""
    args, _ = parse_args(argv)
    trainer = AnimaNetworkTrainer()
    trainer.args = args
    trainer.seed = trainer.run_seed(args)
    trainer.weight_dtype = MIXED_PRECISION_DTYPES[args.mixed_precision]
    trainer.accelerator = trainer.setup_accelerator(args)
    trainer.train_group, trainer.val_group = trainer.build_datasets(args)
    trainer.text_encoders = trainer.load_frozen_models(args, trainer.groups())
    return trainer


def trainer_through_network(argv: list[str]) -> AnimaNetworkTrainer:
    """`trainer_through_caches`, then the DiT loaded and the network created and attached."""
    trainer = trainer_through_caches(argv)
    trainer.dit = trainer.load_dit(trainer.args)
    trainer.network, trainer.network_args, trainer.train_te = trainer.create_network(trainer.args)
    return trainer


def train_tiny(tiny, out: Path, network_module: str, *extra: str) -> AnimaNetworkTrainer:
    """A whole training run on the tiny setup with another --network_module (learning rate 5e-3)."""
    argv = tiny_train_argv(tiny, out, *extra, learning_rate="5e-3")
    argv[argv.index("--network_module") + 1] = network_module
    args, _ = parse_args(argv)
    trainer = AnimaNetworkTrainer()
    trainer.train(args)
    return trainer


# accelerate as on CUDA under fp16: with a loss scaler (accelerate gives the CPU none). Monkeypatch it over
# ``train_network.Accelerator``.
ScalingAccelerator = with_cpu_loss_scaler(Accelerator, init_scale=1024.0)
