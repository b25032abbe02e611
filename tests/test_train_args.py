"""The trainer command line: every guide flag parses, config files round-trip, bad combinations fail early."""

from __future__ import annotations

import argparse
import re

import pytest
import toml
import torch

from anima_train_network import main
from library.errors import AnimaError
from library.models import offload_checkpointing
from library.training import optimizers, schedulers
from library.training.args import int_or_float, parse_args, setup_parser


def parse(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    return parse_args(list(argv))


def test_guide_command_line_parses_to_the_given_values(tmp_path):
    # The guide's example command (plus the flag it needs for cached text outputs).
    for name in ("dit.safetensors", "qwen3", "vae.safetensors"):
        (tmp_path / name).write_bytes(b"")
    args, warnings = parse(
        "--pretrained_model_name_or_path", str(tmp_path / "dit.safetensors"), "--qwen3", str(tmp_path / "qwen3"),
        "--vae", str(tmp_path / "vae.safetensors"),
        "--output_dir", "out", "--output_name", "my_lora", "--save_model_as", "safetensors",
        "--network_module", "networks.lora_anima", "--network_dim", "8", "--learning_rate", "1e-4",
        "--optimizer_type", "AdamW8bit", "--lr_scheduler", "constant", "--timestep_sampling", "sigmoid",
        "--discrete_flow_shift", "1.0", "--max_train_epochs", "10", "--save_every_n_epochs", "1",
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs",
        "--vae_chunk_size", "64", "--vae_disable_cache", "--network_train_unet_only",
    )
    assert warnings == []
    assert args.network_dim == 8 and args.learning_rate == 1e-4 and args.optimizer_type == "AdamW8bit"
    assert args.max_train_epochs == 10 and args.save_every_n_epochs == 1 and args.mixed_precision == "bf16"
    assert args.gradient_checkpointing and args.cache_latents and args.cache_text_encoder_outputs
    assert args.vae_chunk_size == 64 and args.vae_disable_cache and args.attn_mode == "torch"


def guide_command(tmp_path) -> list[str]:
    """A full guide-style command line (model files exist, so the path checks pass)."""
    for name in ("dit.safetensors", "qwen3", "vae.safetensors", "dataset.toml", "prompts.txt"):
        (tmp_path / name).write_text("a cat --w 64 --h 64\n" if name == "prompts.txt" else "")
    return [
        "--pretrained_model_name_or_path", str(tmp_path / "dit.safetensors"), "--qwen3", str(tmp_path / "qwen3"),
        "--vae", str(tmp_path / "vae.safetensors"), "--dataset_config", str(tmp_path / "dataset.toml"),
        "--output_dir", "out", "--output_name", "my_lora", "--save_model_as", "safetensors",
        "--network_module", "networks.lora_anima", "--network_dim", "8", "--network_alpha", "4",
        "--network_args", "train_llm_adapter=true", "rank_dropout=0.1", "--learning_rate", "1e-4",
        "--optimizer_type", "AdamW8bit", "--optimizer_args", "weight_decay=0.01", "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "10%", "--timestep_sampling", "sigmoid", "--discrete_flow_shift", "1.0",
        "--max_train_epochs", "10", "--save_every_n_epochs", "1", "--mixed_precision", "bf16",
        "--gradient_checkpointing", "--cache_latents_to_disk", "--cache_text_encoder_outputs",
        "--network_train_unet_only", "--vae_chunk_size", "64", "--vae_disable_cache", "--seed", "42",
        "--sample_prompts", str(tmp_path / "prompts.txt"), "--sample_every_n_epochs", "1",
        "--text_encoder_lr", "1e-5", "--blocks_to_swap", "8", "--loss_type", "huber",
        "--metadata_title", "My LoRA", "--logging_dir", "logs",
    ]


def test_output_config_then_config_file_reproduces_a_full_guide_command(tmp_path):
    argv = guide_command(tmp_path)
    config = tmp_path / "guide.toml"
    assert main(["--output_config", str(config), *argv]) == 0
    from_command_line, warnings_cli = parse(*argv)
    from_config, warnings_config = parse("--config_file", str(config))
    expected = {k: v for k, v in vars(from_command_line).items() if k not in ("config_file", "output_config")}
    actual = {k: v for k, v in vars(from_config).items() if k not in ("config_file", "output_config")}
    assert actual == expected
    assert warnings_config == warnings_cli


def test_anima_and_training_flags_parse_with_their_types():
    args, _ = parse(
        "--timestep_sampling", "flux_shift", "--sigmoid_scale", "1.5", "--weighting_scheme", "logit_normal",
        "--logit_mean", "0.2", "--logit_std", "0.8", "--mode_scale", "1.1", "--qwen3_max_token_length", "128",
        "--t5_max_token_length", "256", "--attn_mode", "sdpa", "--split_attn", "--self_attn_lr", "1e-5",
        "--cross_attn_lr", "2e-5", "--mlp_lr", "0", "--mod_lr", "3e-5", "--llm_adapter_lr", "4e-5",
        "--text_encoder_lr", "5e-6", "--loss_type", "huber", "--huber_schedule", "constant", "--huber_c", "0.2",
        "--huber_scale", "2", "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength",
        "--gradient_accumulation_steps", "4", "--max_grad_norm", "0.5", "--seed", "7", "--max_train_steps", "30",
        "--save_every_n_steps", "10", "--save_last_n_steps", "20", "--save_last_n_epochs", "2", "--save_state",
        "--sample_every_n_steps", "5", "--sample_every_n_epochs", "1", "--sample_at_first",
        "--lr_warmup_steps", "10%", "--lr_scheduler", "cosine", "--llm_adapter_path", ".",
    )
    assert args.timestep_sampling == "flux_shift" and args.sigmoid_scale == 1.5
    assert args.weighting_scheme == "logit_normal" and args.logit_mean == 0.2 and args.logit_std == 0.8
    assert args.attn_mode == "torch"  # sdpa is an alias
    assert (args.self_attn_lr, args.cross_attn_lr, args.mlp_lr, args.mod_lr, args.llm_adapter_lr) == (
        1e-5, 2e-5, 0.0, 3e-5, 4e-5)
    assert args.text_encoder_lr == [5e-6]
    assert args.loss_type == "huber" and args.huber_c == 0.2 and args.huber_scale == 2.0
    assert args.ip_noise_gamma == 0.1 and args.ip_noise_gamma_random_strength
    assert args.lr_warmup_steps == pytest.approx(0.1)
    assert args.qwen3_max_token_length == 128 and args.t5_max_token_length == 256


def test_int_or_float_reads_steps_ratios_and_percentages():
    assert int_or_float("123") == 123 and isinstance(int_or_float("123"), int)
    assert int_or_float("0.1") == pytest.approx(0.1)
    assert int_or_float("10%") == pytest.approx(0.1)
    with pytest.raises(argparse.ArgumentTypeError):
        int_or_float("1.5")


def test_config_file_round_trip_and_command_line_wins(tmp_path):
    out = tmp_path / "saved.toml"
    assert main(["--output_config", str(out), "--network_dim", "16", "--learning_rate", "3e-4",
                 "--timestep_sampling", "shift", "--network_args", "train_llm_adapter=true", "rank_dropout=0.1",
                 "--wandb_api_key", "secret"]) == 0
    saved = toml.load(out)
    assert saved == {"network_dim": 16, "learning_rate": 3e-4, "timestep_sampling": "shift",
                     "network_args": ["train_llm_adapter=true", "rank_dropout=0.1"]}

    args, _ = parse("--config_file", str(out), "--network_dim", "32")
    assert args.network_dim == 32  # command line over TOML
    assert args.learning_rate == 3e-4 and args.timestep_sampling == "shift"
    assert args.network_args == ["train_llm_adapter=true", "rank_dropout=0.1"]
    # Without the .toml suffix, as sd-scripts allows.
    args, _ = parse("--config_file", str(out)[: -len(".toml")])
    assert args.network_dim == 16


def test_config_file_sections_are_flattened_and_values_type_checked(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[model]\nnetwork_dim = 4\n[train]\nlr_warmup_steps = "5%"\nmax_train_steps = 10\n')
    args, _ = parse("--config_file", str(config), "--lr_scheduler", "linear")
    assert args.network_dim == 4 and args.lr_warmup_steps == pytest.approx(0.05) and args.max_train_steps == 10


@pytest.mark.parametrize("content, words", [
    ("netwrk_dim = 4\n", ["unknown key 'netwrk_dim'"]),
    ('timestep_sampling = "cubic"\n', ["timestep_sampling", "cubic"]),
    ("gradient_checkpointing = 1\n", ["gradient_checkpointing", "true or false"]),
    ("network_dim = [1, 2]\n", ["network_dim", "single value"]),
])
def test_config_file_bad_keys_or_values_name_the_key(tmp_path, content, words):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    with pytest.raises(AnimaError) as err:
        parse("--config_file", str(config))
    for word in words:
        assert word in str(err.value)
    assert str(config) in str(err.value)


def test_bare_output_config_writes_to_config_file_like_sd_scripts(tmp_path, capsys):
    # sd-scripts spelling: `--output_config` is a switch and the file is the --config_file path.
    config = tmp_path / "run.toml"
    assert main(["--network_dim", "16", "--output_config", "--config_file", str(config)]) == 0
    assert toml.load(config) == {"network_dim": 16}
    args, _ = parse("--config_file", str(config))
    assert args.network_dim == 16
    assert main(["--network_dim", "16", "--output_config"]) == 2
    assert "--config_file" in capsys.readouterr().err


def test_output_config_refuses_to_overwrite(tmp_path):
    out = tmp_path / "x.toml"
    out.write_text("")
    with pytest.raises(AnimaError, match="already exists"):
        from library.training.args import handle_output_config

        handle_output_config(["--output_config", str(out)])


def test_missing_config_file_is_one_clear_error(tmp_path):
    with pytest.raises(AnimaError, match="--config_file .*not found"):
        parse("--config_file", str(tmp_path / "nope.toml"))


@pytest.mark.parametrize("argv, words", [
    (["--fused_backward_pass", "--optimizer_type", "AdamW"], ["--fused_backward_pass", "Adafactor"]),
    (["--fused_backward_pass", "--optimizer_type", "Adafactor", "--gradient_accumulation_steps", "2"],
     ["--fused_backward_pass", "--gradient_accumulation_steps"]),
    (["--cache_text_encoder_outputs", "--shuffle_caption"], ["--cache_text_encoder_outputs", "--shuffle_caption"]),
    (["--cache_text_encoder_outputs", "--network_train_text_encoder_only"],
     ["--cache_text_encoder_outputs", "--network_train_text_encoder_only"]),
    (["--blocks_to_swap", "4", "--cpu_offload_checkpointing"], ["--blocks_to_swap", "--cpu_offload_checkpointing"]),
    (["--blocks_to_swap", "4", "--unsloth_offload_checkpointing"],
     ["--blocks_to_swap", "--unsloth_offload_checkpointing"]),
    (["--unsloth_offload_checkpointing", "--cpu_offload_checkpointing"], ["--unsloth_offload_checkpointing"]),
    (["--blocks_to_swap", "27"], ["--blocks_to_swap 27"]),
    (["--full_bf16"], ["--full_bf16", "--mixed_precision bf16"]),
    (["--full_fp16", "--mixed_precision", "bf16"], ["--full_fp16", "fp16"]),
    (["--loss_type", "huber", "--huber_c", "0"], ["--huber_c", "> 0"]),
    (["--loss_type", "smooth_l1", "--huber_scale", "-1"], ["--huber_scale"]),
    (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], ["--lr_warmup_steps", "constant"]),
    (["--log_with", "tensorboard"], ["--log_with tensorboard", "--logging_dir"]),
    (["--attn_mode", "sageattn"], ["sageattn", "inference"]),
    (["--xformers"], ["xformers", "--split_attn"]),
    (["--sdpa", "--xformers", "--split_attn"], ["--xformers", "--sdpa"]),
    (["--use_8bit_adam", "--optimizer_type", "AdamW"], ["--use_8bit_adam", "--optimizer_type"]),
    (["--weighted_captions"], ["--weighted_captions"]),
    (["--pretrained_model_name_or_path", "/no/such/dit.safetensors"], ["/no/such/dit.safetensors", "not found"]),
    (["--max_train_steps", "0"], ["--max_train_steps"]),
])
def test_incompatible_flags_are_rejected_naming_the_flags(argv, words):
    with pytest.raises(AnimaError) as err:
        parse(*argv)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("flag", ["--save_n_epoch_ratio", "--save_last_n_epochs_state", "--save_last_n_steps_state"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_save_counts_below_one_are_rejected(flag, value):
    # A negative --save_n_epoch_ratio used to save every epoch (sd-scripts ignores it); neither is what was asked.
    with pytest.raises(AnimaError, match=re.escape(f"{flag} must be at least 1, got {value}")):
        parse(flag, value)


def test_all_conflicts_are_reported_together():
    with pytest.raises(AnimaError) as err:
        parse("--full_bf16", "--fused_backward_pass")
    assert "--full_bf16" in str(err.value) and "--fused_backward_pass" in str(err.value)


def test_unsupported_sd_flags_are_warned_not_silently_ignored():
    args, warnings = parse("--v2", "--v_parameterization", "--clip_skip", "2", "--noise_offset", "0.1")
    text = " ".join(warnings)
    for flag in ("--v2", "--v_parameterization", "--clip_skip", "--noise_offset"):
        assert flag in text


def test_fp8_base_unet_means_fp8_base():
    args, _ = parse("--fp8_base_unet")
    assert args.fp8_base


def test_torch_compile_compiles_the_blocks_with_the_dynamo_backend():
    from library.training.args import compile_options

    args, _ = parse("--torch_compile", "--dynamo_backend", "EAGER")
    assert args.compile and compile_options(args) == {"backend": "eager", "mode": None, "dynamic": None,
                                                      "fullgraph": False, "cache_size_limit": None}
    args, _ = parse("--compile", "--compile_mode", "max-autotune-no-cudagraphs", "--compile_dynamic", "false",
                    "--compile_fullgraph", "--compile_cache_size_limit", "64")
    assert compile_options(args) == {"backend": "inductor", "mode": "max-autotune-no-cudagraphs", "dynamic": False,
                                     "fullgraph": True, "cache_size_limit": 64}
    args, _ = parse()
    assert compile_options(args) is None


@pytest.mark.parametrize("argv, message", [
    (["--compile_mode", "default"], "--compile_mode need(s) --compile"),
    (["--compile_fullgraph", "--compile_backend", "eager"], "--compile_backend, --compile_fullgraph need(s)"),
    (["--torch_compile", "--dynamo_backend", "eager", "--compile_backend", "aot_eager"], "disagree"),
    (["--compile", "--compile_backend", "no_such_backend"], "unknown torch.compile backend"),
    (["--compile", "--compile_mode", "reduce-overhead", "--blocks_to_swap", "4"], "captures CUDA graphs"),
    (["--compile", "--compile_cache_size_limit", "0"], "--compile_cache_size_limit must be at least 1"),
    (["--compile", "--compile_backend", "eager", "--compile_mode", "default"], "--compile_mode is an inductor option"),
])
def test_compile_flags_without_effect_or_in_conflict_are_rejected(argv, message):
    with pytest.raises(AnimaError, match=re.escape(message)):
        parse(*argv)


def test_cached_text_outputs_train_only_the_dit_lora_with_a_warning():
    args, warnings = parse("--cache_text_encoder_outputs_to_disk")
    assert args.cache_text_encoder_outputs and args.network_train_unet_only
    assert any("--network_train_unet_only" in w for w in warnings)


@pytest.mark.parametrize("argv, flags", [
    (("--network_train_unet_only", "--text_encoder_lr", "1e-4"), ["--text_encoder_lr"]),
    (("--cache_text_encoder_outputs", "--text_encoder_lr", "1e-4"), ["--text_encoder_lr"]),
    (("--network_train_text_encoder_only", "--unet_lr", "1e-4", "--mlp_lr", "0"), ["--unet_lr", "--mlp_lr"]),
])
def test_learning_rate_of_a_side_that_is_not_trained_is_warned(argv, flags):
    _, warnings = parse(*argv)
    message = [w for w in warnings if "is not trained" in w]
    assert len(message) == 1 and all(flag in message[0] for flag in flags)


def test_text_encoder_lr_values_after_the_first_are_warned_as_unused():
    # One value per text encoder (sd-scripts' SDXL passes two); Anima's one Qwen3 takes the first.
    args, warnings = parse("--text_encoder_lr", "1e-4", "3e-4")
    assert args.text_encoder_lr == [1e-4, 3e-4]
    assert any("--text_encoder_lr" in w and "uses 0.0001" in w for w in warnings)
    _, quiet = parse("--text_encoder_lr", "1e-4", "--unet_lr", "2e-4")
    assert not any("text_encoder_lr" in w or "unet_lr" in w for w in quiet)


def test_disk_latent_cache_implies_latent_cache_and_unsloth_implies_checkpointing():
    args, warnings = parse("--cache_latents_to_disk", "--unsloth_offload_checkpointing")
    assert args.cache_latents and args.gradient_checkpointing
    assert any("--gradient_checkpointing" in w for w in warnings)


def test_sample_schedule_without_a_prompt_file_and_a_prompt_file_without_a_schedule_are_warned(tmp_path):
    # Neither makes a sample image (sd-scripts crashes on the first, and is silent on the second).
    _, warnings = parse("--sample_every_n_steps", "5", "--sample_at_first")
    assert [w for w in warnings if "no sample images" in w] == [
        "--sample_every_n_steps, --sample_at_first have no effect without --sample_prompts; no sample images are made"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    _, warnings = parse("--sample_prompts", str(prompts))
    assert any(w.startswith("--sample_prompts has no effect without") for w in warnings)
    for schedule in (("--sample_every_n_epochs", "1"), ("--sample_at_first",)):
        _, warnings = parse("--sample_prompts", str(prompts), *schedule)
        assert not any("no sample images" in w for w in warnings)


def test_non_positive_sample_cadence_is_disabled_with_a_warning():
    args, warnings = parse("--sample_every_n_steps", "0")
    assert args.sample_every_n_steps is None and any("--sample_every_n_steps" in w for w in warnings)


def test_logging_dir_turns_on_tensorboard():
    args, _ = parse("--logging_dir", "logs")
    assert args.log_with == "tensorboard"


def test_help_marks_gpu_only_flags():
    text = setup_parser().format_help()
    for flag in ("--xformers",):
        start = text.index(f"\n  {flag}")  # the option's help entry, not the usage line
        block = text[start:start + 400]
        assert "[GPU only]" in block, flag


def test_cli_prints_one_error_line_and_exits_2(capsys, tmp_path):
    code = main(["--pretrained_model_name_or_path", str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.safetensors" in err
    assert "Traceback" not in err


def test_cli_requires_model_paths_before_any_work(capsys):
    assert main(["--output_dir", "out"]) == 2
    err = capsys.readouterr().err
    assert "--pretrained_model_name_or_path" in err and "--qwen3" in err and "--vae" in err


def test_huber_with_every_schedule_including_the_default_snr_is_accepted():
    for schedule in (None, "snr", "constant", "exponential"):
        argv = ["--loss_type", "huber"] + (["--huber_schedule", schedule] if schedule else [])
        args, _ = parse(*argv)
        assert args.huber_schedule == (schedule or "snr")


@pytest.mark.parametrize("argv, flag, advice", [
    (["--deepspeed"], "--deepspeed", "accelerate launch --multi_gpu"),
    (["--zero_stage", "3"], "--zero_stage", "DeepSpeed"),
    (["--offload_optimizer_device", "cpu"], "--offload_optimizer_device", "DeepSpeed"),
    (["--huggingface_repo_id", "me/lora"], "--huggingface_repo_id", "--output_dir"),
    (["--save_state_to_huggingface"], "--save_state_to_huggingface", "Hugging Face"),
    (["--resume_from_huggingface"], "--resume_from_huggingface", "--resume"),
    (["--async_upload"], "--async_upload", "Hugging Face"),
    (["--dataset_class", "my.Dataset"], "--dataset_class", "--dataset_config"),
])
def test_unsupported_sd_scripts_flags_are_rejected_with_advice(argv, flag, advice):
    with pytest.raises(AnimaError) as err:
        parse(*argv)
    message = str(err.value)
    assert "\n" not in message and flag in message and advice in message


def test_unsupported_flags_at_their_defaults_pass_so_sd_scripts_configs_load(tmp_path):
    config = tmp_path / "sd.toml"
    config.write_text("zero_stage = 2\ndeepspeed = false\nasync_upload = false\nnetwork_dim = 8\n")
    args, _ = parse("--config_file", str(config))
    assert args.network_dim == 8 and args.zero_stage == 2


def test_unsupported_flag_in_a_config_file_is_rejected(tmp_path):
    config = tmp_path / "sd.toml"
    config.write_text("[huggingface]\nhuggingface_repo_id = \"me/lora\"\n")
    with pytest.raises(AnimaError, match="--huggingface_repo_id"):
        parse("--config_file", str(config))


def test_a_bad_sample_prompt_file_fails_during_the_argument_check(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w wide\n")  # width must be a number
    with pytest.raises(AnimaError, match="--sample_prompts .*prompts.txt"):
        parse("--sample_prompts", str(prompts))
    prompts.write_text("a cat --w 512\n")
    args, _ = parse("--sample_prompts", str(prompts))
    assert args.sample_prompts == str(prompts)


def test_tokenizer_flags_say_they_download_and_missing_folders_fail(tmp_path):
    text = " ".join(setup_parser().format_help().split())
    for flag in ("--qwen3_tokenizer_path", "--t5_tokenizer_path"):
        block = text[text.index(f" {flag} "):][:400]
        assert "downloaded" in block and "local folder" in block, flag
    with pytest.raises(AnimaError, match="--qwen3_tokenizer_path .*not found"):
        parse("--qwen3_tokenizer_path", str(tmp_path / "none"))


@pytest.fixture
def tf32_flags_restored():
    """Both TF32 switches off for the test, then back as they were. Not monkeypatch: torch serves
    ``matmul.allow_tf32`` through ``__getattr__``, which newer pytest releases cannot restore."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_cuda_allow_tf32_sets_the_backend_flags_and_fp32_without_it_warns(tf32_flags_restored, tiny_setup, tmp_path):
    from train_helpers import tiny_train_argv, trainer_through_caches

    from anima_train_network import slow_precision_warning

    trainer_through_caches(tiny_train_argv(tiny_setup, tmp_path))
    assert torch.backends.cuda.matmul.allow_tf32 is False  # not asked for: untouched
    cuda, two_billion = torch.device("cuda"), 2_000_000_000
    warning = slow_precision_warning(cuda, torch.float32, two_billion)
    assert "--cuda_allow_tf32" in warning and "--mixed_precision bf16" in warning and "2.0B" in warning
    assert slow_precision_warning(cuda, torch.bfloat16, two_billion) is None  # bf16: tensor cores anyway
    assert slow_precision_warning(torch.device("cpu"), torch.float32, two_billion) is None
    assert slow_precision_warning(cuda, torch.float32, 10_000_000) is None  # a small DiT: no real cost

    trainer_through_caches(tiny_train_argv(tiny_setup, tmp_path, "--cuda_allow_tf32"))
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    assert slow_precision_warning(cuda, torch.float32, two_billion) is None


def test_a_gpu_without_bf16_tensor_cores_is_told_to_train_in_fp16():
    """Volta / Turing (compute capability below 8.0): bf16 is emulated and there is no TF32, so bf16 and float32
    both warn with the fp16 advice, whatever --cuda_allow_tf32 says; fp16 does not warn."""
    from anima_train_network import slow_precision_warning

    cuda, two_billion = torch.device("cuda"), 2_000_000_000
    for dtype in (torch.bfloat16, torch.float32):
        warning = slow_precision_warning(cuda, dtype, two_billion, native_bf16=False)
        assert "--mixed_precision fp16" in warning and "compute capability below 8.0" in warning
    assert "bf16 (emulated here)" in slow_precision_warning(cuda, torch.bfloat16, two_billion, native_bf16=False)
    assert slow_precision_warning(cuda, torch.float16, two_billion, native_bf16=False) is None
    assert slow_precision_warning(cuda, torch.bfloat16, 10_000_000, native_bf16=False) is None


def test_parsed_flags_are_already_normalised_so_a_resume_compares_the_same_settings():
    # The state records the settings after the run normalised them; a resumed run compares its freshly parsed
    # flags against them, so the parse must give the normalised values already.
    import copy

    from library.data.config import normalize_dataset_args
    from library.training.state import recorded_settings

    args, _ = parse_args(["--caption_extention", ".txt", "--cache_latents_to_disk",
                          "--cache_text_encoder_outputs_to_disk"])
    assert args.caption_extension == ".txt" and args.cache_latents and args.cache_text_encoder_outputs
    again = copy.deepcopy(args)
    normalize_dataset_args(again)
    assert recorded_settings(again) == recorded_settings(args)


@pytest.mark.parametrize("flags, rule", [
    (["--use_8bit_adam", "--optimizer_type", "AdamW"], lambda: optimizers.resolve_optimizer_type("AdamW", True)),
    (["--fused_backward_pass", "--optimizer_type", "AdamW"], lambda: optimizers.check_fused_backward_pass(False, 1)),
    (["--blocks_to_swap", "4", "--cpu_offload_checkpointing"],
     lambda: offload_checkpointing.checkpoint_offload_mode(True, False, block_swap=True)),
    (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], lambda: schedulers.check_no_warmup("constant", 10)),
])
def test_the_flag_check_states_the_same_rule_as_the_code_that_owns_it(flags, rule):
    with pytest.raises(AnimaError) as owner:
        rule()
    with pytest.raises(AnimaError) as parsed:
        parse_args(flags)
    assert str(owner.value) in str(parsed.value)
