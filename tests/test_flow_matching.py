"""Flow-matching step math and losses: σ distributions vs their closed forms, timestep rounding, noisy input,
weighting, Huber schedules, masks, and parity with the golden loss tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library.data.images import conditioning_image_to_mask
from library.errors import AnimaError
from library.training.flow_matching import (
    TIMESTEP_SAMPLING_METHODS,
    discrete_sigma_table,
    flux_shift_mu,
    flux_shift_sigmas,
    loss_weighting,
    model_timesteps,
    noisy_input,
    sampling_sigmas,
    shift_sigmas,
    training_noise,
    training_noise_levels,
    velocity_target,
)
from library.training.losses import (
    apply_loss_mask,
    elementwise_loss,
    huber_threshold,
    per_sample_loss,
)

N = 100_000


def sample_sigmas(*args, **kwargs) -> torch.Tensor:
    """The σ of a training draw (without the timestep)."""
    return training_noise_levels(*args, **kwargs)[0]
# Empirical CDF at any point has std ≤ 0.5/√N ≈ 0.0016; 5 standard deviations.
CDF_TOL = 5 * 0.5 / math.sqrt(N)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _logit(x: float) -> float:
    return math.log(x / (1 - x))


def _draw(method: str, seed: int = 0, **kwargs) -> torch.Tensor:
    return sample_sigmas(N, method, generator=torch.Generator().manual_seed(seed), **kwargs)


def _check_cdf(sigmas: torch.Tensor, cdf, points=(0.05, 0.2, 0.4, 0.6, 0.8, 0.95)) -> None:
    for x in points:
        empirical = (sigmas <= x).double().mean().item()
        assert abs(empirical - cdf(x)) < CDF_TOL, (x, empirical, cdf(x))


def _check_mean_vs_normal_transform(sigmas: torch.Tensor, transform) -> None:
    """Compare the sample mean with E[transform(Z)], Z ~ N(0,1), by Gauss–Hermite quadrature."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    expected = float(np.sum(weights * transform(nodes)) / math.sqrt(2 * math.pi))
    tol = 5 * sigmas.double().std().item() / math.sqrt(N)
    assert abs(sigmas.double().mean().item() - expected) < tol, (sigmas.mean().item(), expected)


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_every_sampling_method_returns_float32_sigmas_in_unit_interval():
    for method in TIMESTEP_SAMPLING_METHODS:
        s = sample_sigmas(64, method, latent_size=(32, 48), generator=torch.Generator().manual_seed(1))
        assert s.shape == (64,) and s.dtype == torch.float32
        assert bool(((s >= 0) & (s <= 1)).all()), method


