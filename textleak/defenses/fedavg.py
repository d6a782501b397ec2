"""FedAvg's client (McMahan et al. 2017): k local SGD steps on the batch, then send ``W_local - W``.

The update is a weight delta, not a gradient (``kind="delta"``), and carries the local learning rate and step
count in ``local_hyperparams``: with one step the delta is exactly ``-lr`` times the gradient, with more it mixes
the gradients at k different weights, which is what makes the attack harder.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from textleak.defenses.base import ClientProcedure, Gradients, TrainingData, loss_gradients, trainable_parameters


@dataclass(frozen=True, kw_only=True)
class FedAvg(ClientProcedure):
    """Train a copy of the model ``steps`` full-batch SGD steps at ``lr`` and send the weight change."""

    name = "fedavg"
    steps: int = 1
    lr: float = 1e-2

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"option steps must be >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"option lr must be > 0, got {self.lr!r}")

    def metadata_changes(self) -> dict[str, Any]:
        return {"kind": "delta", "local_hyperparams": {"lr": self.lr, "steps": self.steps}}

    def __call__(self, model: torch.nn.Module, data: TrainingData, generator: torch.Generator) -> Gradients:
        local = copy.deepcopy(model)
        params = trainable_parameters(local)
        start = {name: p.detach().clone() for name, p in params.items()}
        for _ in range(self.steps):
            gradients = loss_gradients(local, params, data.loss_fn(local, data.batch))
            with torch.no_grad():
                for name, p in params.items():
                    p -= self.lr * gradients[name]
        return {name: p.detach() - start[name] for name, p in params.items()}
