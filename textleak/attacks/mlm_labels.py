"""Masked-LM side channel: put the masked-out label tokens back at their positions once the input is known.

With the input known the attacker runs the forward pass itself. The MLM loss is ``(1/n) sum_i (lse_i - logit_i[y_i])``
over the n masked positions, so every head gradient is linear in the one-hot labels: with unknowns
``w[i, v] = [position i masked with label v] / n`` the head-transform and decoder-bias gradients are
``sum w[i, v] D[i, v]``. Non-negative least squares over the label bag (the negative decoder-bias entries) and the
plausible positions recovers w; its row sums are 1/n at masked positions and 0 elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls

from textleak.attacks.leakage import label_bag, output_bias_gradient
from textleak.models import LoadedModel
from textleak.update import Update

#: Above this many (position, label) unknowns only [MASK] positions and positions holding a label token are tried.
MAX_UNKNOWNS = 3000
#: Random right-projection width for the head's dense weight gradient (d x d -> d x PROJECT equations).
PROJECT = 8


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
    transform = head["transform"]
    weight = transform.dense.weight.detach().to(torch.float64).requires_grad_(True)
    pre = (h @ weight.T + transform.dense.bias.detach().to(torch.float64)).requires_grad_(True)
    act = transform.transform_act_fn(pre)
    norm = transform.LayerNorm
    normed = torch.nn.functional.layer_norm(act, act.shape[-1:], eps=norm.eps)
    out = normed * norm.weight.detach().to(torch.float64) + norm.bias.detach().to(torch.float64)
    embed = model.get_output_embeddings().weight.detach().to(torch.float64)
    bias = head["bias"].detach().to(torch.float64)
    probs = torch.softmax(out @ embed.T + model.get_output_embeddings().bias.detach().to(torch.float64), dim=-1)
    label_idx = torch.tensor(labels)
    g_out = (probs @ embed)[None] - embed[label_idx][:, None]  # (Y, S, d): d loss / d out
    (delta,) = torch.autograd.grad(out, pre, grad_outputs=g_out, is_grads_batched=True)  # (Y, S, d)
    omega = torch.randn(h.shape[1], PROJECT, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h_proj = h @ omega  # (S, k)
    onehot = torch.eye(len(labels), dtype=torch.float64)
    features = [
        delta,
        (delta[..., :, None] * h_proj[None, :, None, :]).flatten(2),
        g_out * normed.detach()[None],
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
