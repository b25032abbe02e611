"""What a run reports outside the LoRA file: accelerate trackers (TensorBoard, wandb offline) with sd-scripts'
scalar names and the hyperparameters, sample images sent to the tracker, the loss/lr plot and sample grid
pictures, the end summary, log lines above the progress bar, and each prompt-file warning once."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import tiny_train_argv

from anima_train_network import AnimaNetworkTrainer
from library.errors import AnimaError
from library.training import pictures
from library.training.args import parse_args
from library.training.reporting import PACKAGE_LOGGERS, TrainingReporter, logger, lr_logs, sanitized_config


def run(argv: list[str]) -> tuple[AnimaNetworkTrainer, str]:
    args, _ = parse_args(argv)
    trainer = AnimaNetworkTrainer()
    trainer.train(args)
    return trainer, args


def tensorboard_events(run_dir: Path):
    """The scalar/image event file of the tracker and the hyperparameters written by add_hparams."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    main = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    main.Reload()
    hparams = {}
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        sub = EventAccumulator(str(folder))
        sub.Reload()
        try:
            content = sub.PluginTagToContent("hparams")
        except KeyError:  # a folder without hyperparameters
            continue
        for raw in content.values():
            data = plugin_data_pb2.HParamsPluginData.FromString(raw)
            if data.HasField("session_start_info"):
                for key, value in data.session_start_info.hparams.items():
                    hparams[key] = getattr(value, value.WhichOneof("kind"))
    return main, hparams


@pytest.fixture(scope="module")
def tensorboard_run(tiny_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("tb")
    trainer, args = run(tiny_train_argv(
        tiny_setup, out / "out", "--learning_rate", "1e-3", "--max_train_steps", "4", "--save_every_n_steps", "2",
        "--sample_prompts", str(tiny_setup.sample_prompts), "--sample_every_n_steps", "2",
        "--logging_dir", str(out / "logs"), "--log_prefix", "run-", "--log_config",
        "--log_tracker_name", "anima_test", "--wandb_api_key", "never-logged"))
    return trainer, out


def test_tensorboard_run_holds_sd_scripts_scalar_names_sample_images_and_hyperparameters(tensorboard_run):
    _, out = tensorboard_run
    [run_dir] = list((out / "logs").iterdir())
    assert run_dir.name.startswith("run-")  # <logging_dir>/<log_prefix><timestamp>/<tracker name>
    events, hparams = tensorboard_events(run_dir / "anima_test")
    scalars = set(events.Tags()["scalars"])
    assert {"loss/current", "loss/average", "loss/epoch_average", "lr/unet"} <= scalars, scalars
    assert [e.step for e in events.Scalars("loss/current")] == [1, 2, 3, 4]
    assert all(e.value > 0 for e in events.Scalars("loss/current"))
    assert events.Scalars("lr/unet")[0].value == pytest.approx(1e-3)
    assert {"sample_0", "sample_1"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("sample_0")] == [2, 4]
    # --log_config: the arguments as hyperparameters, without secrets and local paths.
    assert hparams["network_dim"] == 4 and hparams["max_train_steps"] == 4 and hparams["log_config"]
    assert hparams["network_module"] == "networks.lora_anima"
    for hidden in ("wandb_api_key", "output_dir", "pretrained_model_name_or_path", "logging_dir"):
        assert hidden not in hparams


def test_pictures_are_written_at_each_save_and_named_in_the_summary(tensorboard_run, capsys):
    trainer, out = tensorboard_run
    plot, grid = out / "out" / "tiny_loss.png", out / "out" / "tiny_samples.png"
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.width > 400 and np.asarray(image.convert("L")).std() > 0
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width >= 2 * pictures.GRID_TILE
    assert trainer.reporter.pictures == {"loss plot": plot, "sample grid": grid}
    assert not list((out / "out").glob(".*tmp*"))  # written atomically: no temporary file left
    text = trainer.reporter.summary(steps=4, output_file=None, device=torch.device("cpu"))
    assert f"loss plot: {plot}" in text and f"sample grid: {grid}" in text
    training_line = next(line for line in text.splitlines() if "s/step" in line)
    assert "sampling" in training_line and "saving" in training_line and "not counted" in training_line


def test_wandb_offline_run_holds_scalar_names_hyperparameters_and_run_name(tiny_setup, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is an optional tracker")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    tracker_config = tmp_path / "trackers.toml"
    tracker_config.write_text('[wandb]\ntags = ["anima", "test"]\nnotes = "tiny run"\n')
    logged: list[dict] = []
    runs: list[dict] = []
    real_log = wandb.sdk.wandb_run.Run.log

    def recording_log(self, data, *a, **k):
        logged.append(dict(data))
        runs.append({"name": self.name, "tags": tuple(self.tags), "notes": self.notes, "config": dict(self.config)})
        return real_log(self, data, *a, **k)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", recording_log)
    trainer, args = run(tiny_train_argv(
        tiny_setup, tmp_path / "out", "--max_train_steps", "2", "--log_with", "wandb", "--log_config",
        "--logging_dir", str(tmp_path / "logs"), "--wandb_run_name", "tiny-run",
        "--log_tracker_config", str(tracker_config), "--sample_prompts", str(tiny_setup.sample_prompts),
        "--sample_every_n_steps", "2"))
    # wandb wrote its offline run under the run folder (WANDB_DIR = <logging_dir>/<timestamp>).
    [run_dir] = list((tmp_path / "logs").iterdir())
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))
    assert os.environ["WANDB_DIR"] == str(run_dir)
    keys = set().union(*logged)
    assert {"loss/current", "loss/average", "loss/epoch_average", "lr/unet", "global_step", "epoch"} <= keys
    assert [entry["global_step"] for entry in logged if "loss/current" in entry] == [1, 2]
    # Sample images with their prompts as captions.
    [samples] = [entry for entry in logged if "sample_0" in entry]
    assert isinstance(samples["sample_0"], wandb.Image) and samples["global_step"] == 2
    assert wandb.Image.all_captions([samples["sample_0"]]) == ["a red circle on a blue background"]
    # The run's hyperparameters (--log_config), name (--wandb_run_name), tags and notes (--log_tracker_config).
    config = runs[0].pop("config")
    assert config["network_dim"] == 4 and config["max_train_steps"] == 2
    assert "output_dir" not in config and "wandb_api_key" not in config
    assert runs[0] == {"name": "tiny-run", "tags": ("anima", "test"), "notes": "tiny run"}


