"""EDM (Karras et al. 2022) pieces of the action head: noise schedule, training sigma
density, preconditioning scalings and the DDIM (first-order DPM-Solver) update.

Pure functions on tensors so that training, the PyTorch backend and the exported graphs
use the same arithmetic.
"""

from __future__ import annotations

import math

import torch


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``num_steps`` sigmas log-linearly from sigma_max to sigma_min, then a final 0 (CPU)."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, device="cpu").exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM scalings (c_skip, c_out, c_in) for noise level ``sigma``."""
    var = sigma**2 + sigma_data**2
    return sigma_data**2 / var, sigma * sigma_data / var.sqrt(), 1.0 / var.sqrt()


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One DDIM update from ``sigma`` to ``sigma_next`` given the denoised estimate.

    x_next = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * denoised; with
    sigma_next = 0 this is exactly ``denoised`` (no division by zero or inf).
    """
    ratio = sigma_next / sigma
    return ratio * x + (1.0 - ratio) * denoised


def sample_log_logistic(shape: tuple[int, ...], loc: float, scale: float, min_value: float, max_value: float,
                        generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Training sigmas from a log-logistic density truncated to [min_value, max_value]."""
    lo = torch.tensor(math.log(min_value), dtype=torch.float64).sub(loc).div(scale).sigmoid()
    hi = torch.tensor(math.log(max_value), dtype=torch.float64).sub(loc).div(scale).sigmoid()
    u = torch.rand(shape, dtype=torch.float64, generator=generator, device=device) * (hi - lo) + lo
    return u.logit().mul(scale).add(loc).exp().float()
