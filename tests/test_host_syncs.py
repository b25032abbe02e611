"""One device-to-host read in a steady-state training step, the non-finite guard's flag: masks, loss reporting and
optimizers stay on the device.

Counted with the dispatch/function-mode counter of bench/bench_host_syncs.py (exact counts, not times).
"""

from __future__ import annotations

import pytest
import torch

from bench.bench_host_syncs import FP16_LOSS_SCALER_FLAGS, OPTIMIZERS, HostSyncCounter, count_run
from library.models.dit import LLMAdapter
from library.training import reporting
from library.training.reporting import TrainingReporter, read_scalars


def test_masked_adapter_attention_reads_nothing_back_and_still_zeroes_empty_prompts():
    torch.manual_seed(0)
    adapter = LLMAdapter(source_dim=16, model_dim=16, num_layers=2, num_heads=2, mlp_channels=32, vocab=50)
    source = torch.randn(2, 5, 16)
    ids = torch.randint(0, 50, (2, 4))
    source_mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])  # sample 1: empty prompt
    target_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with HostSyncCounter() as counter:
        out = adapter(source, ids, target_mask, source_mask)
    assert counter.total == 0, counter.sites
    assert torch.isfinite(out).all()
    # The empty prompt's cross-attention contributes exactly nothing: same output as with any other source.
    again = adapter(torch.randn(2, 5, 16), ids, target_mask, source_mask)
    torch.testing.assert_close(out[1], again[1])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_training_step_reads_the_device_once_for_the_guard_loss_and_logs_together(optimizer, tiny_setup,
                                                                                     tmp_path):
    steps = 8
    counter = count_run(tiny_setup, tmp_path, OPTIMIZERS[optimizer], warmup=2, steps=steps)
    # The non-finite guard reads one flag per optimizer step: whether to apply the update (it must decide before
    # the optimizer steps). The step's loss and the reporter's queued values travel in the same transfer, also
    # across the epoch boundaries (4 steps per epoch here): one read per step in all.
    assert counter.total == steps, counter.sites
    assert all(site.startswith("tolist") and "train_network.py" in site for site in counter.sites), counter.sites


def test_an_fp16_loss_scaler_adds_exactly_its_own_inf_check_per_step(tiny_setup, tmp_path):
    """With a loss scaler (CUDA fp16) torch's GradScaler reads its inf flag before letting the optimizer step: one
    more read per step, from the scaler, and nothing else."""
    steps = 8
    counter = count_run(tiny_setup, tmp_path, FP16_LOSS_SCALER_FLAGS, warmup=2, steps=steps, loss_scaler=True)
    assert counter.total == 2 * steps, counter.sites
    assert dict(counter.counts) == {"tolist": steps, "_local_scalar_dense": steps}, counter.sites


def test_reporter_reads_queued_losses_at_once_and_prints_the_same_lines(monkeypatch, capsys):
    monkeypatch.setattr(reporting, "LOSS_READ_INTERVAL", 3)
    reporter = TrainingReporter(total_steps=7, initial_step=0, is_main_process=True, interactive=False)
    losses = [0.5, 0.25, 0.125, 1.0, 2.0]
    with HostSyncCounter() as counter:
        for step, loss in enumerate(losses[:2], start=1):
            reporter.train_step(step, 1, step - 1, torch.tensor(loss), {"lr/unet": torch.tensor(1e-3)})
        assert capsys.readouterr().out == ""  # queued, not read
        reporter.train_step(3, 1, 2, torch.tensor(losses[2]), {"lr/unet": 2e-3})  # the third step reads all
    assert counter.total == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" 0.")[0] for line in lines] == [
        "step 1/7 epoch 1 loss=0.5000 avr_loss=0.5000 lr=0.001",
        "step 2/7 epoch 1 loss=0.2500 avr_loss=0.3750 lr=0.001",
        "step 3/7 epoch 1 loss=0.1250 avr_loss=0.2917 lr=0.002",
    ]
    reporter.train_step(4, 1, 3, torch.tensor(losses[3]), {})
    assert reporter.epoch_average() == pytest.approx(sum(losses[:4]) / 4)  # reads the queued step first
    reporter.train_step(5, 2, 0, torch.tensor(losses[4]), {})  # the next epoch's first batch replaces the first
    reporter.message("saved something")  # any other output comes after the queued steps' lines
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("step 5/7 epoch 2 loss=2.0000 avr_loss=0.8438")
    reporter.close()


def test_read_scalars_keeps_float32_values_and_plain_floats():
    values = [torch.tensor(0.1), 0.3, torch.tensor(1 / 3, dtype=torch.float64), torch.tensor(2.5).bfloat16()]
    assert read_scalars(values) == [torch.tensor(0.1).item(), 0.3, torch.tensor(1 / 3).item(), 2.5]