def test_lr_logs_use_group_names_and_report_the_effective_d_times_lr():
    class Scheduler:
        def get_last_lr(self):
            return [1.0, 0.5]

    class Prodigy:  # a D-Adaptation/Prodigy-style optimizer keeps its estimate d in each group
        param_groups = [{"lr": 1.0, "d": 2e-4}, {"lr": 0.5, "d": 2e-4}]

    logs = lr_logs(Scheduler(), ["textencoder", "unet"], Prodigy())
    assert logs == {"lr/textencoder": 1.0, "lr/d*lr/textencoder": pytest.approx(2e-4),
                    "lr/unet": 0.5, "lr/d*lr/unet": pytest.approx(1e-4)}
    plain = lr_logs(Scheduler(), ["unet", ""], type("AdamW", (), {"param_groups": [{"lr": 1.0}, {"lr": 0.5}]})())
    assert plain == {"lr/unet": 1.0, "lr/group1": 0.5}
    # ProdigyPlusScheduleFree: one `lr/d*lr`, its first group's (sd-scripts' name for it).
    prodigy_plus = type("ProdigyPlusScheduleFree", (), {"param_groups": [{"lr": 1.0, "d": 3e-4}, {"lr": 0.5, "d": 1.0}]})
    assert lr_logs(Scheduler(), ["unet", "unet plus"], prodigy_plus()) == {
        "lr/unet": 1.0, "lr/unet plus": 0.5, "lr/d*lr": pytest.approx(3e-4)}
    # The plot draws the effective rate for such groups, the scheduled one otherwise.
    history = pictures.RunHistory()
    history.add_step(1, {"loss/current": 0.5, **logs})
    assert history.lrs == {"d*lr/textencoder": [(1, pytest.approx(2e-4))], "d*lr/unet": [(1, pytest.approx(1e-4))]}


