"""Peeling: subtract the gradient of sentences already recovered, leaving the update of the rest of the batch.

A classification client sends the mean of its sentences' gradients, and the attacker holds the model: once a
sentence is known, its own gradient can be computed up to its label. The first layer's gradient tells the label:
with the true one, subtracting the sentence removes its input rows from the gradient's row space, so the rank falls
by about its length and the sum of the singular values (nuclear norm) falls too, while a wrong label leaves a
rank-``length`` remainder there, as a sentence that is not in the batch adds one (MiniLM CoLA B=4: the true label's
nuclear norm 0.72-0.85 of the update's clean, 0.98-0.99 under noise sigma 1e-4; a wrong label's or a stranger's
1.00-1.30; under noise sigma 1e-5 the estimated rank still falls from 35 to 26-29). What is left is the update of a
smaller batch, which the span attack reads far more easily: fewer candidates per position, a shorter search. A
39-token SST-2 sentence that a 240 s search misses at B=4 is read in under a second once its three companions are
peeled.

Only updates linear in the batch can be peeled: plain classification gradients, also after additive noise or with
frozen tensors left out. mlm updates are not (their random masks are unknown), nor are clipped, pruned, quantised,
locally trained or aggregated ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from textleak.attacks.span_scoring import qkv_gradient_names, span_basis, stacked_gradient
from textleak.client import ClientBatch, batch_loss
from textleak.update import Update

#: An embedding-table row left with at most this fraction of its norm held only peeled sentences' tokens: it is
#: zeroed, as in the update of the rest alone (recomputing a gradient leaves float32 rounding, about 1e-6 of it,
#: where the pairing expects rows outside the batch to be exactly zero).
ROW_FLOOR = 1e-4
#: Defenses after which an update is still the plain batch mean (plus noise, or less the tensors left out).
LINEAR_DEFENSES = ("noise", "freeze")


@dataclass(frozen=True)
class Peeled:
    """The update of the batch's other sentences, and the sentences taken out with the labels read for them."""

    update: Update
    ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]


def peel_refusal(update: Update) -> str | None:
    """Why ``update`` cannot be peeled, or None when it can."""
    meta = update.metadata
    if meta.task != "classification":
        return f"a {meta.task} update depends on labels the attacker cannot compute (only classification peels)"
    if meta.kind != "gradient":
        return f"a {meta.kind} update is not the batch's mean gradient"
    other = sorted({d.get("name", "?") for d in meta.defenses} - set(LINEAR_DEFENSES))
    if other:
        return f"the defenses {other} make the update non-linear in the batch"
    return None


def peel(update: Update, model: torch.nn.Module, sentences: Sequence[Sequence[int]], pad_id: int) -> Peeled | None:
    """``update`` less the gradients of those ``sentences`` whose label the first layer's span confirms.

    Each sentence is tried with every label on its own, scored by the first layer's rank, then its nuclear norm:
    the best label is kept if it lowers that score below the update's. The rank decides wherever it moves (also
    under noise sigma 1e-5 on MiniLM); the norm breaks ties, as when noise hides a sentence's rows below the bulk's
    edge. The norm alone is not enough: on a random BERT it can favour a wrong label, or a sentence not in the
    batch, whose rows raise the rank. A sentence no label lowers the score for stays in. None when the update cannot
    be peeled or no sentence qualifies.
    """
    if peel_refusal(update) is not None or not sentences:
        return None
    meta = update.metadata
    first = qkv_gradient_names(model, 0)
    if any(name not in update.gradients for name in first):
        return None
    stacked = stacked_gradient(update, first)
    whole = span_basis(stacked)
    classes = int(getattr(model.config, "num_labels", 2))
    kept_ids: list[tuple[int, ...]] = []
    kept_labels: list[int] = []
    for ids in sentences:
        rests = []
        for label in range(classes):
            own = torch.cat(list(_gradients(model, [ids], [label], first, pad_id).values())).double()
            rests.append(stacked - own / meta.batch_size)
        scores = [(span.rank, span.nuclear) for span in map(span_basis, rests)]
        best = min(range(classes), key=scores.__getitem__)
        if scores[best] < (whole.rank, whole.nuclear):
            kept_ids.append(tuple(ids))
            kept_labels.append(best)
    if not kept_ids:
        return None
    names = list(update.gradients)
    taken = _gradients(model, kept_ids, kept_labels, names, pad_id)
    # the update is the mean over the batch, ``taken`` the mean over the peeled ones: the rest is sent as the mean
    # over its own sentences, exactly the update a client holding only them would send
    left = meta.batch_size - len(kept_ids)
    rest = {
        name: _less(update.gradients[name] * meta.batch_size, taken[name] * len(kept_ids), name) / left
        for name in names
    }
    residual = update.with_gradients(rest, batch_size=left)
    return Peeled(residual, tuple(kept_ids), tuple(kept_labels))


def _gradients(
    model: torch.nn.Module, sentences: Sequence[Sequence[int]], labels: Sequence[int], names: Sequence[str], pad_id: int
) -> dict[str, torch.Tensor]:
    """Gradients of ``names`` for the mean classification loss of ``sentences`` (padded as the client pads)."""
    length = max(len(ids) for ids in sentences)
    input_ids = torch.full((len(sentences), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(sentences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    batch = ClientBatch(input_ids, attention, torch.zeros_like(input_ids), torch.tensor(list(labels)), "classification")
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(batch_loss(model, batch), [params[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g.detach()) for n, g in zip(names, grads, strict=True)}


def _less(total: torch.Tensor, taken: torch.Tensor, name: str) -> torch.Tensor:
    """``total - taken``, with the embedding-table rows that only the taken sentences filled set to zero."""
    rest = total - taken.to(total.dtype)
    if name.endswith("embeddings.weight") and rest.dim() == 2:
        rest[rest.norm(dim=1) <= ROW_FLOOR * total.norm(dim=1)] = 0
    return rest
