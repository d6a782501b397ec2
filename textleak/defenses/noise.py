"""Additive noise on every sent tensor: Gaussian or Laplacian, absolute or relative to the tensor's norm.

DLG found noise of variance around 1e-2 stops its attack but costs accuracy. ``sigma`` is the standard deviation
of the noise for both distributions (the Laplace scale is ``sigma / sqrt(2)``), so strengths compare directly.
With ``relative`` the standard deviation of each tensor's noise is ``sigma * ||g|| / sqrt(numel)`` (sigma times
the root mean square of its entries): the noise norm is then about ``sigma * ||g||`` whatever the tensor's scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from textleak.defenses.base import Gradients, GradientTransform, check_choice, check_range

DISTRIBUTIONS = ("gaussian", "laplace")


def standard_noise(shape: torch.Size, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """Zero-mean, unit-variance noise of ``shape`` drawn from ``generator``."""
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator)
    uniform = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    tail = torch.log1p(-2 * uniform.abs()).clamp_min(-745.0)  # rand() may return exactly 0: log(0) = -inf
    return (-uniform.sign() * tail / math.sqrt(2)).float()


@dataclass(frozen=True, kw_only=True)
class Noise(GradientTransform):
    """Add i.i.d. noise with standard deviation ``sigma`` (absolute, or relative to each tensor's RMS)."""

    name = "noise"
    sigma: float = 1e-3
    relative: bool = False
    distribution: str = "gaussian"

    def __post_init__(self) -> None:
        check_range("sigma", self.sigma, 0.0)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)

    def __call__(self, gradients: Gradients, generator: torch.Generator) -> Gradients:
        noisy = {}
        for name, tensor in gradients.items():
            std = self.sigma
            if self.relative:
                std *= float(tensor.norm()) / math.sqrt(max(tensor.numel(), 1))
            noise = standard_noise(tensor.shape, self.distribution, generator).to(tensor.device, tensor.dtype)
            noisy[name] = tensor + std * noise
        return noisy
