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

A masked-LM client sends the mean over its batch's masked positions. A found sentence's own masked positions and
their labels are read off the head's gradients alone (``mlm_labels.sentence_labels``), and so is their number n
over the batch; its gradient is then subtracted with weight (its masked positions) / n, exactly as a label would
be for a classifier.

Only updates linear in the batch can be peeled: plain classification and mlm gradients, also after additive noise or
with frozen tensors left out (the labels must still be read, which noise hides for mlm). Clipped, pruned,
quantised, locally trained or aggregated updates cannot be, nor all-tokens ones.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from textleak.attacks.mlm_labels import sentence_labels
from textleak.attacks.span_scoring import qkv_gradient_names, span_score, stacked_gradient
from textleak.client import ClientBatch, batch_loss
from textleak.models import LoadedModel
from textleak.tasks import IGNORE_INDEX
from textleak.update import Update

#: An embedding-table row left with at most this fraction of its norm held only peeled sentences' tokens: it is
#: zeroed, as in the update of the rest alone (recomputing a gradient leaves float32 rounding, about 1e-6 of it,
#: where the pairing expects rows outside the batch to be exactly zero).
ROW_FLOOR = 1e-4
#: Defenses after which an update is still the plain batch mean (plus noise, or less the tensors left out).
LINEAR_DEFENSES = ("noise", "freeze")
#: Tasks whose labels the attacker can read per sentence.
PEELABLE_TASKS = ("classification", "mlm")


@dataclass(frozen=True)
class Peeled:
    """The update of the batch's other sentences, and the sentences taken out with the labels read for them (mlm: per
    position, ``IGNORE_INDEX`` where nothing was masked) and their original text (mlm: labels put back)."""

    update: Update
    ids: tuple[tuple[int, ...], ...]
    labels: tuple[object, ...]
    originals: tuple[tuple[int, ...], ...]


def peel_refusal(update: Update) -> str | None:
    """Why ``update`` cannot be peeled, or None when it can."""
    meta = update.metadata
    if meta.task not in PEELABLE_TASKS:
        return f"a {meta.task} update cannot be peeled (only {', '.join(PEELABLE_TASKS)} ones)"
    if meta.kind != "gradient":
        return f"a {meta.kind} update is not the batch's mean gradient"
    other = sorted({d.get("name", "?") for d in meta.defenses} - set(LINEAR_DEFENSES))
    if other:
        return f"the defenses {other} make the update non-linear in the batch"
    return None


def peel(
    update: Update,
    target: LoadedModel,
    sentences: Sequence[Sequence[int]],
    keep: Collection[str] | None = None,
) -> Peeled | None:
    """``update`` less the gradients of those ``sentences`` whose label the first layer's span confirms.

    Each sentence is tried with every label (classification) or with the labels its head gradients show (mlm) on
    its own, scored by the first layer's rank, then its nuclear norm: the best label is kept if it lowers that score
    below the update's. The rank decides wherever it moves (also under noise sigma 1e-5 on MiniLM); the norm breaks
    ties, as when noise hides a sentence's rows below the bulk's edge. The norm alone is not enough: on a random
    BERT it can favour a wrong label, or a sentence not in the batch, whose rows raise the rank. A sentence no label
    lowers the score for stays in. None when the update cannot be peeled or no sentence qualifies.

    ``keep``: the gradients the rest holds (by default all of the update's). A caller that reads only some passes
    them: each peel recomputes and subtracts every kept tensor, which for all of BERT-base's 110M parameters took a
    second of its 2.5 s.
    """
    if peel_refusal(update) is not None or not sentences:
        return None
    model, pad_id, task = target.model, target.tokenizer.pad_token_id, update.metadata.task
    first = qkv_gradient_names(model, 0)
    if any(name not in update.gradients for name in first):
        return None
    stacked = stacked_gradient(update, first)
    whole = span_score(stacked)
    slots = update.metadata.batch_size  # labelled slots the update averages over: sentences, or masked positions
    kept_ids: list[tuple[int, ...]] = []
    kept_labels: list[Any] = []
    for ids in sentences:
        best = _best_label(update, target, stacked, ids)
        if best is not None and best[2] < whole:
            kept_ids.append(tuple(ids))
            kept_labels.append(best[0])
            slots = best[1]
    taken_slots = sum(map(_slots, kept_labels))
    if not kept_ids or taken_slots >= slots:  # nothing to take, or nothing would be left
        return None
    names = [name for name in update.gradients if keep is None or name in keep]
    taken = _gradients(model, kept_ids, kept_labels, names, pad_id, task)
    # the update is the mean over the batch's slots, ``taken`` the mean over the peeled ones': the rest is sent as the
    # mean over its own slots, exactly the update a client holding only its sentences would send
    rest = {name: _rest(update.gradients[name], taken[name], slots, taken_slots, name) for name in names}
    residual = update.with_gradients(rest, batch_size=update.metadata.batch_size - len(kept_ids))
    originals = tuple(map(_original, kept_ids, kept_labels))
    return Peeled(residual, tuple(kept_ids), tuple(kept_labels), originals)


