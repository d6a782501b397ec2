"""Masked-LM side channel: put the masked-out label tokens back at their positions once the input is known.

With the input known the attacker runs the forward pass itself. The MLM loss is ``(1/n) sum_i (lse_i - logit_i[y_i])``
over the n masked positions, so every head gradient is linear in the one-hot labels: with unknowns
``w[i, v] = [position i masked with label v] / n`` the head-transform and decoder-bias gradients are
``sum w[i, v] D[i, v]``. Non-negative least squares over the label bag (the negative decoder-bias entries) and the
plausible positions recovers w; its row sums are 1/n at masked positions and 0 elsewhere.

One sentence's labels can also be read alone, before the rest of the batch is known (``sentence_labels``, for
peeling): the head's dense weight gradient ``sum_m delta_m h_m^T`` over the masked positions m has the inputs h_m
as its row space and the output gradients delta_m as its column space. A position of the sentence is masked exactly
when its last hidden state lies in the row space, and its label is the one whose delta lies in the column space.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from textleak.attacks.leakage import label_bag, output_bias_gradient
from textleak.attacks.span_scoring import span_basis
from textleak.models import LoadedModel
from textleak.tasks import IGNORE_INDEX
from textleak.update import Update

#: Above this many (position, label) unknowns only [MASK] positions and positions holding a label token are tried.
MAX_UNKNOWNS = 3000
#: Random right-projection width for the head's dense weight gradient (d x d -> d x PROJECT equations).
PROJECT = 8
#: A hidden state or output gradient within this relative residual of the dense weight gradient's row or column
#: space belongs to it (true ones: about 1e-6 in float32; others: 1e-1 and more).
IN_SPAN = 1e-3
#: Singular values of the dense weight gradient below this fraction of the largest are float32 rounding.
HEAD_RANK_TOL = 1e-5


def recover_originals(
    update: Update, target: LoadedModel, inputs: list[list[int]]
) -> tuple[list[list[int]], dict[str, Any], list[str]]:
    """Originals (inputs with labels placed at masked positions), details and warnings.

    ``details["mlm_placed"]`` lists [sequence index in ``inputs``, position, label id] per placed label.
    """
    labels = label_bag(update)
    if not labels:
        return [list(s) for s in inputs], {"mlm_labels": []}, ["no masked-label side channel in the update"]
    tok, model = target.tokenizer, target.model
    specials = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
    slots = [(b, p) for b, seq in enumerate(inputs) for p, t in enumerate(seq) if t not in specials]
    if len(slots) * len(labels) > MAX_UNKNOWNS:
        label_set = set(labels)
        slots = [(b, p) for b, p in slots if inputs[b][p] in label_set or inputs[b][p] == tok.mask_token_id]
    warnings: list[str] = []
    head = _head_parts(model, update)
    if head is None:
        return [list(s) for s in inputs], {"mlm_labels": labels}, ["the update lacks the MLM head gradients"]
    design, rhs = _system(model, head, update, inputs, slots, labels, tok.pad_token_id)
    weights, residual = nnls(design, rhs, maxiter=50 * design.shape[1])
    weights = weights.reshape(len(slots), len(labels))
    rows = weights.sum(1)
    n = _count(rows)
    chosen = np.argsort(-rows)[:n]
    originals = [list(s) for s in inputs]
    placed = []
    for k in chosen:
        b, p = slots[k]
        label = labels[int(weights[k].argmax())]
        originals[b][p] = label
        placed.append([b, p, label])
    fit = residual / max(np.linalg.norm(rhs), 1e-300)
    if fit > 1e-2:
        warnings.append(f"masked labels fit the head gradient poorly (relative residual {fit:.1e}): a guess")
    unplaced = set(labels) - {lab for _, _, lab in placed}
    if unplaced:
        warnings.append(f"{len(unplaced)} label token(s) could not be placed")
    return originals, {"mlm_labels": labels, "mlm_placed": sorted(placed), "mlm_fit": float(fit)}, warnings


def sentence_labels(update: Update, target: LoadedModel, ids: list[int]) -> tuple[list[int], int] | None:
    """One sentence's masked-LM labels read from the head's gradients alone: per position the label, or
    ``IGNORE_INDEX`` where nothing was masked; and n, the batch's number of masked positions (the dense gradient's
    rank). None when the update lacks the head's gradients, a masked position's label is not clear, or the sentence
    has no masked position (it sent no gradient)."""
    labels = label_bag(update)
    tok, model = target.tokenizer, target.model
    head = _head_parts(model, update)
    if not labels or head is None:
        return None
    grad = head["grads"]["dense.weight"].to(torch.float64)
    rows, columns = span_basis(grad, HEAD_RANK_TOL), span_basis(grad.T, HEAD_RANK_TOL)
    if rows.rank >= min(grad.shape):
        return None
    with torch.no_grad():
        batch = torch.tensor([ids])
        hidden = model.base_model(input_ids=batch, token_type_ids=torch.zeros_like(batch))[0][0].to(torch.float64)
    in_rows = rows.residual(hidden) <= IN_SPAN
    masked = [p for p in range(len(ids)) if ids[p] not in (tok.cls_token_id, tok.sep_token_id) and in_rows[p]]
    if not masked:
        return None
    deltas = _head_pass(model, head["transform"], hidden[masked], labels)[3]  # (labels, masked, d)
    off = columns.residual(deltas.reshape(-1, deltas.shape[-1])).view(len(labels), len(masked))
    best = off.argmin(0)
    if bool((off.gather(0, best[None])[0] > IN_SPAN).any()):
        return None
    out = [IGNORE_INDEX] * len(ids)
    for p, k in zip(masked, best.tolist(), strict=True):
        out[p] = labels[k]
    return out, rows.rank


def _head_pass(
    model: torch.nn.Module, transform: torch.nn.Module, hidden: torch.Tensor, labels: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head on last hidden states (positions, d), in float64: the LayerNorm's normalised output, the predicted
    probabilities, and per label and position the loss gradient at the transform's output and at its dense layer's
    output (labels, positions, d), up to the mean's 1/n."""
    pre = (hidden @ transform.dense.weight.detach().to(torch.float64).T
           + transform.dense.bias.detach().to(torch.float64)).requires_grad_(True)
    act = transform.transform_act_fn(pre)
    norm = transform.LayerNorm
    normed = torch.nn.functional.layer_norm(act, act.shape[-1:], eps=norm.eps)
    out = normed * norm.weight.detach().to(torch.float64) + norm.bias.detach().to(torch.float64)
    embed = model.get_output_embeddings().weight.detach().to(torch.float64)
    probs = torch.softmax(out @ embed.T + model.get_output_embeddings().bias.detach().to(torch.float64), dim=-1)
    g_out = ((probs @ embed)[None] - embed[torch.tensor(labels)][:, None]).detach()
    (delta,) = torch.autograd.grad(out, pre, grad_outputs=g_out, is_grads_batched=True)
    return normed.detach(), probs.detach(), g_out, delta


