"""One attack experiment on one batch: the threat model in order (client -> update -> attacker -> evaluator)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textleak.attacks import Attack, Reconstruction
from textleak.attacks.base import Progress
from textleak.client import GroundTruth
from textleak.defenses.client import defended_client
from textleak.metrics import BatchScores, score_batch
from textleak.models import LoadedModel
from textleak.update import Update


@dataclass
class BatchResult:
    """Everything one batch produced: what was sent, what came back, and how close it is to the truth."""

    update: Update
    reconstruction: Reconstruction
    truth: GroundTruth | None
    scores: BatchScores | None
    client_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "update": {
                "metadata": dataclasses.asdict(self.update.metadata),
                "tensors": len(self.update.gradients),
            },
            "truth": None if self.truth is None else dataclasses.asdict(self.truth),
            "reconstruction": self.reconstruction.to_dict(),
            "scores": None if self.scores is None else self.scores.to_dict(),
            "client_seconds": self.client_seconds,
        }


def attack_update(
    update: Update,
    target: LoadedModel,
    attack: Attack,
    *,
    truth: GroundTruth | None = None,
    progress: Progress | None = None,
    client_seconds: float = 0.0,
) -> BatchResult:
    """Run ``attack`` on ``update``; score against ``truth`` (the unmasked sentences) when it is known."""
    reconstruction = attack.reconstruct(update, target, progress=progress)
    scores = None
    if truth is not None:
        scores = score_batch(reconstruction.token_ids, [list(ids) for ids in truth.original_ids], target.tokenizer)
    return BatchResult(update, reconstruction, truth, scores, client_seconds)


def attack_sentences(
    target: LoadedModel,
    sentences: Sequence[str],
    attack: Attack,
    *,
    task: str = "mlm",
    seed: int = 0,
    labels: Sequence[int] | None = None,
    reveal: Sequence[str] = ("lengths",),
    defenses: Sequence[str] = (),
    save_update: str | Path | None = None,
    progress: Progress | None = None,
) -> BatchResult:
    """Simulate the (defended) client on ``sentences``, optionally save its update, attack it, score the result."""
    start = time.perf_counter()
    update, truth = defended_client(
        target, sentences, task=task, labels=labels, seed=seed, reveal=reveal, defenses=defenses
    )
    client_seconds = time.perf_counter() - start
    if save_update is not None:
        update.save(save_update)
    return attack_update(update, target, attack, truth=truth, progress=progress, client_seconds=client_seconds)