def lowers_rank(update: Update, target: LoadedModel, ids: Sequence[int]) -> bool:
    """Whether taking the sentence out of the update, with its best label, lowers the first layer's rank: it holds
    input rows no other sentence of the batch holds. A sentence not in the batch adds rows, and a prefix of a true
    one, or a mix of two, leaves every row still needed by the true sentences, so neither lowers it. False when the
    update cannot be peeled."""
    names = qkv_gradient_names(target.model, 0)
    if peel_refusal(update) is not None or any(name not in update.gradients for name in names):
        return False
    stacked = stacked_gradient(update, names)
    best = _best_label(update, target, stacked, ids)
    return best is not None and best[2][0] < span_score(stacked)[0]


def _best_label(
    update: Update, target: LoadedModel, stacked: torch.Tensor, ids: Sequence[int]
) -> tuple[Any, int, tuple[int, float]] | None:
    """(label, labelled slots in the batch, (rank, nuclear norm) of the first layer's gradient less the sentence's)
    for the label that leaves the lowest score, or None when no label can be read (mlm)."""
    options = _label_options(update, target, ids)
    if not options:
        return None
    model, pad_id, task = target.model, target.tokenizer.pad_token_id, update.metadata.task
    first = qkv_gradient_names(model, 0)
    rests = []
    for label, total in options:
        own = torch.cat(list(_gradients(model, [ids], [label], first, pad_id, task).values())).double()
        rests.append(stacked - own * _slots(label) / total)
    scores = [span_score(rest) for rest in rests]
    best = min(range(len(options)), key=scores.__getitem__)
    return options[best][0], options[best][1], scores[best]


def _original(ids: tuple[int, ...], label: Any) -> tuple[int, ...]:
    """The sentence before masking: mlm labels put back at their positions (a classifier's input is its text)."""
    if isinstance(label, int):
        return ids
    return tuple(t if y == IGNORE_INDEX else y for t, y in zip(ids, label, strict=True))


def _label_options(update: Update, target: LoadedModel, ids: Sequence[int]) -> list[tuple[Any, int]]:
    """(label, labelled slots in the whole batch) pairs to try for one sentence: every class of a classifier, or
    the masked-LM labels its head gradients show (none when they show none)."""
    if update.metadata.task == "classification":
        classes = int(getattr(target.model.config, "num_labels", 2))
        return [(label, update.metadata.batch_size) for label in range(classes)]
    read = sentence_labels(update, target, list(ids))
    return [] if read is None else [(tuple(read[0]), read[1])]


def _slots(label: Any) -> int:
    """Labelled slots of one sentence: 1 for a class, its masked positions for mlm labels."""
    return 1 if isinstance(label, int) else sum(y != IGNORE_INDEX for y in label)


def _gradients(
    model: torch.nn.Module,
    sentences: Sequence[Sequence[int]],
    labels: Sequence[Any],
    names: Sequence[str],
    pad_id: int,
    task: str,
) -> dict[str, torch.Tensor]:
    """Gradients of ``names`` for the mean loss over the labelled slots of ``sentences`` (padded as the client
    pads)."""
    length = max(len(ids) for ids in sentences)
    input_ids = torch.full((len(sentences), length), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    targets = torch.full((len(sentences), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, label) in enumerate(zip(sentences, labels, strict=True)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        if task != "classification":
            targets[row, : len(ids)] = torch.tensor(label)
    if task == "classification":
        targets = torch.tensor(list(labels))
    batch = ClientBatch(input_ids, attention, torch.zeros_like(input_ids), targets, task)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(batch_loss(model, batch), [params[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g.detach()) for n, g in zip(names, grads, strict=True)}


def _rest(sent: torch.Tensor, taken: torch.Tensor, slots: int, taken_slots: int, name: str) -> torch.Tensor:
    """The mean over the rest's slots, ``(sent * slots - taken * taken_slots) / (slots - taken_slots)``, with the
    embedding-table rows that only the taken sentences filled set to zero. Of a table, only the rows the update
    holds are computed: the batch's tokens, a few hundred of BERT-base's 30522 word rows (the whole table took
    0.7 s of a 2.5 s peel), or every row of a noised update."""
    if not (name.endswith("embeddings.weight") and sent.dim() == 2):
        return (sent * slots - taken.to(sent.dtype) * taken_slots) / (slots - taken_slots)
    rows = (sent != 0).any(dim=1)
    total = sent[rows] * slots
    part = total - taken[rows].to(sent.dtype) * taken_slots
    part[part.norm(dim=1) <= ROW_FLOOR * total.norm(dim=1)] = 0
    rest = torch.zeros_like(sent)
    rest[rows] = part / (slots - taken_slots)
    return rest