def test_sampling_is_reproducible_with_a_generator_and_varies_with_the_seed():
    a = sample_sigmas(16, "sigmoid", generator=torch.Generator().manual_seed(7))
    b = sample_sigmas(16, "sigmoid", generator=torch.Generator().manual_seed(7))
    c = sample_sigmas(16, "sigmoid", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_sampling_matches_uniform_distribution():
    s = _draw("uniform")
    _check_cdf(s, lambda x: x)
    assert abs(s.double().mean().item() - 0.5) < 5 * math.sqrt(1 / 12) / math.sqrt(N)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_sigmoid_sampling_matches_logit_normal_distribution(scale):
    s = _draw("sigmoid", sigmoid_scale=scale)
    _check_cdf(s, lambda x: _phi(_logit(x) / scale))
    _check_mean_vs_normal_transform(s, lambda z: _np_sigmoid(scale * z))


def test_shift_sampling_matches_shifted_logit_normal_distribution():
    shift, scale = 3.0, 1.2

    def cdf(x):  # S is increasing; its inverse is y = x / (s − (s − 1)·x)
        return _phi(_logit(x / (shift - (shift - 1) * x)) / scale)

    s = _draw("shift", sigmoid_scale=scale, discrete_flow_shift=shift)
    _check_cdf(s, cdf)
    _check_mean_vs_normal_transform(
        s, lambda z: shift * _np_sigmoid(scale * z) / (1 + (shift - 1) * _np_sigmoid(scale * z))
    )


def test_flux_shift_mu_is_linear_in_patch_count():
    assert flux_shift_mu(32, 32) == pytest.approx(0.5)  # 16·16 = 256 patches
    assert flux_shift_mu(128, 128) == pytest.approx(1.15)  # 64·64 = 4096 patches
    assert flux_shift_mu(64, 64) == pytest.approx(0.5 + (1024 - 256) * 0.65 / 3840)
    assert flux_shift_mu(65, 65) == flux_shift_mu(64, 64)  # odd sizes floor to whole patches


@pytest.mark.parametrize("latent_size", [(32, 32), (128, 96)])
def test_flux_shift_sampling_depends_on_resolution_as_formula(latent_size):
    shift = math.exp(flux_shift_mu(*latent_size))
    s = _draw("flux_shift", latent_size=latent_size)
    _check_cdf(s, lambda x: _phi(_logit(x / (shift - (shift - 1) * x))))
    _check_mean_vs_normal_transform(s, lambda z: shift * _np_sigmoid(z) / (1 + (shift - 1) * _np_sigmoid(z)))


def test_flux_shift_map_is_exp_mu_over_exp_mu_plus_odds_bit_for_bit():
    """flux_shift: σ' = e^μ / (e^μ + (1/σ − 1)), evaluated in that form (the same float32 bits as sd-scripts),
    and equal to the shift map S(σ; e^μ)."""
    torch.manual_seed(3)
    sigmas = torch.rand(1000)
    mu = flux_shift_mu(64, 96)
    slope = (1.15 - 0.5) / (4096 - 256)  # the line through (256, 0.5) and (4096, 1.15), as slope·n + intercept
    assert mu == slope * (32 * 48) + (0.5 - slope * 256)
    e = math.exp(mu)
    assert torch.equal(flux_shift_sigmas(sigmas, mu), e / (e + (1 / sigmas - 1)))
    torch.testing.assert_close(flux_shift_sigmas(sigmas, mu), shift_sigmas(sigmas, e))
    assert flux_shift_sigmas(torch.tensor([0.0, 1.0]), mu).tolist() == [0.0, 1.0]
    drawn = sample_sigmas(8, "flux_shift", latent_size=(64, 96), generator=torch.Generator().manual_seed(5))
    normal = torch.randn(8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, flux_shift_sigmas(torch.sigmoid(normal), mu))


def test_draws_without_a_generator_come_from_the_default_generator_in_order():
    """The trainer passes no generator: σ is the next draw of the global generator (sigmoid: one randn per
    sample, uniform: one rand, sigma: one rand or randn for u), nothing else is drawn."""
    for method, replay in (
        ("uniform", lambda: torch.rand(6)),
        ("sigmoid", lambda: torch.sigmoid(1.5 * torch.randn(6))),
        ("shift", lambda: shift_sigmas(torch.sigmoid(1.5 * torch.randn(6)), 3.0)),
        ("sigma", lambda: discrete_sigma_table(3.0)[(torch.rand(6) * 1000).long()]),
    ):
        torch.manual_seed(11)
        drawn = sample_sigmas(6, method, sigmoid_scale=1.5, discrete_flow_shift=3.0)
        after = torch.rand(3)
        torch.manual_seed(11)
        assert torch.equal(drawn, replay()), method
        assert torch.equal(after, torch.rand(3)), method


def test_sigma_mode_model_timestep_is_rounded_once_from_the_table_value():
    """sigma mode in bf16: σ (noisy input, loss weight) is the table value rounded to bf16; the DiT's t is
    round_bf16(1000·σ_table)/1000, one rounding of the unrounded table value."""
    table = discrete_sigma_table(3.0)
    u = torch.rand(4096, generator=torch.Generator().manual_seed(2))
    exact = table[(u * 1000).long()]
    sigmas, timesteps = training_noise_levels(4096, "sigma", discrete_flow_shift=3.0, weighting_scheme="uniform",
                                              weight_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sigmas, exact.to(torch.bfloat16).float())
    assert timesteps.dtype == torch.bfloat16
    assert torch.equal(timesteps, (exact * 1000).to(torch.bfloat16) / 1000)
    # Rounding σ first and then 1000·σ again would differ for some of these draws.
    assert not torch.equal(timesteps, model_timesteps(sigmas, torch.bfloat16))


def test_continuous_modes_keep_sigma_in_float32_and_round_only_the_timestep():
    sigmas, timesteps = training_noise_levels(64, "sigmoid", weight_dtype=torch.bfloat16,
                                              generator=torch.Generator().manual_seed(4))
    expected = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(4)))
    assert torch.equal(sigmas, expected)
    assert torch.equal(timesteps, model_timesteps(expected, torch.bfloat16))