def test_loss_average_is_the_mean_of_the_last_epoch_of_batch_losses_with_every_accumulation_batch(capsys):
    # sd-scripts' moving average: one slot per batch of an epoch, each holding that batch's latest loss (every
    # gradient-accumulation batch counts), replaced by the same batch of the next epoch, never reset.
    reporter = TrainingReporter(total_steps=4, initial_step=0, is_main_process=True, interactive=False)
    # Epoch 1, 3 batches, accumulation 2: step 1 = batches 0 and 1, step 2 = batch 2 (the epoch's last).
    reporter.train_step(1, 1, 1, torch.tensor(2.0), {}, [torch.tensor(4.0)])
    reporter.train_step(2, 1, 2, 6.0, {})
    assert reporter.epoch_average() == pytest.approx((4.0 + 2.0 + 6.0) / 3)
    # Epoch 2: batches 0 and 1 replace their slots; batch 2 of epoch 1 still counts.
    reporter.train_step(3, 2, 1, 1.0, {}, [0.0])
    reporter.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" 0.")[0].split(" lr=")[0] for line in lines] == [
        "step 1/4 epoch 1 loss=2.0000 avr_loss=3.0000",
        "step 2/4 epoch 1 loss=6.0000 avr_loss=4.0000",
        "step 3/4 epoch 2 loss=1.0000 avr_loss=2.3333",
    ]


def test_log_config_sanitizes_secrets_paths_and_non_scalar_values():
    args, _ = parse_args(["--log_config", "--wandb_api_key", "secret", "--network_args", "a=1",
                          "--output_dir", "/home/me/out", "--network_dim", "8"])
    config = sanitized_config(args)
    assert config["network_dim"] == 8 and config["network_args"] == "['a=1']"
    assert "wandb_api_key" not in config and "output_dir" not in config
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in config.values())
    # What the run uses replaces the flag (the drawn seed, the steps of --max_train_epochs), as sd-scripts logs them.
    assert sanitized_config(args, {"seed": 7, "max_train_steps": 30})["seed"] == 7
    assert sanitized_config(args, {"seed": 7, "max_train_steps": 30})["max_train_steps"] == 30
    args.log_config = False
    assert sanitized_config(args) is None


@pytest.mark.parametrize("argv, words", [
    (["--log_tracker_config", "/no/such/trackers.toml", "--log_with", "tensorboard", "--logging_dir", "l"],
     ["--log_tracker_config", "/no/such/trackers.toml", "not found"]),
    (["--log_with", "aim"], ["--log_with aim", "pip install aim"]),
    (["--log_with", "all"], ["--log_with all", "--logging_dir"]),
    (["--ddp_static_graph", "--gradient_accumulation_steps", "2"], ["--ddp_static_graph", "accumulation"]),
])
def test_bad_tracker_and_ddp_flags_fail_with_one_line(argv, words):
    pytest.importorskip("accelerate")
    try:
        import aim  # noqa: F401
        if "aim" in argv:
            pytest.skip("aim is installed here")
    except ImportError:
        pass
    with pytest.raises(AnimaError) as err:
        parse_args(argv)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


def test_tracker_config_must_hold_one_table_per_tracker(tmp_path):
    bad = tmp_path / "t.toml"
    bad.write_text('entity = "me"\n')
    with pytest.raises(AnimaError, match="must be tables"):
        parse_args(["--log_tracker_config", str(bad), "--logging_dir", "l"])


def test_tracker_flags_without_a_tracker_are_warned_not_ignored():
    _, warnings = parse_args(["--log_config", "--log_prefix", "p-", "--wandb_run_name", "x"])
    assert any("--log_prefix, --log_config" in w and "--log_with" in w for w in warnings)
    assert any("--wandb_run_name" in w and "wandb" in w for w in warnings)


def test_pictures_handle_no_data_and_write_atomically(tmp_path):
    assert pictures.write_loss_plot(tmp_path / "x_loss.png", pictures.RunHistory()) is None
    assert pictures.write_sample_grid(tmp_path / "x_samples.png", []) is None
    images = []
    for i, size in enumerate(((64, 96), (80, 64), (64, 64))):
        path = tmp_path / f"s{i}.png"
        Image.new("RGB", size, (40 * i, 90, 200)).save(path)
        images.append((path, f"prompt number {i} " * 6))
    grid = pictures.write_sample_grid(pictures.sample_grid_path(tmp_path, None), images)
    assert grid == tmp_path / "last_samples.png"
    with Image.open(grid) as image:
        assert image.size[0] == 2 * (pictures.GRID_TILE + 8)  # 3 images: 2 columns, 2 rows
        pixels = np.asarray(image)
    assert (pixels < 50).any()  # caption text was drawn


