"""Trainer flags proven on tiny CPU runs: each flag changes what it should (weights, files, metadata, groups),
and features that must not change training (validation, block swap, offloading, resume) leave the weights equal."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from train_helpers import ScalingAccelerator, tiny_train_argv, trainer_through_network

import train_network
from anima_train_network import AnimaNetworkTrainer
from library.io.run_lock import is_run_lock_file
from library.training.args import parse_args
from networks.lora_format import load_lora_file, to_sd_scripts_format

COMMON = ("--network_args", "train_llm_adapter=false")


def base_argv(tiny, out: Path, *extra: str, cache_text: bool = True, dataset: Path | None = None,
              dit: Path | None = None) -> list[str]:
    return tiny_train_argv(tiny, out, *extra, cache_text=cache_text, dataset=dataset, dit=dit, learning_rate="5e-3")


class CountingTrainer(AnimaNetworkTrainer):
    """Counts the trainer's global clipping and optimizer-wrapper steps, and logs schedule-free mode events."""

    def prepare(self, args):
        prepared = super().prepare(args)
        self.training_model, self.optimizer = prepared[:2]
        self.calls = {"clip": 0, "step": 0}
        clip, step = self.accelerator.clip_grad_norm_, self.optimizer.step

        def counted_clip(*a, **k):
            self.calls["clip"] += 1
            return clip(*a, **k)

        def counted_step(*a, **k):
            self.calls["step"] += 1
            return step(*a, **k)

        self.accelerator.clip_grad_norm_ = counted_clip
        self.optimizer.step = counted_step
        return prepared

    def batch_loss(self, args, batch, training):
        if not training:
            RecordingAdamWScheduleFree.log.append("validate")
        return super().batch_loss(args, batch, training)


class RecordingAdamWScheduleFree(torch.optim.AdamW):
    """Stands in for a schedule-free optimizer (recognised by its class name): records train()/eval() calls."""

    log: list[str] = []

    def train(self):
        type(self).log.append("train")

    def eval(self):
        type(self).log.append("eval")


def run(argv: list[str], trainer_cls=CountingTrainer) -> AnimaNetworkTrainer:
    args, _ = parse_args(argv)
    trainer = trainer_cls()
    trainer.train(args)
    return trainer


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), rtol=0, atol=atol, msg=key)


def deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Effective weight change up @ down * alpha / rank per module (independent of alpha folding)."""
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up = sd[f"{name}.lora_up.weight"].float()
            rank = down.shape[0]
            alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else rank
            out[name] = up @ down.float().reshape(rank, -1) * (alpha / rank)
    return out


@pytest.fixture(scope="module")
def val_toml(tiny_setup, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("val") / "dataset_val.toml"
    path.write_text(tiny_setup.dataset_toml.read_text().replace("batch_size = 2", "batch_size = 2\nvalidation_split = 0.25"))
    return path


# --- resume from a step state, pruning --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    trainer = run(base_argv(tiny_setup, out, "--max_train_steps", "4", "--save_every_n_steps", "1", "--save_state",
                            "--save_last_n_steps", "1", *COMMON))
    return trainer, out


def test_save_last_n_steps_prunes_older_step_files_and_states(step_run):
    _, out = step_run
    names = {p.name for p in out.iterdir() if not is_run_lock_file(p.name)}
    # Step 4 is the last step and is saved too (as sd-scripts does); keeping the last 1 step leaves steps 3 and 4.
    assert names == {"tiny-step00000003-state", "tiny-step00000003.safetensors", "tiny-step00000004-state",
                     "tiny-step00000004.safetensors", "tiny-state", "tiny.safetensors", "tiny_loss.png"}


def test_resume_mid_epoch_from_a_step_state_equals_the_uninterrupted_run(tiny_setup, step_run, tmp_path):
    trainer, out = step_run
    state = out / "tiny-step00000003-state"
    counters = json.loads((state / "train_state.json").read_text())
    assert counters["global_step"] == 3 and counters["epoch_step"] > 0, "the state is not in the middle of an epoch"
    assert trainer.schedule.steps_per_epoch > 3
    resumed = run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "4", "--resume", str(state), *COMMON))
    assert resumed.global_step == 4
    assert_same_weights(load_file(str(out / "tiny.safetensors")), load_file(str(tmp_path / "tiny.safetensors")))
    step3 = load_file(str(out / "tiny-step00000003.safetensors"))
    final = load_file(str(tmp_path / "tiny.safetensors"))
    assert any(not torch.equal(step3[k], final[k]) for k in final if k.endswith("lora_up.weight"))


def test_sample_at_first_samples_a_resumed_run_before_its_first_step_without_changing_it(tiny_setup, step_run,
                                                                                          tmp_path):
    # As sd-scripts: --sample_at_first samples before training also when the run resumes (named after the resumed
    # step here); sampling leaves the training random stream alone, so the result is the uninterrupted run's.
    _, out = step_run
    resumed = run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "4", "--resume",
                            str(out / "tiny-step00000003-state"), "--sample_prompts", str(tiny_setup.sample_prompts),
                            "--sample_at_first", *COMMON))
    assert resumed.global_step == 4
    names = sorted(p.name for p in (tmp_path / "sample").iterdir())
    assert len(names) == 2, names
    for name, (index, seed) in zip(names, ((0, 1), (1, 2)), strict=True):
        assert name.startswith(f"tiny_000003_{index:02d}_") and name.endswith(f"_{seed}.png"), names
    assert_same_weights(load_file(str(out / "tiny.safetensors")), load_file(str(tmp_path / "tiny.safetensors")))


class PromptFileRemovingTrainer(AnimaNetworkTrainer):
    """Deletes the prompt file before the second sampling."""

    def sample_images(self, args, epoch, step):
        if step == 2:
            Path(args.sample_prompts).unlink()
        return super().sample_images(args, epoch, step)


def test_a_prompt_file_removed_during_the_run_skips_that_sampling_with_a_warning(tiny_setup, tmp_path, caplog):
    # As sd-scripts (it logs the missing file and trains on); the file was checked when the run started.
    prompts = tmp_path / "prompts.txt"
    shutil.copy(tiny_setup.sample_prompts, prompts)
    with caplog.at_level(logging.WARNING):
        trainer = run(base_argv(tiny_setup, tmp_path / "out", "--max_train_steps", "3", "--sample_prompts",
                                str(prompts), "--sample_every_n_steps", "1", *COMMON),
                      trainer_cls=PromptFileRemovingTrainer)
    assert trainer.global_step == 3 and (tmp_path / "out" / "tiny.safetensors").is_file()
    names = sorted(p.name for p in (tmp_path / "out" / "sample").iterdir())
    assert len(names) == 2 and all(n.startswith("tiny_000001_") for n in names), names
    assert "sample images at step 2 skipped" in caplog.text and "sample images at step 3 skipped" in caplog.text


def test_save_last_n_epochs_keeps_only_the_newest_epoch_file(tiny_setup, tmp_path):
    one_batch = tmp_path / "one_batch.toml"  # every image in one batch per bucket: few steps per epoch
    one_batch.write_text(tiny_setup.dataset_toml.read_text().replace("batch_size = 2", "batch_size = 8"))
    trainer = run(base_argv(tiny_setup, tmp_path, "--max_train_epochs", "3", "--save_every_n_epochs", "1",
                            "--save_last_n_epochs", "1", dataset=one_batch))
    assert trainer.schedule.num_epochs == 3 and trainer.global_step == 3 * trainer.schedule.steps_per_epoch
    assert sorted(p.name for p in tmp_path.glob("tiny*.safetensors")) == ["tiny-000002.safetensors",
                                                                          "tiny.safetensors"]
    meta = metadata(tmp_path / "tiny.safetensors")
    assert meta["ss_num_epochs"] == "3" and meta["ss_epoch"] == "3"
    assert meta["ss_max_train_steps"] == str(trainer.global_step)


# --- validation ---------------------------------------------------------------------------------------------------


def test_validation_logs_a_loss_and_leaves_the_training_trajectory_alone(tiny_setup, val_toml, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with_val = run(base_argv(tiny_setup, tmp_path / "a", "--max_train_steps", "3", "--validate_every_n_steps", "1",
                             "--max_validation_steps", "1", "--logging_dir", str(tmp_path / "logs"),
                             dataset=val_toml))
    # The same split from the flag instead of the TOML; validation only after the last step (epoch end).
    flag_split = run(base_argv(tiny_setup, tmp_path / "b", "--max_train_steps", "3", "--validation_split", "0.25"))
    assert with_val.val_group.num_train_images == flag_split.val_group.num_train_images == 2
    assert with_val.train_group.num_train_images == 6
    assert_same_weights(load_file(str(tmp_path / "a" / "tiny.safetensors")),
                        load_file(str(tmp_path / "b" / "tiny.safetensors")), atol=0)
    events = EventAccumulator(str(next((tmp_path / "logs").iterdir()) / "network_train"))
    events.Reload()
    values = events.Scalars("loss/validation/step_average")
    assert [v.step for v in values] == [1, 2, 3]
    assert all(math.isfinite(v.value) and v.value > 0 for v in values)
    # sd-scripts' names: the divergence from the training loss/average beside each average, per step and epoch.
    average = {v.step: v.value for v in events.Scalars("loss/average")}
    for v, divergence in zip(values, events.Scalars("loss/validation/step_divergence"), strict=True):
        assert divergence.step == v.step and divergence.value == pytest.approx(v.value - average[v.step], abs=1e-5)
    assert [v.step for v in events.Scalars("loss/validation/epoch_average")] == [1]  # the epoch, as sd-scripts
    assert len(events.Scalars("loss/validation/epoch_divergence")) == 1
    assert metadata(tmp_path / "a" / "tiny.safetensors")["ss_num_validation_images"] == "2"


class SigmaRecordingTrainer(CountingTrainer):
    validation_sigmas: list[list[float]] = []

    def batch_loss(self, args, batch, training):
        loss = super().batch_loss(args, batch, training)
        if not training:
            type(self).validation_sigmas.append(self.last_sigmas.tolist())
        return loss


@pytest.mark.parametrize(("bounds", "sigmas"), [((), [0.2, 0.4, 0.6, 0.8]),
                                                (("--min_timestep", "100", "--max_timestep", "900"),
                                                 [0.26, 0.42, 0.58, 0.74])])
def test_validation_scores_each_batch_at_sd_scripts_four_fixed_timesteps(tiny_setup, val_toml, tmp_path, bounds,
                                                                        sigmas):
    SigmaRecordingTrainer.validation_sigmas = []
    run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "1", "--max_validation_steps", "1", *bounds,
                  dataset=val_toml), trainer_cls=SigmaRecordingTrainer)
    recorded = SigmaRecordingTrainer.validation_sigmas
    assert len(recorded) == 4  # one epoch-end validation, one batch, four passes
    for batch_sigmas, sigma in zip(recorded, sigmas, strict=True):
        assert batch_sigmas == pytest.approx([sigma] * len(batch_sigmas), abs=1e-6)


# --- starting points: --network_weights, --dim_from_weights, --base_weights, --lora_format comfy ------------------


@pytest.fixture(scope="module")
def comfy_sampling_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("comfy")
    trainer = run(base_argv(tiny_setup, out, "--max_train_epochs", "2", "--lora_format", "comfy",
                            "--sample_prompts", str(tiny_setup.sample_prompts), "--sample_every_n_epochs", "1",
                            "--sample_at_first", *COMMON))
    return trainer, out


def test_epoch_sampling_and_sample_at_first_write_epoch_named_pngs(comfy_sampling_run):
    _, out = comfy_sampling_run
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert len(names) == 6, names  # 2 prompts x (before training, epoch 1, epoch 2)
    for epoch in (0, 1, 2):
        for index, seed in ((0, 1), (1, 2)):
            assert sum(n.startswith(f"tiny_e{epoch:06d}_{index:02d}_") and n.endswith(f"_{seed}.png")
                       for n in names) == 1, (epoch, index, names)


def test_comfy_output_loads_back_with_create_network_from_weights(comfy_sampling_run):
    from networks.lora_anima import create_network_from_weights

    trainer, out = comfy_sampling_run
    path = out / "tiny.safetensors"
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("diffusion_model.") for k in f.keys())
    network, sd = create_network_from_weights(1.0, str(path), None, [], trainer.dit, for_inference=True)
    trained = {k: v.detach().cpu() for k, v in trainer.network.state_dict().items()}
    loaded = deltas(sd)
    assert loaded and loaded.keys() == deltas(trained).keys()
    for name, delta in deltas(trained).items():
        torch.testing.assert_close(loaded[name], delta, rtol=1e-5, atol=1e-7, msg=name)
    assert len(network.unet_loras) == len(loaded)


def test_network_weights_in_either_format_are_the_starting_point(tiny_setup, step_run, comfy_sampling_run,
                                                                 tmp_path):
    _, steps_out = step_run
    _, comfy_out = comfy_sampling_run
    start = steps_out / "tiny.safetensors"  # sd-scripts layout
    run(base_argv(tiny_setup, tmp_path / "sd", "--max_train_steps", "1", "--learning_rate", "1e-12",
                  "--network_weights", str(start), *COMMON))
    assert_same_weights(load_file(str(start)), load_file(str(tmp_path / "sd" / "tiny.safetensors")), atol=1e-6)

    comfy = comfy_out / "tiny.safetensors"
    # --dim_from_weights: rank and alpha come from the file, not from --network_dim 2.
    argv = base_argv(tiny_setup, tmp_path / "comfy", "--max_train_steps", "1", "--learning_rate", "1e-12",
                     "--network_weights", str(comfy), "--dim_from_weights")
    argv[argv.index("--network_dim") + 1] = "2"
    run(argv)
    saved = load_file(str(tmp_path / "comfy" / "tiny.safetensors"))
    assert all(v.shape[0] == 4 for k, v in saved.items() if k.endswith("lora_down.weight"))
    assert metadata(tmp_path / "comfy" / "tiny.safetensors")["ss_network_dim"] == "4"  # the trained rank
    expected = deltas(to_sd_scripts_format(load_lora_file(str(comfy))[0]))
    for name, delta in deltas(saved).items():
        torch.testing.assert_close(delta, expected[name], rtol=1e-4, atol=1e-6, msg=name)


build_until_network = trainer_through_network


def fixed_prediction(trainer: AnimaNetworkTrainer) -> torch.Tensor:
    batch = trainer.train_group[0]
    latents = trainer.batch_latents(batch)
    text = trainer.batch_text(batch, train_text_encoder=False)
    torch.manual_seed(5)
    with torch.no_grad():
        pred = trainer.noise_pred_and_target(trainer.args, latents, text).prediction
    return pred


def test_base_weights_are_merged_into_the_dit_with_their_multiplier(tiny_setup, step_run, tmp_path):
    from networks.lora_anima import create_network_from_weights

    _, steps_out = step_run
    lora = steps_out / "tiny.safetensors"
    plain = build_until_network(base_argv(tiny_setup, tmp_path))
    before = fixed_prediction(plain)
    reference, _ = create_network_from_weights(0.5, str(lora), None, [], plain.dit, for_inference=True)
    reference.apply_to([], plain.dit, False, True)
    expected = fixed_prediction(plain)
    merged = build_until_network(base_argv(tiny_setup, tmp_path, "--base_weights", str(lora),
                                           "--base_weights_multiplier", "0.5"))
    after = fixed_prediction(merged)
    assert (after - before).abs().max() > 1e-5, "merging changed nothing"
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)


# --- optimizer paths: fused backward, schedule-free, clipping, ss_optimizer ----------------------------------------


def test_fused_backward_pass_steps_inside_backward_and_matches_the_plain_adafactor_step(tiny_setup, tmp_path):
    fused = run(base_argv(tiny_setup, tmp_path / "f", "--max_train_steps", "2", "--optimizer_type", "Adafactor",
                          "--fused_backward_pass", *COMMON))
    assert fused.fused_backward is not None
    assert fused.calls == {"clip": 0, "step": 0}, "the trainer clipped or stepped although the hooks did"
    fused0 = run(base_argv(tiny_setup, tmp_path / "f0", "--max_train_steps", "2", "--optimizer_type", "Adafactor",
                           "--fused_backward_pass", "--max_grad_norm", "0", *COMMON))
    plain0 = run(base_argv(tiny_setup, tmp_path / "p0", "--max_train_steps", "2", "--optimizer_type", "Adafactor",
                           "--max_grad_norm", "0", *COMMON))
    assert plain0.calls["step"] == 2 and plain0.calls["clip"] == 0  # --max_grad_norm 0: no clipping
    # relative_step (the default) sets its own step size: recorded as sd-scripts records it.
    meta = metadata(tmp_path / "p0" / "tiny.safetensors")
    assert (meta["ss_learning_rate"], meta["ss_unet_lr"], meta["ss_lr_scheduler"]) == ("None", "None", "adafactor:0.005")
    assert meta["ss_optimizer"] == "library.training.optimizers.Adafactor(relative_step=True)"
    fused_sd = load_file(str(tmp_path / "f0" / "tiny.safetensors"))
    assert_same_weights(load_file(str(tmp_path / "p0" / "tiny.safetensors")), fused_sd, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in fused_sd.items() if k.endswith("lora_up.weight")), "nothing trained"
    assert fused0.global_step == 2


def test_schedule_free_optimizer_is_in_eval_mode_for_saving_and_validation(tiny_setup, val_toml, tmp_path,
                                                                          monkeypatch):
    from library.training import checkpointing

    write_lora = checkpointing.write_lora

    def recorded_write_lora(*a, **k):
        RecordingAdamWScheduleFree.log.append("save")
        return write_lora(*a, **k)

    monkeypatch.setattr(checkpointing, "write_lora", recorded_write_lora)
    RecordingAdamWScheduleFree.log.clear()
    run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "2", "--save_every_n_steps", "1",
                  "--validate_every_n_steps", "1", "--max_validation_steps", "1", "--optimizer_type",
                  f"{__name__}.RecordingAdamWScheduleFree", dataset=val_toml))
    log = RecordingAdamWScheduleFree.log
    assert log[0] == "train"
    assert log.count("save") == 3 and log.count("validate") >= 2  # steps 1 and 2 (the last) and the final file
    mode = None
    for entry in log:
        if entry in ("train", "eval"):
            assert entry != mode, f"switched to {entry} twice in a row: {log}"
            mode = entry
        else:
            assert mode == "eval", f"{entry} ran with the optimizer in train mode: {log}"


def test_huber_loss_with_the_default_snr_schedule_trains(tiny_setup, tmp_path):
    trainer = run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "2", "--loss_type", "huber", *COMMON))
    assert trainer.calls["clip"] == 2 and trainer.calls["step"] == 2  # default --max_grad_norm 1: global clip
    sd = load_file(str(tmp_path / "tiny.safetensors"))
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    meta = metadata(tmp_path / "tiny.safetensors")
    assert meta["ss_loss_type"] == "huber" and meta["ss_huber_schedule"] == "snr"
    assert meta["ss_optimizer"] == "torch.optim.adamw.AdamW"


# --- many flags in one run: accumulation, epochs, regularisation, precision, metadata -----------------------------


@pytest.fixture(scope="module")
def flags_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("flags")
    trainer = run(base_argv(
        tiny_setup, out, "--max_train_epochs", "1", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0",
        "--network_dropout", "0.1", "--scale_weight_norms", "0.05", "--learning_rate", "5e-2",
        "--ip_noise_gamma", "0.1", "--ip_noise_gamma_random_strength", "--save_precision", "fp16",
        "--training_comment", "hello", "--metadata_title", "My LoRA", "--metadata_author", "me",
        "--metadata_description", "a test", "--metadata_license", "MIT", "--metadata_tags", "a,b",
        "--metadata_trigger_phrase", "sks", "--metadata_usage_hint", "say sks", "--metadata_merged_from", "x",
        "--metadata_preprocessor", "none", "--metadata_is_negative_embedding", "false",
        "--metadata_thumbnail", "data:image/png;base64,AAAA",
        "--optimizer_args", "weight_decay=0.02", *COMMON))
    return trainer, out


def test_epochs_and_accumulation_set_the_step_count(flags_run):
    trainer, out = flags_run
    assert trainer.global_step == trainer.schedule.steps_per_epoch == math.ceil(len(trainer.train_loader) / 2)
    assert trainer.calls["step"] == len(trainer.train_loader)  # one optimizer call per micro-batch, synced every 2
    assert trainer.calls["clip"] == 0  # --max_grad_norm 0
    meta = metadata(out / "tiny.safetensors")
    assert meta["ss_gradient_accumulation_steps"] == "2" and meta["ss_steps"] == str(trainer.global_step)
    assert meta["ss_max_train_steps"] == str(trainer.global_step) and meta["ss_num_epochs"] == "1"


def test_flag_values_reach_the_network_and_the_metadata(flags_run):
    trainer, out = flags_run
    assert all(lora.dropout == 0.1 for lora in trainer.network.unet_loras)
    meta = metadata(out / "tiny.safetensors")
    expected = {"ss_training_comment": "hello", "modelspec.title": "My LoRA", "modelspec.author": "me",
                "modelspec.description": "a test", "modelspec.license": "MIT", "modelspec.tags": "a,b",
                "modelspec.trigger_phrase": "sks", "modelspec.usage_hint": "say sks", "modelspec.merged_from": "x",
                "modelspec.preprocessor": "none", "modelspec.is_negative_embedding": "false",
                "modelspec.thumbnail": "data:image/png;base64,AAAA",
                "ss_network_dropout": "0.1", "ss_scale_weight_norms": "0.05", "ss_ip_noise_gamma": "0.1",
                "ss_ip_noise_gamma_random_strength": "True", "ss_max_grad_norm": "0.0",
                "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.02)"}
    for key, value in expected.items():
        assert meta.get(key) == value, key
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.02


def test_scale_weight_norms_caps_every_module_and_save_precision_casts(flags_run):
    trainer, out = flags_run
    sd = load_file(str(out / "tiny.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.float16}
    norms = [d.norm().item() for d in deltas(sd).values()]
    assert max(norms) <= 0.05 * 1.01
    assert max(norms) > 0.04, "the cap was never reached; raise the learning rate of this test"
    assert trainer.max_norm_logs["max_norm/keys_scaled"] > 0
    # sd-scripts' names: the mean norm is `norm/avg_key_norm`.
    assert set(trainer.max_norm_logs) == {"max_norm/keys_scaled", "max_norm/max_key_norm", "norm/avg_key_norm"}


def test_text_encoder_only_full_bf16_text_encoder_lr_and_no_metadata(tiny_setup, tmp_path, fresh_accelerate_state):
    trainer = run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "2", "--mixed_precision", "bf16",
                            "--full_bf16", "--network_train_text_encoder_only", "--text_encoder_lr", "1e-3",
                            "--learning_rate", "1e-5", "--no_metadata", cache_text=False))
    assert {p.dtype for p in trainer.network.parameters()} == {torch.bfloat16}
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3]
    sd = load_file(str(tmp_path / "tiny.safetensors"))
    assert sd and all(k.startswith("lora_te_") for k in sd)
    assert any(v.float().abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
    meta = metadata(tmp_path / "tiny.safetensors")
    ss_keys = {k for k in meta if k.startswith("ss_")}
    assert ss_keys <= {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                       "ss_network_alpha", "ss_network_args", "ss_lora_format"}
    assert "ss_steps" not in meta and "modelspec.architecture" in meta


class ClipRecordingTrainer(AnimaNetworkTrainer):
    """Records the parameters handed to the gradient-norm clipping, and which of them hold a gradient."""

    def prepare(self, args):
        prepared = super().prepare(args)
        clip, self.clipped = self.accelerator.clip_grad_norm_, []

        def recording_clip(params, max_norm):
            params = list(params)
            self.clipped.append(({id(p) for p in params}, {id(p) for p in self.network.parameters() if p.grad is not None}))
            return clip(params, max_norm)

        self.accelerator.clip_grad_norm_ = recording_clip
        return prepared


def test_text_encoder_lr_zero_freezes_the_qwen3_lora_without_gradients_or_a_share_of_the_clipped_norm(
        tiny_setup, tmp_path):
    # A rate of 0 freezes the group (a documented difference: sd-scripts computes its gradients and clips with them).
    trainer = run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "2", "--text_encoder_lr", "0",
                            cache_text=False), trainer_cls=ClipRecordingTrainer)
    te_params = {id(p) for lora in trainer.network.text_encoder_loras for p in lora.parameters()}
    dit_params = {id(p) for lora in trainer.network.unet_loras for p in lora.parameters()}
    assert te_params and dit_params and len(trainer.clipped) == 2
    for clipped, with_grad in trainer.clipped:
        assert clipped == dit_params and with_grad == dit_params
    sd = load_file(str(tmp_path / "tiny.safetensors"))
    te_ups = [v for k, v in sd.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")]
    assert te_ups and all(not v.any() for v in te_ups)  # saved, as sd-scripts saves it, and untrained
    assert any(v.any() for k, v in sd.items() if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))


# --- --cache_only, command-line dataset metadata ------------------------------------------------------------------


def test_cache_only_writes_disk_caches_and_no_lora(tiny_setup, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_setup.image_dir, images)
    dataset = tmp_path / "dataset.toml"
    dataset.write_text(tiny_setup.dataset_toml.read_text().replace(str(tiny_setup.image_dir.resolve()),
                                                                   str(images.resolve())))
    args, _ = parse_args(base_argv(tiny_setup, tmp_path / "out", "--cache_only", "--cache_latents_to_disk",
                                   "--cache_text_encoder_outputs_to_disk", dataset=dataset))
    assert AnimaNetworkTrainer().train(args) is None
    image_count = len([p for p in images.iterdir() if p.suffix in (".png", ".jpg", ".webp")])
    assert len(list(images.glob("*_anima.npz"))) == image_count > 0
    assert len(list(images.glob("*_anima_te.npz"))) == image_count
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.safetensors"))


def test_command_line_dataset_metadata_has_the_total_batch_size(tiny_setup, tmp_path):
    data = tmp_path / "data" / "1_tiny"
    shutil.copytree(tiny_setup.image_dir, data)
    argv = base_argv(tiny_setup, tmp_path, "--max_train_steps", "1", "--gradient_accumulation_steps", "2",
                     "--train_batch_size", "2", "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32",
                     "--max_bucket_reso", "128", "--bucket_reso_steps", "16", "--caption_extension", ".txt")
    i = argv.index("--dataset_config")
    argv[i:i + 2] = ["--train_data_dir", str(tmp_path / "data")]
    run(argv)
    meta = metadata(tmp_path / "tiny.safetensors")
    assert meta["ss_batch_size_per_device"] == "2" and meta["ss_total_batch_size"] == "4"


# --- memory features on CPU: block swap, offloaded checkpointing ---------------------------------------------------


@pytest.fixture(scope="module")
def four_block_dit(tiny_setup, tmp_path_factory) -> Path:
    """The tiny DiT with blocks 2 and 3 added (copies of 0 and 1), so one block can be swapped (limit N - 2)."""
    sd = load_file(str(tiny_setup.dit))
    for key in list(sd):
        for src, dst in (("net.blocks.0.", "net.blocks.2."), ("net.blocks.1.", "net.blocks.3.")):
            if key.startswith(src):
                sd[dst + key[len(src):]] = sd[key].clone() * 0.9
    path = tmp_path_factory.mktemp("dit4") / "dit4.safetensors"
    save_file(sd, str(path))
    return path


def test_block_swap_trains_samples_and_validates_like_the_resident_model(tiny_setup, four_block_dit, val_toml,
                                                                        tmp_path):
    extra = ("--max_train_steps", "2", "--gradient_checkpointing", "--validate_every_n_steps", "1",
             "--sample_prompts", str(tiny_setup.sample_prompts), "--sample_every_n_steps", "1", *COMMON)
    swapped = run(base_argv(tiny_setup, tmp_path / "swap", "--blocks_to_swap", "1", *extra, dataset=val_toml,
                            dit=four_block_dit))
    resident = run(base_argv(tiny_setup, tmp_path / "plain", *extra, dataset=val_toml, dit=four_block_dit))
    assert swapped.dit.block_swapper is not None and resident.dit.block_swapper is None
    assert swapped.dit.block_swapper.resident_blocks() == [0, 1, 2]
    assert_same_weights(load_file(str(tmp_path / "plain" / "tiny.safetensors")),
                        load_file(str(tmp_path / "swap" / "tiny.safetensors")), atol=1e-6)
    assert len(list((tmp_path / "swap" / "sample").iterdir())) == 4


def test_blocks_to_swap_auto_plans_from_the_free_memory_and_logs_the_plan(tiny_setup, four_block_dit, tmp_path,
                                                                         monkeypatch, caplog):
    from library.models import block_swap

    budget = {"free": 10**15}
    plans = []
    real_plan = block_swap.plan_blocks_to_swap

    def recording_plan(memory, free_bytes, checkpointing):
        plans.append((memory, free_bytes, checkpointing))
        return real_plan(memory, free_bytes, checkpointing)

    monkeypatch.setattr(block_swap, "device_free_bytes", lambda device: budget["free"])
    monkeypatch.setattr(block_swap, "plan_blocks_to_swap", recording_plan)
    monkeypatch.setattr(logging.getLogger("anima_train"), "propagate", True)  # console logging may have cut it
    caplog.set_level(logging.INFO, logger="anima_train")
    argv = ("--max_train_steps", "1", "--gradient_checkpointing", "--blocks_to_swap", "auto", *COMMON)
    roomy = run(base_argv(tiny_setup, tmp_path / "roomy", *argv, dit=four_block_dit))
    assert roomy.args.blocks_to_swap == "auto" and roomy.dit.block_swapper is None  # the flag is not rewritten
    memory, free, checkpointing = plans[-1]
    assert (free, checkpointing, memory.num_blocks) == (10**15, "ckpt", 4)
    assert memory.block_weights == sum(p.numel() * p.element_size() for p in roomy.dit.blocks[0].parameters())
    # The largest bucket x batch, 16 pixels per token side, width D, float32 on CPU.
    dataset = roomy.train_group.datasets[0]
    tokens = max((w // 16) * (h // 16) for w, h in dataset.bucket_sizes)
    assert memory.block_input == dataset.config.batch_size * tokens * roomy.dit.config.model_channels * 4
    assert "--blocks_to_swap auto: 0 blocks swapped" in caplog.text

    budget["free"] = memory.peak_bytes(1, "ckpt")  # room for everything but one block's weights
    tight = run(base_argv(tiny_setup, tmp_path / "tight", *argv, dit=four_block_dit))
    assert tight.dit.block_swapper.blocks_to_swap == 1
    assert "--blocks_to_swap auto: 1 blocks swapped" in caplog.text and "fits" in caplog.text


def test_blocks_to_swap_auto_swaps_nothing_without_a_cuda_memory_query(tiny_setup, four_block_dit, tmp_path):
    trainer = run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "1", "--blocks_to_swap", "auto", *COMMON,
                            dit=four_block_dit))
    assert trainer.dit.block_swapper is None


def test_blocks_to_swap_beyond_the_model_limit_is_one_clear_error(tiny_setup, tmp_path):
    from library.errors import AnimaError

    with pytest.raises(AnimaError, match="--blocks_to_swap 1"):  # the tiny DiT has 2 blocks: no block can swap
        run(base_argv(tiny_setup, tmp_path, "--max_train_steps", "1", "--blocks_to_swap", "1"))


@pytest.mark.parametrize("flag", ["--unsloth_offload_checkpointing", "--cpu_offload_checkpointing"])
def test_offloaded_checkpointing_trains_like_plain_checkpointing(tiny_setup, tmp_path, flag):
    offloaded = run(base_argv(tiny_setup, tmp_path / "o", "--max_train_steps", "2", flag, "--network_dropout",
                              "0.2", *COMMON))
    assert offloaded.args.gradient_checkpointing  # implied, with a warning
    assert all(block.checkpoint_offload is not None for block in offloaded.dit.blocks)
    run(base_argv(tiny_setup, tmp_path / "p", "--max_train_steps", "2", "--gradient_checkpointing",
                  "--network_dropout", "0.2", *COMMON))
    assert_same_weights(load_file(str(tmp_path / "p" / "tiny.safetensors")),
                        load_file(str(tmp_path / "o" / "tiny.safetensors")), atol=1e-6)


def test_qwen3_tokenizer_path_reaches_the_tokenizer_loader(tiny_setup, tmp_path):
    from library.errors import AnimaError

    empty = tmp_path / "no_tokenizer"
    empty.mkdir()
    with pytest.raises(AnimaError, match="--qwen3_tokenizer_path .*no Qwen3 tokenizer files"):
        run(base_argv(tiny_setup, tmp_path / "out", "--max_train_steps", "1", "--qwen3_tokenizer_path", str(empty)))
    trainer = run(base_argv(tiny_setup, tmp_path / "out", "--max_train_steps", "1", "--qwen3_tokenizer_path",
                            str(tiny_setup.qwen3_dir)))
    assert trainer.global_step == 1


def test_debug_dataset_prints_batches_and_loads_no_model(tiny_setup, tmp_path, capsys):
    from anima_train_network import main

    out = tmp_path / "out"
    # No model paths: --debug_dataset needs only the data.
    code = main(["--debug_dataset", "--dataset_config", str(tiny_setup.dataset_toml), "--output_dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "bucket" in printed.lower()
    assert any(path.stem in printed for path in tiny_setup.image_dir.glob("*.png"))
    assert not out.exists()


def test_a_run_leaves_its_parsed_flags_unchanged(tiny_setup, four_block_dit, tmp_path):
    # The seed drawn without --seed and the planned swap count live on the trainer, not in the namespace.
    import copy

    args, _ = parse_args(base_argv(tiny_setup, tmp_path, "--max_train_steps", "2", "--blocks_to_swap", "auto",
                                   "--save_state", *COMMON, dit=four_block_dit))
    args.seed = None
    before = copy.deepcopy(vars(args))
    trainer = CountingTrainer()
    trainer.train(args)
    assert vars(args) == before
    assert trainer.seed is not None and trainer.global_step == 2


def test_dim_from_weights_keeps_the_dropouts_and_loraplus_of_the_command_line(tiny_setup, tmp_path):
    """The file sets modules, ranks and alphas; --network_dropout and the non-selection network_args still act
    (sd-scripts' Anima LoRA drops them silently with --dim_from_weights)."""
    first = trainer_through_network(tiny_train_argv(tiny_setup, tmp_path / "a"))
    start = tmp_path / "start.safetensors"
    first.network.save_weights(str(start))
    trainer = trainer_through_network(tiny_train_argv(
        tiny_setup, tmp_path / "b", "--network_weights", str(start), "--dim_from_weights", "--network_dropout", "0.2",
        "--network_args", "rank_dropout=0.1", "module_dropout=0.05", "loraplus_lr_ratio=4"))
    loras = trainer.network.unet_loras
    assert len(loras) == len(first.network.unet_loras)
    assert {(lora.dropout, lora.rank_dropout, lora.module_dropout) for lora in loras} == {(0.2, 0.1, 0.05)}
    _, descriptions = trainer.network.prepare_optimizer_params(None, 1e-4, 1e-4)
    assert descriptions == ["unet", "unet plus"]


def test_validate_every_n_epochs_picks_the_epochs_that_validate(tiny_setup, val_toml, tmp_path):
    counts = {}
    for name, extra in {"default": (), "every_2": ("--validate_every_n_epochs", "2")}.items():
        SigmaRecordingTrainer.validation_sigmas = []
        run(base_argv(tiny_setup, tmp_path / name, "--max_train_epochs", "3", "--max_validation_steps", "1", *extra,
                      dataset=val_toml), trainer_cls=SigmaRecordingTrainer)
        counts[name] = len(SigmaRecordingTrainer.validation_sigmas) // 4  # four passes per validation batch
    assert counts == {"default": 3, "every_2": 1}  # after each epoch by default; after epoch 2 only


def test_cached_text_encoder_outputs_release_the_encoder_weights_before_the_dit_loads(tiny_setup, tmp_path,
                                                                                      monkeypatch):
    # A full-size Qwen3 is 2.2 GiB in float32: it must not be held beside the DiT once its outputs are cached.
    devices_at_dit_load = []
    load_dit = AnimaNetworkTrainer.load_dit

    def recording_load_dit(self, args):
        devices_at_dit_load.extend(p.device.type for te in self.text_encoders for p in te.parameters())
        return load_dit(self, args)

    monkeypatch.setattr(AnimaNetworkTrainer, "load_dit", recording_load_dit)
    args, _ = parse_args(tiny_train_argv(tiny_setup, tmp_path / "out", "--max_train_steps", "1",
                                         "--network_train_unet_only"))
    AnimaNetworkTrainer().train(args)
    assert devices_at_dit_load and set(devices_at_dit_load) == {"meta"}
    assert (tmp_path / "out" / "tiny.safetensors").exists()


def test_full_fp16_steps_through_the_loss_scaler_with_float16_gradients(tiny_setup, tmp_path, monkeypatch,
                                                                        fresh_accelerate_state):
    """--full_fp16 gives float16 LoRA gradients, which torch's GradScaler refuses to unscale unless told to; the
    run must clip and step through the scaler (as on CUDA) and train."""
    monkeypatch.setattr(train_network, "Accelerator", ScalingAccelerator)
    out = tmp_path / "out"
    argv = tiny_train_argv(tiny_setup, out, "--network_args", "train_llm_adapter=false", "--mixed_precision", "fp16",
                           "--full_fp16", "--optimizer_args", "eps=1e-4", "--max_grad_norm", "1.0",
                           "--max_train_steps", "3", "--learning_rate", "1e-3")
    trainer = AnimaNetworkTrainer()
    trainer.train(parse_args(argv)[0])
    assert trainer.accelerator.scaler is not None and trainer.global_step == 3
    weights = load_file(str(out / "tiny.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert any(bool(t.abs().sum() > 0) for k, t in weights.items() if "lora_up" in k)  # the steps changed the LoRA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_full_fp16_trains_through_the_cuda_loss_scaler(tiny_setup, tmp_path, fresh_accelerate_state):
    dataset = tmp_path / "dataset.json"  # JSON: the device image has no toml
    dataset.write_text(json.dumps({"datasets": [{"resolution": 64, "batch_size": 1, "subsets": [
        {"image_dir": str(tiny_setup.image_dir), "caption_extension": ".txt"}]}]}), encoding="utf-8")
    out = tmp_path / "out"
    argv = tiny_train_argv(tiny_setup, out, "--network_args", "train_llm_adapter=false", "--mixed_precision", "fp16",
                           "--full_fp16", "--optimizer_args", "eps=1e-4", "--max_grad_norm", "1.0",
                           "--max_train_steps", "3", "--learning_rate", "1e-3", dataset=dataset)
    trainer = AnimaNetworkTrainer()
    trainer.train(parse_args(argv)[0])
    assert trainer.device.type == "cuda" and trainer.accelerator.scaler is not None and trainer.global_step == 3
    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(out / "tiny.safetensors")).values())


class _RecordingBlockInputs(AnimaNetworkTrainer):
    dtypes: list[torch.dtype] = []

    def place_dit(self, args):
        super().place_dit(args)
        self.dit.blocks[0].register_forward_pre_hook(lambda module, inputs: self.dtypes.append(inputs[0].dtype))


def test_fp16_on_the_cpu_autocasts_like_a_gpu_so_the_blocks_get_float32_hidden_states(tiny_setup, tmp_path,
                                                                                     fresh_accelerate_state):
    """accelerate runs no fp16 autocast on the CPU: the trainer then autocasts itself, as accelerate does on a GPU,
    and the DiT keeps its residual stream in float32."""
    argv = tiny_train_argv(tiny_setup, tmp_path / "out", "--network_args", "train_llm_adapter=false",
                           "--mixed_precision", "fp16", "--max_train_steps", "2")
    trainer = _RecordingBlockInputs()
    trainer.train(parse_args(argv)[0])
    assert not trainer.accelerator.native_amp and trainer.global_step == 2
    assert trainer.dtypes and set(trainer.dtypes) == {torch.float32}
