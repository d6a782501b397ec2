"""DP-SGD (Abadi et al. 2016) as one training step computes it: per-example clipping, Gaussian noise, averaging.

Each example's gradient (over all trainable parameters together) is scaled to norm at most ``clip``, the clipped
gradients are summed, Gaussian noise of standard deviation ``sigma * clip`` is added to every entry, and the sum
is divided by the batch size. Per-example gradients come from one backward pass per example (Opacus' reference
method: exact for any model, B times the cost of a batch). The record carries the (epsilon, delta) that
``steps`` such steps at ``sample_rate`` imply under the RDP accountant (None when ``sigma`` is 0: no privacy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from textleak.defenses.accountant import dp_epsilon
from textleak.defenses.base import (
    ClientProcedure,
    Gradients,
    TrainingData,
    check_range,
    loss_gradients,
    trainable_parameters,
)

CLIP_EPSILON = 1e-6  # as in Opacus: the clipped norm stays strictly below ``clip``


def global_norm(gradients: Gradients) -> float:
    """The L2 norm of all tensors together."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in gradients.values()))


def clip_and_sum(per_example: Sequence[Gradients], clip: float) -> tuple[Gradients, list[float]]:
    """Sum of the per-example gradients, each scaled to norm <= ``clip``; and the norms before clipping."""
    norms = [global_norm(g) for g in per_example]
    summed = {name: torch.zeros_like(t) for name, t in per_example[0].items()}
    for gradients, norm in zip(per_example, norms, strict=True):
        factor = min(1.0, clip / (norm + CLIP_EPSILON))
        for name, tensor in gradients.items():
            summed[name] += factor * tensor
    return summed, norms


def per_example_gradients(model: torch.nn.Module, data: TrainingData) -> list[Gradients]:
    """One gradient per example of the batch, for every trainable parameter."""
    params = trainable_parameters(model)
    return [loss_gradients(model, params, data.loss_fn(model, example)) for example in data.examples]


@dataclass(frozen=True, kw_only=True)
class DPSGD(ClientProcedure):
    """Clip each example's gradient to ``clip``, add N(0, (sigma*clip)^2) to the sum, divide by the batch size."""

    name = "dpsgd"
    sigma: float = 1.0
    clip: float = 1.0
    sample_rate: float = 1.0
    steps: int = 1
    delta: float = 1e-5

    def __post_init__(self) -> None:
        check_range("sigma", self.sigma, 0.0)
        if not self.clip > 0:
            raise ValueError(f"option clip must be > 0, got {self.clip!r}")
        check_range("sample_rate", self.sample_rate, 0.0, 1.0)
        check_range("steps", self.steps, 1)
        if not 0 < self.delta < 1:
            raise ValueError(f"option delta must be in (0, 1), got {self.delta!r}")

    def epsilon(self) -> float | None:
        """The epsilon at ``delta`` of ``steps`` steps at ``sample_rate``; None without noise."""
        if self.sigma == 0:
            return None
        return dp_epsilon(sample_rate=self.sample_rate, sigma=self.sigma, steps=self.steps, delta=self.delta)[0]

    def record(self) -> dict[str, Any]:
        return {**super().record(), "epsilon": self.epsilon()}

    def __call__(self, model: torch.nn.Module, data: TrainingData, generator: torch.Generator) -> Gradients:
        if not data.examples:
            raise ValueError("DP-SGD needs at least one example")
        summed, _ = clip_and_sum(per_example_gradients(model, data), self.clip)
        std = self.sigma * self.clip
        return {
            name: (t + std * torch.randn(t.shape, generator=generator).to(t.device, t.dtype)) / len(data.examples)
            for name, t in summed.items()
        }