def test_flux_shift_without_latent_size_is_rejected():
    with pytest.raises(ValueError, match="latent_size"):
        sample_sigmas(4, "flux_shift")


def test_discrete_sigma_table_is_the_shifted_descending_grid():
    table = discrete_sigma_table(3.0)
    assert table.shape == (1000,) and table[0].item() == 1.0
    assert table[-1].item() == pytest.approx(0.002994, abs=1e-6)
    j = torch.tensor([0, 250, 999])
    expected = shift_sigmas((1000 - j).float() / 1000, 3.0)
    torch.testing.assert_close(table[j], expected)
    assert bool((table[1:] < table[:-1]).all())


def _sigma_mode_cdf_at_table(s: torch.Tensor, table: torch.Tensor, u_tail) -> None:
    """σ ≤ table[j] ⇔ index ≥ j ⇔ u ≥ j/1000; u_tail(j) = P(u ≥ j/1000)."""
    for j in (100, 300, 500, 700, 900):
        empirical = (s <= table[j]).double().mean().item()
        assert abs(empirical - u_tail(j / 1000)) < CDF_TOL, (j, empirical, u_tail(j / 1000))


def test_sigma_sampling_with_uniform_density_picks_table_entries_uniformly():
    table = discrete_sigma_table(2.0)
    s = _draw("sigma", discrete_flow_shift=2.0, weighting_scheme="uniform")
    assert bool(torch.isin(s, table).all())
    _sigma_mode_cdf_at_table(s, table, lambda u: 1 - u)


def test_sigma_sampling_with_logit_normal_density_matches_formula():
    mean, std = 0.5, 0.8
    table = discrete_sigma_table(1.0)
    s = _draw("sigma", weighting_scheme="logit_normal", logit_mean=mean, logit_std=std)
    _sigma_mode_cdf_at_table(s, table, lambda u: 1 - _phi((_logit(u) - mean) / std))


def test_sigma_sampling_with_mode_density_matches_formula():
    mode_scale = 1.29

    def f(u):  # decreasing on [0, 1] for this mode_scale
        return 1 - u - mode_scale * (math.cos(math.pi * u / 2) ** 2 - 1 + u)

    def u_tail(v):  # P(f(U) ≥ v) = f⁻¹(v) for decreasing f, by bisection
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) >= v else (lo, mid)
        return lo

    table = discrete_sigma_table(1.0)
    s = _draw("sigma", weighting_scheme="mode", mode_scale=mode_scale)
    _sigma_mode_cdf_at_table(s, table, u_tail)


def test_sigma_sampling_stays_on_the_table_when_mode_density_leaves_unit_interval():
    # mode_scale -2 maps small u above 1 (u = 0.1 -> 1.05); the table index is clamped instead of overflowing.
    s = _draw("sigma", weighting_scheme="mode", mode_scale=-2.0)
    assert bool(torch.isin(s, discrete_sigma_table(1.0)).all())


def test_sigma_sampling_in_bf16_holds_table_values_rounded_to_bf16():
    s = _draw("sigma", discrete_flow_shift=3.0, weight_dtype=torch.bfloat16)
    assert s.dtype == torch.float32
    assert bool(torch.isin(s, discrete_sigma_table(3.0).to(torch.bfloat16).float()).all())


def test_density_schemes_do_not_change_sampling_outside_sigma_mode():
    plain = _draw("sigmoid", seed=3, weighting_scheme="uniform")
    for scheme in ("logit_normal", "mode"):
        assert torch.equal(plain, _draw("sigmoid", seed=3, weighting_scheme=scheme, logit_mean=1.0, mode_scale=2.0))