def _count(rows: np.ndarray) -> int:
    """The number n of masked positions: the n largest row sums should each be 1/n, the rest 0."""
    ordered = np.sort(rows)[::-1]
    errors = [((ordered[:n] - 1 / n) ** 2).sum() + (ordered[n:] ** 2).sum() for n in range(1, len(rows) + 1)]
    return int(np.argmin(errors)) + 1


def _head_parts(model: torch.nn.Module, update: Update) -> dict[str, Any] | None:
    """The MLM head transform (dense, activation, LayerNorm) and the update's gradients for it."""
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    transform = getattr(predictions, "transform", None)
    if transform is None:
        return None
    owner = {id(p): name for name, p in model.named_parameters()}
    params = {
        "dense.weight": transform.dense.weight,
        "dense.bias": transform.dense.bias,
        "norm.weight": transform.LayerNorm.weight,
        "norm.bias": transform.LayerNorm.bias,
    }
    grads = {key: update.gradients.get(owner[id(p)]) for key, p in params.items()}
    bias = output_bias_gradient(update)
    if bias is None or any(g is None for g in grads.values()):
        return None
    return {"transform": transform, "grads": grads, "bias": bias}


def _system(
    model: torch.nn.Module,
    head: dict[str, Any],
    update: Update,
    inputs: list[list[int]],
    slots: list[tuple[int, int]],
    labels: list[int],
    pad: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Design matrix (features x slots*labels) and the update's gradients as the right-hand side."""
    seq_len = max(len(s) for s in inputs)
    ids = torch.full((len(inputs), seq_len), pad, dtype=torch.long)
    for b, seq in enumerate(inputs):
        ids[b, : len(seq)] = torch.tensor(seq)
    mask = (torch.arange(seq_len)[None] < torch.tensor([len(s) for s in inputs])[:, None]).long()
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))[0]
    h = hidden[[b for b, _ in slots], [p for _, p in slots]].to(torch.float64)  # (S, d)
    normed, probs, g_out, delta = _head_pass(model, head["transform"], h, labels)  # g_out, delta: (Y, S, d)
    bias = head["bias"].detach().to(torch.float64)
    label_idx = torch.tensor(labels)
    omega = torch.randn(h.shape[1], PROJECT, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h_proj = h @ omega  # (S, k)
    onehot = torch.eye(len(labels), dtype=torch.float64)
    features = [
        delta,
        (delta[..., :, None] * h_proj[None, :, None, :]).flatten(2),
        g_out * normed[None],
        g_out,
        (probs[:, label_idx][None] - onehot[:, None, :]),
    ]
    design = torch.cat(features, dim=-1).permute(1, 0, 2).reshape(len(slots) * len(labels), -1).T
    grads = {k: g.to(torch.float64) for k, g in head["grads"].items()}
    rhs = torch.cat(
        [grads["dense.bias"], (grads["dense.weight"] @ omega).flatten(), grads["norm.weight"], grads["norm.bias"],
         bias[label_idx]]
    )
    scale = rhs.abs().max().clamp_min(1e-300)
    return (design / scale).detach().numpy(), (rhs / scale).detach().numpy()
