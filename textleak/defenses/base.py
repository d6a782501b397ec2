"""What every defense shares: the two kinds of defense, the training data a client procedure sees, and records.

A *gradient transform* (noise, pruning, quantization, freezing) maps named tensors to named tensors and knows
nothing else. A *client procedure* (DP-SGD, FedAvg) replaces how the client computes its update, so it needs the
model, the batch and the loss; it still knows nothing about text or images: a batch is whatever ``loss_fn`` eats.
Every defense is a frozen keyword-only dataclass whose fields are its options; it records itself in
``Update.metadata.defenses`` so a result says exactly what produced it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from textleak.update import Update

Gradients = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class TrainingData:
    """A client's batch as a procedure needs it: whole, split into one-example batches, and the loss."""

    batch: Any
    examples: Sequence[Any]
    loss_fn: LossFn


class Defense:
    """Common part of every defense: its registry name and the record it leaves in the update's metadata."""

    name: ClassVar[str]

    def record(self) -> dict[str, Any]:
        """The defense's name and options as JSON-ready values."""
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


class GradientTransform(Defense):
    """A defense applied to the tensors a client is about to send."""

    def __call__(self, gradients: Gradients, generator: torch.Generator) -> Gradients:
        raise NotImplementedError


class ClientProcedure(Defense):
    """A defense that changes how the client computes its update from the model and its batch."""

    def __call__(self, model: torch.nn.Module, data: TrainingData, generator: torch.Generator) -> Gradients:
        raise NotImplementedError

    def metadata_changes(self) -> dict[str, Any]:
        """Changes to the update's metadata besides the defense record (e.g. ``kind="delta"``)."""
        return {}


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters a client trains (and so sends), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def loss_gradients(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], loss: torch.Tensor) -> Gradients:
    """Gradients of ``loss`` for ``params`` (zeros where unused), leaving ``.grad`` on the model untouched."""
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        name: (torch.zeros_like(p) if g is None else g.detach())
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


def apply_defense(
    update: Update,
    defense: Defense,
    generator: torch.Generator,
    *,
    model: torch.nn.Module | None = None,
    data: TrainingData | None = None,
) -> Update:
    """``update`` after ``defense``, with the defense appended to its metadata record."""
    if isinstance(defense, ClientProcedure):
        if model is None or data is None:
            raise ValueError(f"defense {defense.name!r} runs on the client and needs the model and its batch")
        gradients = defense(model, data, generator)
        changes = defense.metadata_changes()
    elif isinstance(defense, GradientTransform):
        gradients, changes = defense(update.gradients, generator), {}
    else:
        raise TypeError(
            f"{defense!r} neither transforms gradients nor computes a client's update; secure aggregation combines "
            "several clients' updates: use textleak.defenses.aggregate (or defended_client, which does it)"
        )
    return update.with_gradients(gradients, defenses=update.metadata.defenses + (defense.record(),), **changes)


def check_range(name: str, value: float, low: float, high: float = float("inf")) -> None:
    """Raise ValueError naming the option unless ``low <= value <= high``."""
    if not low <= value <= high:
        bounds = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise ValueError(f"option {name} must be {bounds}, got {value!r}")


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the option unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"option {name} must be one of {tuple(allowed)}, got {value!r}")
