"""What a defense costs the training: how far the defended update is from the clean one, and a real fine-tuning run.

``update_fidelity`` compares a defended update with the clean gradient of the same batch (a dropped tensor counts
as zeros; a FedAvg delta is first turned into the average gradient it implies, ``-delta / (lr * steps)``).
``fine_tune`` trains a small classifier on CoLA with the defense applied to every step's update and reports the
loss and accuracy it reaches, so the privacy-utility trade-off sits next to the attack results.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from textleak.client import batch_loss, encode_batch
from textleak.defenses import as_defenses
from textleak.defenses.base import Defense, Gradients
from textleak.defenses.client import defended_client
from textleak.models import LoadedModel, load_model
from textleak.update import Update


def gradient_fidelity(clean: Gradients, defended: Gradients) -> dict[str, float]:
    """Cosine similarity and relative L2 error of ``defended`` against ``clean`` over all clean tensors.

    A tensor missing from ``defended`` counts as zeros; ``sent_fraction`` is the share of clean entries sent.
    """
    dot = clean_sq = defended_sq = error_sq = 0.0
    sent = total = 0
    for name, reference in clean.items():
        ref = reference.double()
        other = defended[name].double() if name in defended else torch.zeros_like(ref)
        dot += float((ref * other).sum())
        clean_sq += float(ref.pow(2).sum())
        defended_sq += float(other.pow(2).sum())
        error_sq += float((other - ref).pow(2).sum())
        total += ref.numel()
        sent += ref.numel() if name in defended else 0
    norms = math.sqrt(clean_sq * defended_sq)
    return {
        "cosine": dot / norms if norms > 0 else 0.0,
        "relative_error": math.sqrt(error_sq / clean_sq) if clean_sq > 0 else math.inf,
        "sent_fraction": sent / total if total else 0.0,
    }


def as_gradient(update: Update) -> Gradients:
    """The update's tensors as a gradient: a FedAvg delta becomes ``-delta / (lr * steps)``."""
    if update.metadata.kind != "delta":
        return update.gradients
    local = update.metadata.local_hyperparams or {}
    if "lr" not in local or "steps" not in local:
        raise ValueError("a delta update needs 'lr' and 'steps' in local_hyperparams to be read as a gradient")
    scale = -1.0 / (float(local["lr"]) * int(local["steps"]))
    return {name: scale * t for name, t in update.gradients.items()}


def update_fidelity(clean: Update, defended: Update) -> dict[str, float]:
    """``gradient_fidelity`` of a defended update against the clean update of the same batch."""
    return gradient_fidelity(clean.gradients, as_gradient(defended))


@dataclass
class FineTuneResult:
    """Where a short fine-tuning run ended: training loss, held-out loss and accuracy, and its settings."""

    steps: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    majority_accuracy: float
    seconds: float
    defenses: list[dict[str, Any]]
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def evaluate_classifier(
    target: LoadedModel, sentences: Sequence[str], labels: Sequence[int], *, batch_size: int = 32
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of a classification model on ``sentences``."""
    loss_sum, correct = 0.0, 0
    for start in range(0, len(sentences), batch_size):
        chunk = slice(start, start + batch_size)
        batch, _ = encode_batch(
            target.tokenizer, sentences[chunk], task="classification", labels=labels[chunk], max_length=64
        )
        logits = target.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids
        ).logits
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        correct += int((logits.argmax(-1) == batch.labels).sum())
    return loss_sum / len(sentences), correct / len(sentences)


def _apply(model: torch.nn.Module, update: Update, optimizer: torch.optim.Optimizer) -> None:
    """One server step: add a FedAvg delta as it is, or hand a gradient to the optimiser (missing = not trained)."""
    params = dict(model.named_parameters())
    if update.metadata.kind == "delta":
        with torch.no_grad():
            for name, delta in update.gradients.items():
                params[name] += delta
        return
    for name, p in params.items():
        p.grad = update.gradients[name].to(p.dtype) if name in update.gradients else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fine_tune(
    spec: str = "random:bert-tiny",
    *,
    train: tuple[Sequence[str], Sequence[int]],
    evaluation: tuple[Sequence[str], Sequence[int]],
    defenses: Sequence[str | Defense] = (),
    steps: int = 300,
    batch_size: int = 8,
    lr: float = 1e-4,
    seed: int = 0,
    eval_size: int = 200,
    max_length: int = 64,
) -> FineTuneResult:
    """Fine-tune a classifier on ``train`` (sentences, labels) for ``steps`` Adam steps at ``lr``, every update passed
    through ``defenses``; report loss and accuracy on the first ``eval_size`` of ``evaluation``.

    Each step draws ``batch_size`` training sentences (seeded), the defended client computes its update, and
    the server applies it. ``train_loss`` is the mean clean batch loss of the last tenth of the steps.
    """
    if steps < 1 or batch_size < 1 or eval_size < 1:
        raise ValueError(f"steps, batch_size and eval_size must be >= 1, got {steps}, {batch_size}, {eval_size}")
    chain = as_defenses(defenses)
    train_sentences, train_labels = list(train[0]), list(train[1])
    eval_sentences, eval_labels = list(evaluation[0][:eval_size]), list(evaluation[1][:eval_size])
    if not train_sentences or len(train_sentences) != len(train_labels) or not eval_sentences:
        raise ValueError("fine_tune needs non-empty training and evaluation sentences, each with a label")
    target = load_model(spec, head="classification", seed=seed)
    optimizer = torch.optim.Adam(target.model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        picks = torch.randint(len(train_sentences), (batch_size,), generator=generator).tolist()
        sentences, labels = [train_sentences[i] for i in picks], [train_labels[i] for i in picks]
        with torch.no_grad():
            batch, _ = encode_batch(
                target.tokenizer, sentences, task="classification", labels=labels, max_length=max_length
            )
            losses.append(float(batch_loss(target.model, batch)))
        update, _ = defended_client(
            target,
            sentences,
            task="classification",
            labels=labels,
            defenses=chain,
            seed=seed * 1_000_003 + step,
            max_length=max_length,
            reveal=(),
        )
        _apply(target.model, update, optimizer)
    eval_loss, accuracy = evaluate_classifier(target, eval_sentences, eval_labels)
    majority = max(eval_labels.count(0), eval_labels.count(1)) / len(eval_labels)
    tail = losses[-max(1, steps // 10) :]
    return FineTuneResult(
        steps=steps,
        train_loss=sum(tail) / len(tail),
        eval_loss=eval_loss,
        eval_accuracy=accuracy,
        majority_accuracy=majority,
        seconds=time.perf_counter() - start,
        defenses=[d.record() for d in chain],
        losses=losses,
    )
