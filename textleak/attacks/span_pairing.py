"""Which tokens sit at which position: the embedding-table gradients pair the span's bag of tokens with positions.

The first layer's span cannot pair tokens with positions: before LayerNorm, word + position vectors of the batch
span every (batch token, batch position) mixture, so any token of the batch nearly passes at every position. The
embedding tables' own gradients can. With ``g[k, p]`` the gradient at the embedding sum of sentence k, position p:

    dE[t] = sum of g over the occurrences of token t        dP[p] = sum_k g[k, p]

A token that occurs once gives its ``g`` exactly, so each position's gradient is the sum of the word gradients of the
tokens at it. Solving ``dP[p] ~ sum_t C[t, p] dE[t]`` with each token's weights on the simplex over positions
(``sum_p C[t, p] = 1``: a token's gradient is spread over its occurrences) gives C close to 1 where a unique token
sits and a share where a repeated one does. Only untied word gradients qualify (classification heads): a tied
masked-LM decoder adds to every word row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from textleak.update import Update

WORD = "word_embeddings.weight"
POSITION = "position_embeddings.weight"


@dataclass(frozen=True)
class Pairing:
    """Token-position weights: ``weights[i, p]`` is the share of token ``tokens[i]``'s gradient at position p."""

    tokens: list[int]
    weights: torch.Tensor  # (len(tokens), positions)
    residual: float  # relative residual of the fit: 0 when every token of the batch is unique

    def ranked(self, position: int, floor: float) -> list[tuple[int, float]]:
        """(token, share) at ``position`` with a share of at least ``floor``, largest first."""
        column = self.weights[:, position]
        order = column.argsort(descending=True).tolist()
        return [(self.tokens[i], float(column[i])) for i in order if column[i] >= floor]

    def single_occurrences(self, share: float) -> set[tuple[int, int]]:
        """(token, position) pairs holding at least ``share`` of the token's gradient: tokens seen once there."""
        rows, cols = (self.weights >= share).nonzero(as_tuple=True)
        return {(self.tokens[r], c) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)}


def _gradient(update: Update, suffix: str) -> torch.Tensor | None:
    for name, grad in update.gradients.items():
        if name.endswith(suffix):
            return grad.to(torch.float64)
    return None


def _project_simplex_rows(values: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based, exact)."""
    ordered, _ = torch.sort(values, dim=1, descending=True)
    cumulative = ordered.cumsum(1) - 1
    k = torch.arange(1, values.shape[1] + 1, dtype=values.dtype)
    support = ordered - cumulative / k > 0
    last = (support * torch.arange(values.shape[1])).argmax(1, keepdim=True)
    theta = cumulative.gather(1, last) / (last + 1).to(values.dtype)
    return (values - theta).clamp_min(0)


def _untied(word: torch.Tensor, bag: list[int]) -> bool:
    """Whether the word-embedding gradient is the input side alone: every row outside the bag is zero.

    A tied masked-LM decoder adds ``sum_m (p_m - y_m) h_m`` to every row. That term can be removed: on MiniLM (CoLA,
    B=4) the rows outside the bag have rank exactly the number of masked positions, and the decoder's share of the
    bag rows lies in their span to 3e-7. The fit still fails after projecting it out (1 of 25 once-seen tokens
    placed; 1 of 25 even on the exact input-side rows): the loss sits only at the masked positions, so [MASK], a
    repeated token, carries gradients about 100x the others', and a sentence without a masked position sends none.
    Tied updates are therefore not paired.
    """
    outside = torch.ones(word.shape[0], dtype=torch.bool)
    outside[bag] = False
    return float(word[outside].abs().max()) == 0.0


def pair_tokens(
    update: Update, bag: list[int], positions: int, *, offset: int = 0, iterations: int = 3000, exact: bool = True
) -> Pairing | None:
    """Token-position weights for the candidate ``bag`` over the first ``positions`` positions (position 0 at
    table row ``offset``).

    None when the update lacks the word- or position-embedding gradient (frozen embeddings), when a tied decoder
    adds to the word gradient (mlm, all-tokens), or when the bag is empty. ``exact`` (span's use): also None when
    the rows outside the bag are not exactly zero, i.e. under noise, where span's anchors would mislead (CoLA, B=4,
    noise 1e-6: 64.7 ROUGE-1 with noisy pairing, 69.5 without). With ``exact=False`` a classifier's noisy update is
    paired too (its word gradient is the input side alone), for attacks that only narrow candidates with it.
    Solved by accelerated projected gradient (FISTA) on the least-squares fit, each token's row on the simplex.
    """
    word, position = _gradient(update, WORD), _gradient(update, POSITION)
    if word is None or position is None or not bag:
        return None
    if (exact or update.metadata.task != "classification") and not _untied(word, bag):
        return None
    targets, rows = position[offset : offset + positions], word[bag]
    scale = float(targets.norm()) or 1.0
    rows, targets = rows / scale, targets / scale
    lipschitz = float(torch.linalg.matrix_norm(rows @ rows.T, 2)) or 1.0
    weights = torch.full((len(bag), positions), 1.0 / positions, dtype=torch.float64)
    momentum, step = weights.clone(), 1.0
    for _ in range(iterations):
        gradient = -(rows @ (targets - momentum.T @ rows).T)
        updated = _project_simplex_rows(momentum - gradient / lipschitz)
        next_step = (1 + (1 + 4 * step * step) ** 0.5) / 2
        momentum = updated + (step - 1) / next_step * (updated - weights)
        weights, step = updated, next_step
    residual = float((targets - weights.T @ rows).norm() / targets.norm().clamp_min(1e-300))
    return Pairing(tokens=list(bag), weights=weights, residual=residual)