def test_unknown_sampling_or_scheme_or_bad_shift_names_the_flag():
    with pytest.raises(AnimaError, match="--timestep_sampling"):
        sample_sigmas(2, "logit")
    with pytest.raises(AnimaError, match="--weighting_scheme"):
        sample_sigmas(2, "sigma", weighting_scheme="snr")
    with pytest.raises(AnimaError, match="--discrete_flow_shift"):
        sample_sigmas(2, "shift", discrete_flow_shift=0.0)


def test_model_timesteps_round_through_bf16_like_training():
    t = model_timesteps(torch.tensor([0.73456, 0.2345]), torch.bfloat16)
    assert t.dtype == torch.bfloat16
    assert t.float().tolist() == [0.734375, 0.234375]
    t32 = model_timesteps(torch.tensor([0.73456, 0.2345]), torch.float32)
    torch.testing.assert_close(t32, torch.tensor([0.73456, 0.2345]))


def test_noisy_input_and_target_match_golden_tensors(golden_dir):
    g = load_file(str(golden_dir / "dit_tiny_golden.safetensors"))
    x_t = noisy_input(g["in.x0"], g["in.noise"], g["in.sigmas"])
    torch.testing.assert_close(x_t, g["in.noisy_latents"].squeeze(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(velocity_target(g["in.x0"], g["in.noise"]), g["out.target"], rtol=0, atol=1e-6)
    torch.testing.assert_close(model_timesteps(g["in.sigmas"], torch.float32), g["in.timesteps"])


def test_per_sample_l2_loss_matches_golden_loss(golden_dir):
    g = load_file(str(golden_dir / "dit_tiny_golden.safetensors"))
    weighting = loss_weighting("none", g["in.sigmas"])
    loss = per_sample_loss(g["out.model_pred"], g["out.target"], "l2", weighting=weighting)
    torch.testing.assert_close(loss, g["out.loss_per_sample"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.mean().reshape(1), g["out.loss"], rtol=1e-5, atol=1e-6)


def test_noisy_input_is_the_interpolation_cast_to_weight_dtype():
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    x_t = noisy_input(x0, noise, sigmas, torch.bfloat16)
    assert x_t.dtype == torch.bfloat16
    expected = torch.stack([x0[0], 0.75 * x0[1] + 0.25 * noise[1], noise[2]])
    torch.testing.assert_close(x_t, expected.to(torch.bfloat16))


def test_ip_noise_gamma_perturbs_only_the_input_with_a_fresh_draw():
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    sigmas = torch.tensor([0.3, 0.9])
    x_t = noisy_input(x0, noise, sigmas, ip_noise_gamma=0.1, generator=torch.Generator().manual_seed(5))
    xi = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * (noise + 0.1 * xi))


def test_ip_noise_gamma_random_strength_draws_xi_first_then_one_scalar_below_gamma():
    """sd-scripts' order: ξ ~ N(0, I), then γ' = U[0, 1)·γ (one scalar, in the weight dtype)."""
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    sigmas = torch.tensor([0.3, 0.9])
    x_t = noisy_input(
        x0,
        noise,
        sigmas,
        ip_noise_gamma=0.5,
        ip_noise_gamma_random_strength=True,
        generator=torch.Generator().manual_seed(9),
    )
    replay = torch.Generator().manual_seed(9)
    xi = torch.randn(x0.shape, generator=replay)
    gamma = torch.rand(1, generator=replay).item() * 0.5
    assert 0 <= gamma < 0.5
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * (noise + gamma * xi))


def test_ip_noise_gamma_draws_come_from_the_default_generator_in_sd_scripts_order():
    """Without a generator (the trainer): ξ then γ' from the global generator, ξ and γ' in the weight dtype."""
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    sigmas = torch.tensor([0.2, 0.6])
    torch.manual_seed(21)
    x_t = noisy_input(x0, noise, sigmas, torch.bfloat16, ip_noise_gamma=0.3, ip_noise_gamma_random_strength=True)
    after = torch.rand(2)
    torch.manual_seed(21)
    xi = torch.randn(x0.shape, dtype=torch.bfloat16)
    gamma = torch.rand(1, dtype=torch.bfloat16) * 0.3
    s = sigmas.view(-1, 1, 1, 1)
    assert torch.equal(x_t, ((1 - s) * x0 + s * (noise + gamma * xi)).to(torch.bfloat16))
    assert torch.equal(after, torch.rand(2))


def test_loss_weighting_matches_each_scheme_formula():
    sigmas = torch.linspace(0.01, 0.99, 50)
    torch.testing.assert_close(loss_weighting("sigma_sqrt", sigmas), sigmas**-2)
    expected_cosmap = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    torch.testing.assert_close(loss_weighting("cosmap", sigmas), expected_cosmap)
    assert loss_weighting("cosmap", torch.tensor([0.5])).item() == pytest.approx(4 / math.pi)
    for scheme in ("none", "uniform", "logit_normal", "mode"):
        assert torch.equal(loss_weighting(scheme, sigmas), torch.ones(50))
    with pytest.raises(AnimaError, match="--weighting_scheme"):
        loss_weighting("snr", sigmas)


def test_sampling_sigmas_run_from_one_to_zero_with_shift_formula():
    plain = sampling_sigmas(4)
    assert plain.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = sampling_sigmas(4, 3.0)
    assert shifted.shape == (5,) and shifted[0].item() == 1.0 and shifted[-1].item() == 0.0
    assert shifted[2].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert bool((shifted[1:] < shifted[:-1]).all())
    with pytest.raises(AnimaError):
        sampling_sigmas(0)


def test_loss_types_match_hand_computation():
    pred = torch.tensor([[[[1.0, -2.0]]], [[[0.5, 3.0]]]])  # [2, 1, 1, 2]
    target = torch.tensor([[[[0.0, 0.0]]], [[[1.5, 1.0]]]])
    c = torch.tensor([0.1, 2.0])
    d = [[1.0, -2.0], [-1.0, 2.0]]
    l2 = [[x * x for x in row] for row in d]
    l1 = [[abs(x) for x in row] for row in d]
    smooth = [[2 * (math.sqrt(x * x + ci * ci) - ci) for x in row] for row, ci in zip(d, c.tolist())]
    huber = [[ci * v for v in row] for row, ci in zip(smooth, c.tolist())]
    for loss_type, expected in (("l2", l2), ("l1", l1), ("huber", huber), ("smooth_l1", smooth)):
        got = elementwise_loss(pred, target, loss_type, c).reshape(2, 2)
        torch.testing.assert_close(got, torch.tensor(expected), msg=loss_type)
        per_sample = per_sample_loss(pred, target, loss_type, huber_c=c)
        torch.testing.assert_close(per_sample, torch.tensor(expected).mean(dim=1), msg=loss_type)


def test_loss_is_computed_in_float32_from_low_precision_inputs():
    pred = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    loss = per_sample_loss(pred, torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, pred.float().pow(2).mean(dim=(1, 2, 3)))


def test_huber_schedules_give_documented_thresholds():
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    c, scale = 0.1, 2.0
    torch.testing.assert_close(huber_threshold("constant", sigmas, c, scale), torch.full((3,), c * scale))
    torch.testing.assert_close(
        huber_threshold("exponential", sigmas, c, scale), torch.tensor([scale, scale * math.sqrt(c), scale * c])
    )
    torch.testing.assert_close(
        huber_threshold("snr", sigmas, c, scale), torch.tensor([scale, scale * (0.9 * 0.25 + 0.1), scale * c])
    )


def test_snr_huber_schedule_equals_diffusion_rule_with_flow_noise_to_signal_ratio():
    sigmas = torch.tensor([0.1, 0.4, 0.8])
    ratio = sigmas / (1 - sigmas)
    expected = (1 - 0.2) / (1 + ratio) ** 2 + 0.2
    torch.testing.assert_close(huber_threshold("snr", sigmas, 0.2, 1.0), expected)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_every_huber_schedule_runs_through_a_full_loss(schedule, loss_type):
    gen = torch.Generator().manual_seed(0)
    sigmas = sample_sigmas(4, "sigmoid", generator=gen)
    pred, target = torch.randn(4, 16, 4, 4, generator=gen), torch.randn(4, 16, 4, 4, generator=gen)
    loss = per_sample_loss(pred, target, loss_type, huber_c=huber_threshold(schedule, sigmas))
    assert loss.shape == (4,) and bool(torch.isfinite(loss).all()) and bool((loss > 0).all())


def test_huber_with_large_threshold_approaches_l2():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    # 2c(√(d² + c²) − c) = d² − d⁴/(4c²) + …: relative gap ≈ d²/(4c²) ≤ 1e-3 for |d| < 6, c = 100
    huber = per_sample_loss(pred, target, "huber", huber_c=torch.full((2,), 100.0))
    torch.testing.assert_close(huber, per_sample_loss(pred, target, "l2"), rtol=2e-3, atol=0)


def test_bad_huber_values_and_loss_type_name_the_flag():
    with pytest.raises(AnimaError, match="--huber_schedule"):
        huber_threshold("linear", torch.zeros(2))
    with pytest.raises(AnimaError, match="--huber_c"):
        huber_threshold("exponential", torch.zeros(2), huber_c=0.0)
    with pytest.raises(AnimaError, match="--loss_type"):
        elementwise_loss(torch.zeros(1), torch.zeros(1), "l3")


def test_weighting_mask_and_sample_weights_apply_in_order():
    pred = torch.ones(2, 2, 4, 4)
    target = torch.zeros(2, 2, 4, 4)
    mask = torch.zeros(2, 8, 8)
    mask[:, :, :4] = 1.0  # left half of the image kept
    loss = per_sample_loss(
        pred, target, weighting=torch.tensor([2.0, 3.0]), mask=mask, sample_weights=torch.tensor([1.0, 0.5])
    )
    torch.testing.assert_close(loss, torch.tensor([2.0 * 0.5, 3.0 * 0.5 * 0.5]))


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_mask_scales_the_elementwise_loss_not_the_difference(loss_type):
    # A mask of 0.5 halves each element's loss (ℓ(d)·m, not ℓ(d·m)), for every loss type.
    pred, target = torch.full((1, 1, 2, 2), 2.0), torch.zeros(1, 1, 2, 2)
    c = torch.tensor([0.3])
    full = {"l2": 4.0, "l1": 2.0, "huber": 2 * 0.3 * (math.sqrt(4 + 0.09) - 0.3),
            "smooth_l1": 2 * (math.sqrt(4 + 0.09) - 0.3)}[loss_type]
    loss = per_sample_loss(pred, target, loss_type, huber_c=c, mask=torch.full((1, 16, 16), 0.5))
    torch.testing.assert_close(loss, torch.tensor([0.5 * full]))


def test_loss_mask_is_area_resized_without_renormalisation():
    loss = torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]])
    torch.testing.assert_close(apply_loss_mask(loss, mask), torch.tensor([[[[0.25, 1.0], [0.5, 0.25]]]]))


def test_conditioning_image_mask_uses_red_channel_mapped_to_unit_range():
    image = torch.stack([torch.full((2, 2), -1.0), torch.ones(2, 2), torch.ones(2, 2)]).unsqueeze(0)
    image[0, 0, 0, 0] = 1.0
    mask = conditioning_image_to_mask(image)
    assert mask.shape == (1, 1, 2, 2)
    torch.testing.assert_close(mask, torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))


def test_training_noise_is_drawn_in_row_major_order_for_any_latent_layout():
    latents = torch.zeros(2, 16, 10, 6).to(memory_format=torch.channels_last)  # as live VAE latents can be
    torch.manual_seed(3)
    noise = training_noise(latents)
    after = torch.randn(2)
    torch.manual_seed(3)
    expected = torch.randn(2, 16, 10, 6)
    assert noise.is_contiguous() and noise.dtype == latents.dtype
    assert torch.equal(noise, expected)
    assert torch.equal(after, torch.randn(2))  # the next draw (σ) sees the same generator state
