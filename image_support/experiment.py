"""One image experiment, read like the threat model: model -> client -> update -> attacker -> evaluator.

The CLI and ``scripts/bench_images.py`` both call ``attack_images``; the attacker sees only the update and the
model, and the evaluator alone joins the reconstruction with the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from image_support.attacks import IMAGE_ATTACKS, ImageReconstruction
from image_support.client import ImageTruth, capture_image_update
from image_support.datasets import ImageDataset
from image_support.metrics import evaluate_images
from image_support.models import SHAPES, image_source, load_image_model
from image_support.progress import SnapshotRecorder
from textleak.attacks.base import Progress
from textleak.defenses.base import Defense
from textleak.errors import unknown_name
from textleak.update import Update


@dataclass
class ImageRun:
    """What one experiment produced: the update sent, the truth, the reconstruction and its scores."""

    update: Update
    truth: ImageTruth
    reconstruction: ImageReconstruction
    scores: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "update": repr(self.update),
            "truth_labels": self.truth.labels.tolist(),
            "reconstruction": self.reconstruction.to_dict(),
            "scores": self.scores,
        }


def attack_images(
    dataset: ImageDataset,
    indices: Sequence[int],
    *,
    arch: str,
    attack: str,
    model_data: str | None = None,
    model_seed: int = 0,
    attack_options: dict[str, Any] | None = None,
    labels_known: bool = False,
    defenses: Sequence[Defense] = (),
    progress: Progress | None = None,
    snapshots: SnapshotRecorder | None = None,
    device: str | torch.device = "cpu",
) -> ImageRun:
    """Attack the update of a client holding ``dataset[indices]`` on model ``image:<arch>:<model_data>``.

    ``model_data`` defaults to the data set's name (its shape and normalisation), or the images' CxHxW. The client
    computes its update on the CPU; the attacker optimises on ``device``. ``snapshots`` records the reconstruction
    as it goes; its frames are put in the truth's order, like the scores.
    """
    if attack not in IMAGE_ATTACKS:
        raise unknown_name("image attack", attack, IMAGE_ATTACKS)
    items = [dataset[i] for i in indices]
    images = torch.stack([image for image, _ in items])
    labels = torch.tensor([label for _, label in items])
    if model_data is None:
        model_data = dataset.name if dataset.name in SHAPES else "x".join(str(s) for s in images.shape[1:])
    source = image_source(arch, model_data, seed=model_seed, num_labels=len(dataset.classes))
    model = load_image_model(source)
    update, truth = capture_image_update(
        source, images, labels, labels_known=labels_known, defenses=defenses, model=model
    )
    reconstruction = IMAGE_ATTACKS[attack](**(attack_options or {})).reconstruct(
        update, model.to(device), progress=progress, snapshots=snapshots
    )
    scores = evaluate_images(
        reconstruction.images, truth.images, recon_labels=reconstruction.labels, truth_labels=truth.labels.tolist()
    )
    if snapshots is not None:
        snapshots.reorder(scores["order"])
    return ImageRun(update, truth, reconstruction, scores)
