"""bench/bench_full_size_run.py: what can be checked without writing 6 GB of weights or training at full size."""

import pytest

from bench.bench_full_size_run import _shared_flags, main
from library.training.args import parse_args


def test_its_command_line_is_one_this_trainer_accepts(tmp_path):
    for name in ("dit.safetensors", "qwen_3_06b_base.safetensors", "qwen_image_vae.safetensors", "dataset.toml"):
        (tmp_path / name).write_bytes(b"")  # the parser checks that the paths exist, not what they hold
    args, _ = parse_args(_shared_flags(tmp_path, tmp_path / "dataset.toml", 2, "ours"))
    assert (args.network_dim, args.max_train_steps, args.mixed_precision) == (16, 2, "no")
    assert args.gradient_checkpointing and args.cache_latents and args.cache_text_encoder_outputs


def test_missing_tokenizers_and_checkout_end_in_one_error_line(tmp_path):
    with pytest.raises(SystemExit, match="error: --tokenizers .* has no qwen3_06b/ folder"):
        main(["--work", str(tmp_path / "w"), "--tokenizers", str(tmp_path)])
    for folder in ("qwen3_06b", "t5_old"):
        (tmp_path / folder).mkdir()
    with pytest.raises(SystemExit, match="error: --sd_scripts .* has no anima_train_network.py"):
        main(["--work", str(tmp_path / "w"), "--tokenizers", str(tmp_path), "--sd_scripts", str(tmp_path)])
    assert not (tmp_path / "w").exists()  # stopped before writing any model file
