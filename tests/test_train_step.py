"""The Anima training step passes each flag to the math: σ sampling, shift, weighting, ip noise, loss type."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from anima_train_network import AnimaNetworkTrainer
from library.training.args import parse_args


class RecordingDiT(torch.nn.Module):
    """Stands in for the DiT: records its inputs and predicts zeros."""

    def encode_text(self, qwen3_embeds, qwen3_mask, t5_ids, t5_mask):
        return torch.zeros(t5_ids.shape[0], t5_ids.shape[1], 4)

    def forward(self, x, timesteps, context, padding_mask=None):
        self.x, self.timesteps = x, timesteps
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def step(accelerator, *argv, batch=64, seed=0):
    args, _ = parse_args(list(argv))
    trainer = AnimaNetworkTrainer()
    trainer.dit = RecordingDiT()
    trainer.accelerator, trainer.weight_dtype = accelerator, torch.float32
    torch.manual_seed(seed)
    latents = torch.randn(batch, 16, 4, 4)
    text = {"qwen3_embeds": torch.zeros(batch, 3, 8), "qwen3_mask": torch.ones(batch, 3, dtype=torch.long),
            "t5_ids": torch.ones(batch, 5, dtype=torch.long), "t5_mask": torch.ones(batch, 5, dtype=torch.long)}
    out = trainer.noise_pred_and_target(args, latents, text)
    pred, target, sigmas, weighting = out.prediction, out.target, out.sigmas, out.weighting
    return trainer.dit, latents, pred, target, sigmas, weighting


def test_shift_moves_sigma_towards_noise(accelerator):
    _, _, _, _, plain, _ = step(accelerator, "--timestep_sampling", "sigmoid")
    _, _, _, _, shifted, _ = step(accelerator, "--timestep_sampling", "shift", "--discrete_flow_shift", "3")
    assert shifted.mean() > plain.mean() + 0.1


def test_model_sees_sigma_and_the_noisy_latent(accelerator):
    dit, latents, _, target, sigmas, _ = step(accelerator, "--timestep_sampling", "uniform")
    torch.testing.assert_close(dit.timesteps, sigmas)
    noise = target + latents  # target = noise - x0
    expected = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(dit.x.squeeze(2), expected)


def test_ip_noise_changes_the_input_but_not_the_target(accelerator):
    dit, latents, _, target, sigmas, _ = step(accelerator, "--ip_noise_gamma", "0.5")
    noise = target + latents
    plain = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
    assert (dit.x.squeeze(2) - plain).abs().max() > 1e-2


def test_weighting_scheme_sets_the_loss_weight(accelerator):
    *_, sigmas, weighting = step(accelerator, "--weighting_scheme", "sigma_sqrt")
    torch.testing.assert_close(weighting, sigmas.float() ** -2)
    *_, weighting = step(accelerator, "--weighting_scheme", "none")
    assert torch.equal(weighting, torch.ones_like(weighting))


def test_loss_type_changes_the_batch_loss(accelerator):
    def loss_for(*argv):
        args, _ = parse_args(list(argv))
        trainer = AnimaNetworkTrainer()
        trainer.dit, trainer.accelerator, trainer.weight_dtype, trainer.train_te = RecordingDiT(), accelerator, \
            torch.float32, False
        batch = {"latents": torch.randn(2, 16, 4, 4), "loss_weights": torch.ones(2), "loss_masks": None,
                 "text": {"qwen3_embeds": torch.zeros(2, 3, 8), "qwen3_mask": torch.ones(2, 3, dtype=torch.long),
                          "t5_ids": torch.ones(2, 5, dtype=torch.long), "t5_mask": torch.ones(2, 5, dtype=torch.long)}}
        torch.manual_seed(0)
        return trainer.batch_loss(args, batch, training=False).item()

    l2 = loss_for("--loss_type", "l2")
    l1 = loss_for("--loss_type", "l1")
    huber = loss_for("--loss_type", "huber", "--huber_schedule", "constant", "--huber_c", "0.1")
    assert len({round(l2, 6), round(l1, 6), round(huber, 6)}) == 3
    assert huber < l1  # huber with small c behaves like c·l1 scaled: much smaller than l1


def test_random_ip_noise_strength_scales_the_perturbation_by_a_draw_below_one(accelerator):
    def perturbation(seed, *argv):
        dit, latents, _, target, sigmas, _ = step(accelerator, "--timestep_sampling", "uniform", *argv, seed=seed)
        noise = target + latents
        plain = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        return (dit.x.squeeze(2) - plain).flatten(1).norm(dim=1).mean()

    # One strength in [0, gamma) per batch (as in sd-scripts): the perturbation shrinks by a different factor per draw.
    ratios = [float(perturbation(seed, "--ip_noise_gamma", "0.5", "--ip_noise_gamma_random_strength")
                    / perturbation(seed, "--ip_noise_gamma", "0.5")) for seed in range(4)]
    assert all(0 < r < 1 for r in ratios), ratios
    assert max(ratios) - min(ratios) > 0.05, ratios


def make_batch(loss_masks):
    return {"latents": torch.randn(2, 16, 4, 4), "loss_weights": torch.ones(2), "loss_masks": loss_masks,
            "text": {"qwen3_embeds": torch.zeros(2, 3, 8), "qwen3_mask": torch.ones(2, 3, dtype=torch.long),
                     "t5_ids": torch.ones(2, 5, dtype=torch.long), "t5_mask": torch.ones(2, 5, dtype=torch.long)}}


def test_loss_masks_of_the_batch_weight_the_loss(accelerator):
    args, _ = parse_args(["--masked_loss"])
    trainer = AnimaNetworkTrainer()
    trainer.dit, trainer.accelerator, trainer.weight_dtype, trainer.train_te = RecordingDiT(), accelerator, \
        torch.float32, False

    def loss(masks):
        torch.manual_seed(0)
        return trainer.batch_loss(args, make_batch(masks), training=False).item()

    full = loss(None)
    assert loss(torch.ones(2, 1, 32, 32)) == pytest.approx(full)
    assert loss(torch.zeros(2, 1, 32, 32)) == 0.0
    half = torch.ones(2, 1, 32, 32)
    half[..., 16:] = 0
    assert 0.2 * full < loss(half) < 0.8 * full


def test_step_draws_noise_then_sigma_then_ip_noise_from_the_global_generator(accelerator):
    """sd-scripts' draw order and dtypes under a 16-bit weight dtype: ε in the latents' dtype (float32 from the
    cache), σ, ξ and the strength in the weight dtype; the DiT gets the bf16 input and t = round(1000σ)/1000,
    the loss compares with the float32 target ε − x0."""
    args, _ = parse_args(["--timestep_sampling", "shift", "--discrete_flow_shift", "2", "--ip_noise_gamma", "0.2",
                          "--ip_noise_gamma_random_strength"])
    trainer = AnimaNetworkTrainer()
    trainer.dit = RecordingDiT()
    trainer.accelerator, trainer.weight_dtype = accelerator, torch.bfloat16
    latents = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    text = {"qwen3_embeds": torch.zeros(3, 3, 8), "qwen3_mask": torch.ones(3, 3, dtype=torch.long),
            "t5_ids": torch.ones(3, 5, dtype=torch.long), "t5_mask": torch.ones(3, 5, dtype=torch.long)}
    torch.manual_seed(8)
    out = trainer.noise_pred_and_target(args, latents, text)
    after = torch.rand(2)

    torch.manual_seed(8)
    noise = torch.randn_like(latents)
    sig = torch.sigmoid(torch.randn(3))
    sig = 2 * sig / (1 + sig)
    xi = torch.randn(latents.shape, dtype=torch.bfloat16)
    gamma = torch.rand(1, dtype=torch.bfloat16) * 0.2
    s = sig.view(-1, 1, 1, 1)
    assert torch.equal(out.sigmas, sig)
    assert torch.equal(trainer.dit.x.squeeze(2), ((1 - s) * latents + s * (noise + gamma * xi)).to(torch.bfloat16))
    assert torch.equal(trainer.dit.timesteps, (sig * 1000).to(torch.bfloat16) / 1000)
    assert out.target.dtype == torch.float32 and torch.equal(out.target, noise - latents)
    assert torch.equal(after, torch.rand(2))


def test_cached_latents_enter_the_step_in_float32_under_a_16_bit_weight_dtype(accelerator):
    trainer = AnimaNetworkTrainer()
    trainer.accelerator, trainer.weight_dtype = accelerator, torch.bfloat16
    cached = torch.randn(2, 16, 4, 4)
    latents = trainer.batch_latents({"latents": cached})
    assert latents.dtype == torch.float32 and torch.equal(latents, cached)
