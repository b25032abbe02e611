"""Rectified-flow training math: σ sampling, the model's timestep, noisy input, target and loss weighting.

Convention: x_σ = (1 − σ)·x0 + σ·ε with σ ∈ [0, 1] (σ = 1 is pure noise); the model predicts the velocity
ε − x0 and receives t = σ (not 0…1000). Every function takes explicit parameters; the docstrings name the CLI
flag each one comes from so the trainer can pass ``args.<flag>`` straight through.
"""

from __future__ import annotations

import math

import torch

from library.errors import AnimaError, check_choice

TIMESTEP_SAMPLING_METHODS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform")

# Size of the discrete σ table used by `--timestep_sampling sigma` (the flow-match Euler scheduler's table).
NUM_TRAIN_TIMESTEPS = 1000

# flux_shift: μ is linear in the number of 2×2 latent patches, 0.5 at 256 patches and 1.15 at 4096 patches.
_FLUX_SHIFT_BASE_TOKENS, _FLUX_SHIFT_MAX_TOKENS = 256, 4096
_FLUX_SHIFT_BASE_MU, _FLUX_SHIFT_MAX_MU = 0.5, 1.15


def check_flow_matching_options(
    timestep_sampling: str = "sigmoid",
    weighting_scheme: str = "uniform",
    discrete_flow_shift: float = 1.0,
    logit_std: float = 1.0,
    ip_noise_gamma: float | None = None,
) -> None:
    """Validate the σ-sampling flags up front, so a bad value fails before models are loaded.

    Raises AnimaError naming the flag and the accepted values.
    """
    check_choice("--timestep_sampling", timestep_sampling, TIMESTEP_SAMPLING_METHODS)
    check_choice("--weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    if not discrete_flow_shift > 0:
        raise AnimaError(f"--discrete_flow_shift must be > 0 (got {discrete_flow_shift}); 1.0 means no shift")
    if not logit_std > 0:
        raise AnimaError(f"--logit_std must be > 0 (got {logit_std})")
    if ip_noise_gamma is not None and ip_noise_gamma < 0:
        raise AnimaError(f"--ip_noise_gamma must be >= 0 (got {ip_noise_gamma})")


def training_noise(latents: torch.Tensor) -> torch.Tensor:
    """ε ~ N(0, I) shaped like `latents`, in their dtype and device, drawn in row-major order whatever their memory
    layout: live VAE latents can come out channels-last, and a layout-preserving draw would place the same random
    stream differently (and, on the CPU, consume it differently), so a seed would give other ε and σ values."""
    return torch.randn_like(latents, memory_format=torch.contiguous_format)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """S(σ; s) = s·σ / (1 + (s − 1)·σ): moves mass towards noisier σ for s > 1; keeps 0 → 0 and 1 → 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_shift_mu(latent_height: int, latent_width: int) -> float:
    """μ of `--timestep_sampling flux_shift` for a latent of this size (patch count n = (h//2)·(w//2)).

    μ = m·n + b, the line through (256, 0.5) and (4096, 1.15), evaluated in this form (slope and intercept
    first) so that it is the same float as sd-scripts' value.
    """
    patches = (latent_height // 2) * (latent_width // 2)
    slope = (_FLUX_SHIFT_MAX_MU - _FLUX_SHIFT_BASE_MU) / (_FLUX_SHIFT_MAX_TOKENS - _FLUX_SHIFT_BASE_TOKENS)
    intercept = _FLUX_SHIFT_BASE_MU - slope * _FLUX_SHIFT_BASE_TOKENS
    return slope * patches + intercept


def flux_shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """The flux_shift map e^μ / (e^μ + (1/σ − 1)): S(σ; e^μ) written as sd-scripts evaluates it, so the float32
    result is the same bits (σ = 0 gives 0, σ = 1 gives 1)."""
    shift = math.exp(mu)
    return shift / (shift + (1 / sigmas - 1))


def discrete_sigma_table(discrete_flow_shift: float = 1.0) -> torch.Tensor:
    """σ table of `--timestep_sampling sigma`: table[j] = S((1000 − j)/1000; shift), j = 0…999, float32 [1000].

    Descending from 1 to S(0.001; shift); never 0.
    """
    base = torch.arange(NUM_TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    return shift_sigmas(base, discrete_flow_shift)


def _draw_device(generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.device:
    """Where a random draw happens: on the generator's device when one is given (a generator only feeds tensors
    on its own device), else on `device`, from that device's default generator."""
    return generator.device if generator is not None else torch.device(device)


def _density_u(
    batch_size: int, weighting_scheme: str, logit_mean: float, logit_std: float, mode_scale: float, generator
) -> torch.Tensor:
    """u ∈ [0, 1] drawn from the density the weighting scheme asks for (only `sigma` sampling uses this).

    Drawn on the CPU (or the generator's device) whatever the training device, as sd-scripts draws it."""
    if weighting_scheme == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, device=_draw_device(generator))
        return torch.sigmoid(logit_mean + logit_std * normal)
    u = torch.rand(batch_size, generator=generator, device=_draw_device(generator))
    if weighting_scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _to_device(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    if torch.device(device).type == "cuda" and values.device.type == "cpu":
        # From pinned memory the copy is queued behind the step's work; a pageable copy would wait for it.
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _draw_sigmas(batch_size: int, timestep_sampling: str, sigmoid_scale: float, discrete_flow_shift: float,
                 weighting_scheme: str, logit_mean: float, logit_std: float, mode_scale: float,
                 latent_size: tuple[int, int] | None, generator: torch.Generator | None,
                 device: torch.device | str) -> torch.Tensor:
    """σ [batch_size] float32 on `device`, before any rounding through the weight dtype."""
    check_flow_matching_options(timestep_sampling, weighting_scheme, discrete_flow_shift, logit_std)
    if timestep_sampling == "flux_shift" and latent_size is None:
        raise ValueError("flux_shift sampling needs latent_size=(h, w)")
    if timestep_sampling == "sigma":
        u = _density_u(batch_size, weighting_scheme, logit_mean, logit_std, mode_scale, generator)
        # u == 1 (mode scheme at u=0) or a mode_scale that pushes u outside [0, 1] would index off the table.
        indices = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        return _to_device(discrete_sigma_table(discrete_flow_shift).to(indices.device)[indices], device)
    draw_device = _draw_device(generator, device)
    if timestep_sampling == "uniform":
        sigmas = torch.rand(batch_size, generator=generator, device=draw_device)
    else:
        normal = torch.randn(batch_size, generator=generator, device=draw_device)
        sigmas = torch.sigmoid(sigmoid_scale * normal)
        if timestep_sampling == "shift":
            sigmas = shift_sigmas(sigmas, discrete_flow_shift)
        elif timestep_sampling == "flux_shift":
            sigmas = flux_shift_sigmas(sigmas, flux_shift_mu(*latent_size))
    return _to_device(sigmas, device)


def training_noise_levels(
    batch_size: int,
    timestep_sampling: str = "sigmoid",
    *,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 1.0,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    latent_size: tuple[int, int] | None = None,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
    weight_dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step's noise levels: (σ [B] float32 in [0, 1] for the noisy input and the loss weight, the
    DiT's timestep t [B] in the weight dtype). One σ is drawn per sample, then mapped into
    [--min_timestep, --max_timestep] by `restrict_to_timestep_range`.

    Parameters (CLI flag in brackets):
      timestep_sampling [--timestep_sampling]: "uniform" σ ~ U[0,1); "sigmoid" σ = sig(scale·N(0,1));
        "shift" = sigmoid then S(σ; discrete_flow_shift); "flux_shift" = sigmoid then S(σ; e^μ) with μ from the
        latent size; "sigma" = σ looked up in `discrete_sigma_table(discrete_flow_shift)` at index floor(1000·u),
        u drawn by the weighting scheme's density.
      sigmoid_scale [--sigmoid_scale]: multiplies the normal draw in sigmoid/shift/flux_shift.
      discrete_flow_shift [--discrete_flow_shift]: the shift s in shift and sigma modes.
      weighting_scheme, logit_mean, logit_std, mode_scale [--weighting_scheme, --logit_mean, --logit_std,
        --mode_scale]: only change the draw in sigma mode (logit_normal: u = sig(N(mean, std)); mode:
        u' = 1 − u − mode_scale·(cos²(πu/2) − 1 + u); others: u ~ U[0,1)).
      latent_size: (h, w) of the latent, required by flux_shift.
      weight_dtype: sigma mode only — σ is held in this dtype (the value is rounded through it, as the training
        recipe did), then returned as float32.
      generator: torch.Generator for reproducible draws, on its own device. Without one the draw uses the
        default generator of `device` (the training device, as sd-scripts draws), except in sigma mode, whose u
        is drawn on the CPU (as sd-scripts draws it) and the looked-up σ moved to `device`.
      min_timestep, max_timestep [--min_timestep, --max_timestep]: the σ range, in timesteps (0 … 1000).

    t is `model_timesteps` of the σ before it is rounded through the weight dtype: in sigma mode σ is rounded
    (sd-scripts looks it up in the weight dtype) while t = round(1000·σ)/1000 is rounded once, from the table
    value, as sd-scripts' scheduler timestep is; elsewhere σ stays float32.
    """
    sigmas = _draw_sigmas(batch_size, timestep_sampling, sigmoid_scale, discrete_flow_shift, weighting_scheme,
                          logit_mean, logit_std, mode_scale, latent_size, generator, device)
    sigmas = restrict_to_timestep_range(sigmas, min_timestep, max_timestep)
    timesteps = model_timesteps(sigmas, weight_dtype)
    if timestep_sampling == "sigma":
        sigmas = sigmas.to(weight_dtype).float()
    return sigmas, timesteps


VALIDATION_TIMESTEP_COUNT = 4  # sd-scripts' NUM_VALIDATION_TIMESTEPS


def validation_timesteps(min_timestep: int | None = None, max_timestep: int | None = None) -> list[int]:
    """The fixed timesteps every validation batch is scored at: the inner points of an even split of
    [--min_timestep, --max_timestep] (default [0, 1000]) into five parts, truncated to integers as sd-scripts
    computes them (200, 400, 600, 800 by default). Each pass sets both bounds to one of them, so σ = t / 1000."""
    low = 0 if min_timestep is None else min_timestep
    high = NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep
    step = (high - low) / (VALIDATION_TIMESTEP_COUNT + 1)
    return [int(i * step + low) for i in range(1, VALIDATION_TIMESTEP_COUNT + 1)]


def restrict_to_timestep_range(sigmas: torch.Tensor, min_timestep: int | None = None,
                               max_timestep: int | None = None) -> torch.Tensor:
    """Map σ ∈ [0, 1] linearly into [min_timestep, max_timestep] / 1000  [--min_timestep, --max_timestep].

    σ' = lo + (hi − lo)·σ keeps the shape of the chosen sampling inside the range (sd-scripts' SD3 trainer maps
    its draw the same way). Both None: σ unchanged. Equal bounds: every σ is that value.
    """
    if min_timestep is None and max_timestep is None:
        return sigmas
    low = (min_timestep or 0) / NUM_TRAIN_TIMESTEPS
    high = (NUM_TRAIN_TIMESTEPS if max_timestep is None else max_timestep) / NUM_TRAIN_TIMESTEPS
    if not 0 <= low <= high <= 1:
        raise AnimaError(f"--min_timestep {min_timestep} / --max_timestep {max_timestep}: need "
                         f"0 <= min <= max <= {NUM_TRAIN_TIMESTEPS}")
    return low + (high - low) * sigmas


def model_timesteps(sigmas: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """The t the DiT receives: (1000·σ) cast to the weight dtype, then / 1000 (result in the weight dtype).

    With bf16 this rounds σ to about 3 significant digits (σ=0.73456 → 0.734375), as the model was trained
    with; the noisy input keeps the unrounded σ. With float32 it is σ up to float rounding.
    """
    return (sigmas * NUM_TRAIN_TIMESTEPS).to(weight_dtype) / NUM_TRAIN_TIMESTEPS


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, …, 1] so it broadcasts against `like` ([B, C, H, W] or [B, C, T, H, W])."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def noisy_input(
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weight_dtype: torch.dtype = torch.float32,
    *,
    ip_noise_gamma: float | None = None,
    ip_noise_gamma_random_strength: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·(ε + γ'·ξ), cast to the weight dtype.

    x0, noise: [B, C, H, W] (or 5-D); sigmas: [B] (unrounded).
    ip_noise_gamma [--ip_noise_gamma]: input-perturbation strength γ; None or 0 disables it. ξ is a fresh normal
      draw in the weight dtype. The target stays ε − x0 (only the input is perturbed).
    ip_noise_gamma_random_strength [--ip_noise_gamma_random_strength]: γ' = U[0,1)·γ, one scalar per batch
      (drawn after ξ, in the weight dtype); otherwise γ' = γ.
    generator: drives the ξ and γ' draws (on the generator's device, else x0's); ξ ends on x0's device.
    """
    if ip_noise_gamma:
        # sd-scripts' order and dtypes: ξ first, then the strength, both in the weight dtype on x0's device.
        draw_device = _draw_device(generator, x0.device)
        xi = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=weight_dtype).to(x0.device)
        gamma: float | torch.Tensor = ip_noise_gamma
        if ip_noise_gamma_random_strength:
            strength = torch.rand(1, generator=generator, device=draw_device, dtype=weight_dtype)
            gamma = strength.to(x0.device) * ip_noise_gamma  # a [1] tensor: no host read
        noise = noise + gamma * xi
    s = _per_sample(sigmas, x0)
    return ((1 - s) * x0 + s * noise).to(weight_dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The prediction target: ε − x0 (rectified-flow velocity)."""
    return noise - x0


def loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight w(σ), float32 [B]  [--weighting_scheme].

    sigma_sqrt → σ⁻² (large near σ = 0); cosmap → 2 / (π·(1 − 2σ + 2σ²)); none, uniform, logit_normal and mode
    → 1 (the last two only change how σ is drawn in sigma mode).
    """
    sigmas = sigmas.float()
    if weighting_scheme == "sigma_sqrt":
        return sigmas**-2.0
    if weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    check_choice("--weighting_scheme", weighting_scheme, WEIGHTING_SCHEMES)
    return torch.ones_like(sigmas)


def sampling_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Euler sampling schedule: linspace(1, 0, steps + 1) shifted by S(σ; shift). float32 [steps + 1], 1 → 0.

    Step i integrates x ← x + v(x, σ_i)·(σ_{i+1} − σ_i). shift = 1 leaves the linear schedule unchanged.
    """
    if steps < 1:
        raise AnimaError(f"sampling steps must be >= 1 (got {steps})")
    if not shift > 0:
        raise AnimaError(f"sampling flow shift must be > 0 (got {shift})")
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32), shift)
