"""The shared gradient-matching loop: optimise dummy inputs until their gradient matches the observed one.

It knows nothing about text or images. A caller supplies how to draw the dummy tensors, how to turn them into
gradients (a differentiable function of the dummies), a distance, and the optimiser settings. The loop runs the
restarts, keeps the best iterate of each (L-BFGS without a line search can overshoot), and records the curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from textleak.attacks.base import Progress

Distance = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]
OPTIMIZERS = ("adam", "lbfgs")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Optimiser settings shared by every optimisation attack."""

    iterations: int = 300
    optimizer: str = "adam"
    lr: float = 0.01
    restarts: int = 1
    seed: int = 0
    grad_clip: float | None = None
    lr_drops: bool = False
    line_search: bool = False

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")


@dataclass
class LoopResult:
    """Best dummies over all restarts, with the curve of the winning restart."""

    leaves: list[torch.Tensor]
    loss: float
    curve: list[float]
    restart_losses: list[float]
    iterations: int
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def timings(self) -> dict[str, float]:
        """Wall-clock seconds in total and per iteration, and the iteration count, for a reconstruction."""
        return {
            "total_s": self.seconds,
            "iterations": self.iterations,
            "per_iteration_s": self.seconds / max(self.iterations, 1),
        }


def _make_optimizer(leaves: list[torch.Tensor], config: LoopConfig) -> torch.optim.Optimizer:
    if config.optimizer == "lbfgs":
        return torch.optim.LBFGS(
            leaves,
            lr=config.lr,
            max_iter=20,
            history_size=100,
            tolerance_grad=0.0,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe" if config.line_search else None,
        )
    return torch.optim.Adam(leaves, lr=config.lr)


def _lr_scale(step: int, total: int) -> float:
    """Inverting Gradients' schedule: divide the learning rate by 10 at 3/8, 5/8 and 7/8 of the budget."""
    return 0.1 ** sum(step >= total * f for f in (3 / 8, 5 / 8, 7 / 8))


def _run_restart(
    leaves: list[torch.Tensor],
    objective: Callable[[list[torch.Tensor]], torch.Tensor],
    config: LoopConfig,
    on_step: Callable[[int], None],
) -> tuple[float, list[torch.Tensor], list[float], str | None]:
    """One optimisation run from ``leaves``; returns the best loss, its iterate, the curve, and any warning."""
    optimizer = _make_optimizer(leaves, config)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    curve: list[float] = []
    best_loss, best_leaves = math.inf, [t.detach().clone() for t in leaves]

    def closure() -> torch.Tensor:
        loss = objective(leaves)
        # grad w.r.t. the dummies only: nothing accumulates in the model's own .grad
        for leaf, grad in zip(leaves, torch.autograd.grad(loss, leaves), strict=True):
            leaf.grad = grad
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(leaves, config.grad_clip)
        return loss

    for step in range(config.iterations):
        if config.lr_drops:
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * _lr_scale(step, config.iterations)
        before = [t.detach().clone() for t in leaves]
        loss = float(optimizer.step(closure).detach())
        if not math.isfinite(loss):
            return best_loss, best_leaves, curve, f"loss became non-finite at iteration {step}; kept the best iterate"
        curve.append(loss)
        if loss < best_loss:  # the loss was evaluated at the leaves before this step
            best_loss, best_leaves = loss, before
        on_step(step)
    final = float(objective(leaves).detach())
    if math.isfinite(final) and final < best_loss:
        best_loss, best_leaves = final, [t.detach().clone() for t in leaves]
    return best_loss, best_leaves, curve, None


def match_gradients(
    *,
    init: Callable[[torch.Generator], list[torch.Tensor]],
    dummy_gradients: Callable[[list[torch.Tensor]], Sequence[torch.Tensor]],
    target: Sequence[torch.Tensor],
    distance: Distance,
    config: LoopConfig,
    regulariser: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> LoopResult:
    """Minimise ``distance(dummy_gradients(leaves), target) + regulariser(leaves)`` over the leaves."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    total = config.iterations * config.restarts

    def objective(leaves: list[torch.Tensor]) -> torch.Tensor:
        loss = distance(dummy_gradients(leaves), target)
        return loss if regulariser is None else loss + regulariser(leaves)

    best: LoopResult | None = None
    restart_losses: list[float] = []
    warnings: list[str] = []
    for restart in range(config.restarts):
        leaves = [t.detach().clone().requires_grad_(True) for t in init(generator)]

        def on_step(step: int, offset: int = restart * config.iterations) -> None:
            if progress is not None:
                progress(offset + step + 1, total)

        loss, best_leaves, curve, warning = _run_restart(leaves, objective, config, on_step)
        if warning:
            warnings.append(f"restart {restart}: {warning}")
        restart_losses.append(loss)
        if best is None or loss < best.loss:
            best = LoopResult(best_leaves, loss, curve, restart_losses, 0, 0.0)
    assert best is not None
    best.restart_losses = restart_losses
    best.iterations = total
    best.seconds = time.perf_counter() - start
    best.warnings = warnings
    return best