def test_log_lines_go_above_the_progress_bar():
    handler = logging.StreamHandler(sys.stderr)  # what setup_console_logging installs
    saved = logger.handlers[:]
    logger.handlers[:] = [handler]
    try:
        reporter = TrainingReporter(total_steps=3, initial_step=0, is_main_process=True, interactive=True)
        # While the bar is shown the console handler is tqdm's (it writes through tqdm.write, above the bar).
        assert reporter.redirect is not None
        assert [type(h).__name__ for h in logger.handlers] == ["_TqdmLoggingHandler"]
        reporter.close()
        assert logger.handlers == [handler]
    finally:
        logger.handlers[:] = saved
    assert PACKAGE_LOGGERS  # the package loggers are redirected the same way when they have console handlers


def test_a_prompt_file_warning_is_logged_once_per_run(tiny_setup, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 1 --g 3.5\n")
    with caplog.at_level(logging.WARNING):
        run(tiny_train_argv(tiny_setup, tmp_path / "out", "--max_train_steps", "2", "--sample_prompts", str(prompts),
                            "--sample_every_n_steps", "1", "--sample_at_first"))
    assert caplog.text.count("have no effect on Anima sampling") == 1, caplog.text


def test_wandb_api_key_logs_in_and_wandb_writes_under_the_run_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is an optional tracker")
    from library.training.reporting import prepare_tracker_environment, run_logging_dir

    keys: list[str] = []
    monkeypatch.setattr(wandb, "login", lambda key=None, **_: keys.append(key))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    args, _ = parse_args(["--log_with", "wandb", "--wandb_api_key", "k-123", "--logging_dir", str(tmp_path),
                          "--log_prefix", "p-"])
    run_dir = run_logging_dir(args.logging_dir, args.log_prefix)
    prepare_tracker_environment(args, run_dir)
    assert keys == ["k-123"] and os.environ["WANDB_DIR"] == run_dir and Path(run_dir).is_dir()
    assert Path(run_dir).name.startswith("p-")


def test_a_missing_matplotlib_skips_the_loss_plot_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes `import matplotlib.figure` fail
    monkeypatch.setattr(logger, "handlers", [])  # the trainer's logger may hold an earlier test's console handler
    monkeypatch.setattr(logger, "propagate", True)  # ... so let caplog see it
    reporter = TrainingReporter(total_steps=2, initial_step=0, is_main_process=True, interactive=False)
    reporter.train_step(1, 1, 0, 0.5, {"lr/unet": 1e-3})
    with caplog.at_level(logging.WARNING):
        reporter.write_pictures(tmp_path, "run")
        reporter.write_pictures(tmp_path, "run")
    assert caplog.text.count("no loss plot: matplotlib is not installed") == 1
    assert reporter.pictures == {} and not list(tmp_path.iterdir())


def test_training_loss_average_counts_every_gradient_accumulation_batch(tiny_setup, tmp_path):
    class Recording(AnimaNetworkTrainer):
        def train_step(self, args, batch):
            loss = super().train_step(args, batch)
            batch_losses.append((float(loss), self.accelerator.sync_gradients))
            return loss

    batch_losses: list[tuple[float, bool]] = []
    args, _ = parse_args(tiny_train_argv(tiny_setup, tmp_path / "out", "--max_train_steps", "5",
                                         "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3"))
    trainer = Recording()
    trainer.train(args)
    per_epoch = len(trainer.train_loader)  # 5 batches: steps of batches (0, 1), (2, 3), (4), then the next epoch
    slots: dict[int, float] = {}
    current, averages = [], []
    for i, (loss, sync) in enumerate(batch_losses):
        slots[i % per_epoch] = loss  # the same batch of the next epoch replaces it
        if sync:
            current.append(loss)
            averages.append(sum(slots.values()) / len(slots))
    assert len(current) == 5 and len(batch_losses) == 9
    assert trainer.reporter.history.loss == pytest.approx(current)
    assert trainer.reporter.history.average == pytest.approx(averages)
