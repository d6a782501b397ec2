"""The simulated image client: cross-entropy on a labelled batch -> the same ``Update`` the text client sends.

The update carries every parameter's gradient and metadata naming the image model (``image:<arch>:<data>``, head
``classification``); images have no sequence, so ``seq_len`` is 0. The ground truth is returned apart and never
enters the update. Defenses from ``textleak.defenses`` apply unchanged, in the order given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional

from image_support.models import ImageClassifier, load_image_model
from textleak.defenses.base import Defense, TrainingData, apply_defense
from textleak.models import ModelSource
from textleak.update import Knowledge, Update, UpdateMetadata


@dataclass(frozen=True)
class ImageTruth:
    """What only the evaluator may see: the client's images ([B, C, H, W] in [0, 1]) and labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __repr__(self) -> str:
        return f"ImageTruth(images={tuple(self.images.shape)}, labels={self.labels.tolist()})"


def classification_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of ``model`` on ``(images, labels)``: the loss every image client trains with."""
    images, labels = batch
    return functional.cross_entropy(model(images), labels)


def image_gradients(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named gradients of the mean cross-entropy; nothing accumulates in the model's ``.grad``."""
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(classification_loss(model, (images, labels)), params)
    return {name: grad.detach().clone() for name, grad in zip(names, grads, strict=True)}


def capture_image_update(
    source: ModelSource,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    labels_known: bool = False,
    defenses: Sequence[Defense] = (),
    client_seed: int = 0,
    model: ImageClassifier | None = None,
) -> tuple[Update, ImageTruth]:
    """The update a client computes on ``(images, labels)`` with the model ``source`` describes, and the truth.

    ``labels_known`` puts the labels in the attacker's knowledge (as in the papers' known-label settings).
    ``model`` reuses an already built model of ``source``.
    """
    model = load_image_model(source) if model is None else model
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(model.shape):
        raise ValueError(f"images must be [B, {', '.join(map(str, model.shape))}], got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must be [{images.shape[0]}], got {tuple(labels.shape)}")
    labels = labels.long()
    metadata = UpdateMetadata(
        model=source,
        task="classification",
        batch_size=images.shape[0],
        seq_len=0,
        knowledge=Knowledge(labels=tuple(labels.tolist()) if labels_known else None),
        client_seed=client_seed,
    )
    update = Update(image_gradients(model, images, labels), metadata)
    generator = torch.Generator().manual_seed(client_seed)
    data = TrainingData(
        batch=(images, labels),
        examples=[(images[i : i + 1], labels[i : i + 1]) for i in range(images.shape[0])],
        loss_fn=classification_loss,
    )
    for defense in defenses:
        update = apply_defense(update, defense, generator, model=model, data=data)
    return update, ImageTruth(images.detach().clone(), labels.clone())
