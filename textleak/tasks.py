"""Training objectives of the simulated client, shared with the attacker so both compute the same loss.

mlm: masked-LM cross-entropy over masked positions (labels -100 elsewhere), as Hugging Face computes it.
all-tokens: every real token is its own label (DLG's text setting); the same cross-entropy over all real tokens.
classification: sequence classification cross-entropy with one label per sequence.

Labels are either hard (integer ids, -100 = ignored) or soft (a probability vector per labelled slot, used by
attacks that do not know the labels), so the very same function serves the client and the attacker.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from textleak.errors import unknown_name

TASKS = ("mlm", "all-tokens", "classification")
IGNORE_INDEX = -100


def check_task(task: str) -> str:
    """Return the task name, or raise naming the known tasks."""
    if task not in TASKS:
        raise unknown_name("task", task, TASKS)
    return task


def head_for(task: str) -> str:
    """The model head a task trains: a masked-LM head or a sequence classification head."""
    return "classification" if check_task(task) == "classification" else "mlm"


def task_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over labelled slots.

    Hard labels: an integer tensor shaped like ``logits`` without the class axis, -100 where ignored.
    Soft labels: a float tensor shaped like ``logits`` holding probabilities; ``label_mask`` (bool, without the
    class axis) marks the slots that count, all of them when omitted. Soft rows may sum to less than one (mass
    left to "this slot is not labelled"); ``normaliser`` then replaces the slot count in the mean.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if not labels.is_floating_point():
        return F.cross_entropy(flat_logits, labels.reshape(-1), ignore_index=IGNORE_INDEX)
    per_slot = -(labels.reshape(flat_logits.shape) * F.log_softmax(flat_logits, dim=-1)).sum(-1)
    if label_mask is None:
        return per_slot.mean()
    weights = label_mask.reshape(-1).to(per_slot.dtype)
    count = weights.sum().clamp_min(1.0) if normaliser is None else normaliser
    return (per_slot * weights).sum() / count