def test_loader_pins_batches_only_when_cuda_is_available(monkeypatch, tiny_setup, tmp_path):
    from train_helpers import tiny_train_argv, trainer_through_caches

    from library.data.config import make_dataloader

    trainer = trainer_through_caches(tiny_train_argv(tiny_setup, tmp_path))
    loader = make_dataloader(trainer.train_group, num_workers=0, persistent_workers=False, seed=0)
    assert loader.pin_memory is False  # CPU: pinning would only cost memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loader = make_dataloader(trainer.train_group, num_workers=0, persistent_workers=False, seed=0)
    assert loader.pin_memory is True  # CUDA: page-locked batches for the trainer's non_blocking copies


def test_sigma_mode_sigmas_reach_cuda_through_a_pinned_non_blocking_copy(monkeypatch):
    """sigma mode looks σ up on the CPU (its u is a CPU draw, as in sd-scripts): one pinned non_blocking copy."""
    from library.training import flow_matching

    copies = []

    def fake_pin(self):
        copies.append("pinned")
        return self

    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cuda":
            copies.append(("cuda", kwargs.get("non_blocking", False)))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    flow_matching.training_noise_levels(2, "sigma", device="cuda")
    assert copies == ["pinned", ("cuda", True)]


@pytest.mark.parametrize("method", ["uniform", "sigmoid", "shift", "flux_shift"])
def test_continuous_sigmas_are_drawn_on_the_training_device(monkeypatch, method):
    """As sd-scripts: the σ draw uses the training device's generator, so nothing is copied to the device."""
    from library.training import flow_matching

    draws, copies = [], []

    def fake_draw(*size, generator=None, device=None, **kwargs):
        draws.append(torch.device(device))
        return torch.full(size, 0.5, device="meta")

    monkeypatch.setattr(torch, "rand", fake_draw)
    monkeypatch.setattr(torch, "randn", fake_draw)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: copies.append("pinned") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append((a, k)) or self)
    flow_matching.training_noise_levels(2, method, latent_size=(8, 8), device="cuda")
    assert draws == [torch.device("cuda")]
    assert "pinned" not in copies


def test_prepared_loaders_send_batches_to_the_device_without_blocking(monkeypatch, tiny_setup, tmp_path):
    """accelerate moves every batch to the device; a blocking copy from the pinned batch would synchronise the
    stream (wait for the whole queued step) once per batch tensor on CUDA."""
    import accelerate.data_loader
    from train_helpers import tiny_train_argv

    from anima_train_network import AnimaNetworkTrainer
    from library.training.args import parse_args

    sends = []
    real_send = accelerate.data_loader.send_to_device

    def recording_send(batch, device, non_blocking=False, skip_keys=None):
        sends.append(non_blocking)
        return real_send(batch, device, non_blocking=non_blocking, skip_keys=skip_keys)

    monkeypatch.setattr(accelerate.data_loader, "send_to_device", recording_send)
    args, _ = parse_args(tiny_train_argv(tiny_setup, tmp_path, "--max_train_steps", "2", "--validation_split",
                                         "0.25", "--validate_every_n_steps", "2"))
    trainer = AnimaNetworkTrainer()
    trainer.train(args)
    assert trainer.train_loader._non_blocking and trainer.val_loader._non_blocking
    assert len(sends) >= 3 and all(sends), sends  # training and validation batches


def test_a_device_condition_is_warned_about_with_the_next_read_and_costs_no_read_of_its_own(caplog):
    reporter = TrainingReporter(total_steps=3, initial_step=0, is_main_process=True, interactive=False)
    with HostSyncCounter() as counter:
        reporter.warn_if(torch.tensor(True), "NaN in VAE latents of ['a']; replaced by 0")
        reporter.warn_if(torch.tensor(False), "NaN in VAE latents of ['b']; replaced by 0")
        assert counter.total == 0 and "NaN" not in caplog.text  # nothing read yet
        flag, loss = reporter.read_with(torch.tensor(1.0), torch.tensor(0.5))
    assert counter.total == 1 and (flag, loss) == (1.0, 0.5)
    assert "['a']" in caplog.text and "['b']" not in caplog.text
    reporter.close()


def test_live_vae_latents_with_nan_become_zero_and_are_warned_about(tiny_setup, tmp_path, caplog):
    from train_helpers import tiny_train_argv, trainer_through_caches

    argv = [a for a in tiny_train_argv(tiny_setup, tmp_path) if a != "--cache_latents"]
    trainer = trainer_through_caches(argv)
    batch = trainer.train_group[0]
    assert batch.get("latents") is None  # encoded live
    trainer.vae.encode_pixels_to_latents = lambda pixels, check_range=True: torch.full(
        (pixels.shape[0], 16, pixels.shape[-2] // 8, pixels.shape[-1] // 8), float("nan"))
    trainer.reporter = TrainingReporter(total_steps=1, initial_step=0, is_main_process=True, interactive=False)
    latents = trainer.batch_latents(batch)
    assert torch.equal(latents, torch.zeros_like(latents)) and "NaN" not in caplog.text
    trainer.reporter.read_with(torch.tensor(1.0))
    assert "NaN in VAE latents" in caplog.text
    trainer.reporter.close()
