"""Sparsification: keep only the largest entries of each tensor (DLG's gradient pruning) or a random subset.

``ratio`` is the fraction of entries set to zero, as in DLG ("pruning ratio 20%"): of a tensor of n entries,
exactly ``n - round(ratio * n)`` survive. Top-k keeps those of largest magnitude (ties broken by position);
random masking keeps a uniformly random subset of that size drawn from the generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textleak.defenses.base import Gradients, GradientTransform, check_range


def kept_count(numel: int, ratio: float) -> int:
    """How many of ``numel`` entries survive pruning ``ratio`` of them."""
    return numel - round(ratio * numel)


def _keep(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    flat = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    flat[indices] = tensor.reshape(-1)[indices]
    return flat.reshape(tensor.shape)


@dataclass(frozen=True, kw_only=True)
class Prune(GradientTransform):
    """Zero the ``ratio`` smallest-magnitude entries of every tensor (top-k sparsification)."""

    name = "prune"
    ratio: float = 0.9

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0)

    def __call__(self, gradients: Gradients, generator: torch.Generator) -> Gradients:
        pruned = {}
        for name, tensor in gradients.items():
            k = kept_count(tensor.numel(), self.ratio)
            indices = torch.topk(tensor.detach().abs().reshape(-1), k, sorted=False).indices
            pruned[name] = _keep(tensor, indices)
        return pruned


@dataclass(frozen=True, kw_only=True)
class RandomMask(GradientTransform):
    """Zero a uniformly random ``ratio`` of the entries of every tensor."""

    name = "mask"
    ratio: float = 0.5

    def __post_init__(self) -> None:
        check_range("ratio", self.ratio, 0.0, 1.0)

    def __call__(self, gradients: Gradients, generator: torch.Generator) -> Gradients:
        masked = {}
        for name, tensor in gradients.items():
            k = kept_count(tensor.numel(), self.ratio)
            indices = torch.randperm(tensor.numel(), generator=generator)[:k].to(tensor.device)
            masked[name] = _keep(tensor, indices)
        return masked
