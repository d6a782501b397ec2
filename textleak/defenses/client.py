"""The text client with defenses: what a defended deployment sends for a batch of sentences.

This is the only text-aware part of ``textleak.defenses``: it turns sentences into the ``TrainingData`` a client
procedure needs (``encode_request``, one-example batches, ``batch_loss``), then applies the defenses in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textleak.client import (
    ClientBatch,
    GroundTruth,
    batch_gradients,
    batch_loss,
    encode_request,
    package_update,
)
from textleak.defenses import as_defenses
from textleak.defenses.base import ClientProcedure, Defense, TrainingData, apply_defense
from textleak.defenses.secure_aggregation import SecureAggregation, aggregate
from textleak.models import LoadedModel
from textleak.tasks import IGNORE_INDEX
from textleak.update import Update


def text_loss(model: torch.nn.Module, batch: ClientBatch) -> torch.Tensor:
    """``batch_loss``, or a zero with no gradient when no slot is labelled (an MLM example with nothing masked)."""
    if not bool((batch.labels != IGNORE_INDEX).any()):
        return torch.zeros((), requires_grad=True)
    return batch_loss(model, batch)


def text_training_data(batch: ClientBatch) -> TrainingData:
    """A text batch as client procedures see it."""
    return TrainingData(batch=batch, examples=[batch.select(i) for i in range(len(batch))], loss_fn=text_loss)


def check_order(defenses: Sequence[Defense]) -> None:
    """Refuse orders no deployment has: a procedure after a transform, two procedures, aggregation not last."""
    procedures = [i for i, d in enumerate(defenses) if isinstance(d, ClientProcedure)]
    aggregations = [i for i, d in enumerate(defenses) if isinstance(d, SecureAggregation)]
    names = [d.name for d in defenses]
    if len(procedures) > 1:
        raise ValueError(f"at most one client procedure (dpsgd, fedavg) can compute the update; got {names}")
    if procedures and procedures[0] != 0:
        raise ValueError(f"a client procedure computes the update from scratch, so it must come first; got {names}")
    if aggregations and aggregations != [len(defenses) - 1]:
        raise ValueError(f"secure-aggregation sums what the clients send, so it must come last, once; got {names}")


def _one_client(
    target: LoadedModel,
    sentences: Sequence[str],
    defenses: Sequence[Defense],
    *,
    task: str,
    labels: Sequence[int] | None,
    seed: int,
    max_length: int | None,
    mlm_probability: float,
    reveal: Sequence[str],
) -> tuple[Update, GroundTruth]:
    batch, original = encode_request(
        target,
        sentences,
        task=task,
        labels=labels,
        seed=seed,
        max_length=max_length,
        mlm_probability=mlm_probability,
        reveal=reveal,
    )
    procedure = bool(defenses) and isinstance(defenses[0], ClientProcedure)
    # a client procedure (dpsgd, fedavg) computes the update itself: the plain gradient would be thrown away
    gradients = {} if procedure else batch_gradients(target.model, batch)
    update, truth = package_update(target, sentences, batch, original, gradients, seed=seed, reveal=reveal)
    data = text_training_data(batch) if procedure else None
    generator = torch.Generator().manual_seed(seed)
    for defense in defenses:
        update = apply_defense(update, defense, generator, model=target.model, data=data)
    return update, truth


def _split(count: int, parts: int) -> list[slice]:
    """Contiguous, near-equal slices of ``count`` items over ``parts`` clients."""
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def defended_client(
    target: LoadedModel,
    sentences: Sequence[str],
    *,
    task: str = "mlm",
    labels: Sequence[int] | None = None,
    defenses: Sequence[str | Defense] = (),
    seed: int = 0,
    max_length: int | None = None,
    mlm_probability: float = 0.15,
    reveal: Sequence[str] = ("lengths",),
) -> tuple[Update, GroundTruth]:
    """The update a client sends for ``sentences`` under ``defenses`` (specs or objects, applied in order).

    A client procedure (dpsgd, fedavg) computes the update and comes first; gradient transforms follow. With
    ``secure-aggregation:clients=M`` (last) the sentences are split over M clients, each seeded ``seed + m`` and
    defended alike, and the server sees the sum. The ground truth lists every sentence, in order.
    """
    chain = as_defenses(defenses)
    check_order(chain)
    options = {"task": task, "max_length": max_length, "mlm_probability": mlm_probability, "reveal": reveal}
    if not chain or not isinstance(chain[-1], SecureAggregation):
        return _one_client(target, sentences, chain, labels=labels, seed=seed, **options)  # type: ignore[arg-type]
    aggregation = chain[-1]
    if aggregation.clients > len(sentences):
        raise ValueError(f"secure aggregation over {aggregation.clients} clients needs as many sentences")
    results = [
        _one_client(
            target,
            sentences[part],
            chain[:-1],
            labels=None if labels is None else labels[part],
            seed=seed + m,
            **options,  # type: ignore[arg-type]
        )
        for m, part in enumerate(_split(len(sentences), aggregation.clients))
    ]
    truths = [truth for _, truth in results]
    truth = GroundTruth(
        sentences=tuple(s for t in truths for s in t.sentences),
        input_ids=tuple(row for t in truths for row in t.input_ids),
        original_ids=tuple(row for t in truths for row in t.original_ids),
        labels=tuple(label for t in truths for label in t.labels),
    )
    return aggregate([update for update, _ in results], aggregation), truth
