"""EDM preconditioning, noise distribution and sampler as SVD uses them (appendix A.1).

Small pure functions in the style of NVlabs' ``edm`` / k-diffusion. ``sigma`` is the noise
standard deviation; tensors broadcast, so ``sigma`` may be a scalar, ``[B]`` or already
shaped like the data (``[B, 1, 1, 1, 1]``).

SVD's network ``F`` is trained with a v-prediction-like target, which is why ``c_out`` has a
minus sign (Eq. 8): ``D(x; s) = x / (s^2 + 1) - s / sqrt(s^2 + 1) * F(x / sqrt(s^2 + 1); ln(s) / 4)``
is exactly what diffusers' ``EulerDiscreteScheduler`` computes for ``prediction_type =
"v_prediction"`` with ``timestep_type = "continuous"``.
"""

from __future__ import annotations

import math

import torch

# SVD img2vid's scheduler_config.json: sigma_min, sigma_max; Karras et al.'s rho.
SIGMA_MIN = 0.002
SIGMA_MAX = 700.0
RHO = 7.0
# Appendix A.1: log sigma ~ N(P_mean, P_std^2).
P_MEAN = 1.0
P_STD = 1.6


def c_in(sigma: torch.Tensor) -> torch.Tensor:
    """Input scaling ``1 / sqrt(s^2 + 1)`` (Eq. 7, appendix A.1)."""
    return 1.0 / torch.sqrt(sigma**2 + 1.0)


def c_out(sigma: torch.Tensor) -> torch.Tensor:
    """Output scaling ``-s / sqrt(s^2 + 1)`` (Eq. 8, appendix A.1; SVD's v-prediction sign)."""
    return -sigma / torch.sqrt(sigma**2 + 1.0)


def c_skip(sigma: torch.Tensor) -> torch.Tensor:
    """Skip scaling ``1 / (s^2 + 1)`` (Eq. 9, appendix A.1)."""
    return 1.0 / (sigma**2 + 1.0)


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """Noise conditioning fed to the network as its timestep: ``0.25 ln s`` (Eq. 10)."""
    return 0.25 * torch.log(sigma)


def loss_weight(sigma: torch.Tensor) -> torch.Tensor:
    """Loss weighting ``lambda(s) = (1 + s^2) / s^2`` (Eq. 11, appendix A.1)."""
    return (1.0 + sigma**2) / sigma**2


def sample_sigmas(
    batch_size: int,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise levels, ``ln s ~ N(P_mean, P_std^2)`` (appendix A.1, Algorithm 1 line 3).

    Returns:
        sigma [batch_size] float32
    """
    normal = torch.randn(batch_size, generator=generator, device=generator.device if generator else device)
    return torch.exp(p_mean + p_std * normal).to(device)


def karras_sigmas(
    num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> torch.Tensor:
    """Karras et al. (2022, Eq. 5) schedule from ``sigma_max`` down to ``sigma_min``, then 0.

    Returns:
        sigmas [num_steps + 1] float64, the last one 0 (the Euler step's final target).
    """
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_noise_scale(sigma_max: float = SIGMA_MAX) -> float:
    """Standard deviation of ``x_T = x_0 + sigma_max n`` for unit-variance data: ``sqrt(s^2 + 1)``
    (what diffusers' ``EulerDiscreteScheduler.init_noise_sigma`` is for SVD's config)."""
    return math.sqrt(sigma_max**2 + 1.0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Forward process ``x = x_0 + s n`` (Eq. 5's ``x_0 + n`` with ``n ~ N(0, s^2)``)."""
    return x0 + sigma * noise


def denoise(network_output: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The denoiser ``D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s))`` (Eq. 1 / Eq. 6),
    given ``F``'s output.

    Args:
        network_output: F(c_in x; c_noise), same shape as ``noisy``.
        noisy: x [B, F, C, h, w].  sigma: broadcastable to ``noisy``.
    Returns:
        predicted x_0, same shape as ``noisy``.
    """
    return c_skip(sigma) * noisy + c_out(sigma) * network_output


def denoising_loss(pred_x0: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Weighted denoising score matching, ``E[lambda(s) ||D(x_0 + n; s) - x_0||^2]`` (Eq. 5, 11).

    Args:
        pred_x0, x0: [B, ...].  sigma: broadcastable to them.
    Returns:
        scalar, the mean over every element.
    """
    return (loss_weight(sigma) * (pred_x0 - x0) ** 2).mean()


def euler_step(x: torch.Tensor, pred_x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE (Eq. 3 with Eq. 4's score):
    ``x' = x + (s' - s) (x - D(x; s)) / s``.
    """
    derivative = (x - pred_x0) / sigma
    return x + (sigma_next - sigma) * derivative


def broadcast_sigma(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """``[B]`` noise levels to ``[B, 1, ..., 1]`` with ``ndim`` dimensions in all."""
    return sigma.reshape(sigma.shape[0], *([1] * (ndim - 1)))
