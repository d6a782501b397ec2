"""Which tokens sit at which position: the embedding-table gradients pair the span's bag of tokens with positions.

The first layer's span cannot pair tokens with positions: before LayerNorm, word + position vectors of the batch
span every (batch token, batch position) mixture, so any token of the batch nearly passes at every position. The
embedding tables' own gradients can. With ``g[k, p]`` the gradient at the embedding sum of sentence k, position p:

    dE[t] = sum of g over the occurrences of token t        dP[p] = sum_k g[k, p]

A token that occurs once gives its ``g`` exactly, so each position's gradient is the sum of the word gradients of the
tokens at it. Solving ``dP[p] ~ sum_t C[t, p] dE[t]`` with each token's weights on the simplex over positions
(``sum_p C[t, p] = 1``: a token's gradient is spread over its occurrences) gives C close to 1 where a unique token
sits and a share where a repeated one does.

A tied masked-LM decoder adds ``sum_m (p_m[t] - [y_m = t]) u_m / n`` to every word row t, over the n masked
positions: the rows outside the bag span exactly those n head outputs u_m, so projecting their span out of every row
leaves the input side. The fit then still fails on the raw positions (1 of 25 once-seen tokens placed on MiniLM CoLA
B=4): [MASK] is a repeated token whose occurrences carry gradients 10-100x the others', and its one word row cannot
stand for their different directions. Those positions are loud (the largest gap in the positions' gradient norms
separates them), so the fit leaves them and [MASK] out, lets a token's weights sum to less than one, and gives
each loud position every token's unplaced weight (``Pairing.pooled``). On MiniLM RT and SST-2, B=4 and 8, 91-98% of
the tokens placed with a share >= 0.9 are right, about 40 per batch.

LayerNorm then narrows where a pooled token sits. The gradient at an embedding sum x has passed back through the
embeddings' LayerNorm, whose Jacobian projects the centred input out of it: ``g . centre(x) = 0``. A token seen once
owns its word row, ``dE[t] = g``, so its row is orthogonal to ``centre(E[t] + P[p] + T)`` at its own position p only
(cosine 1e-9 to 1e-8 on a classifier's update). On an mlm update the decoder's share leaves a median 7e-5 there,
against 1e-4 to 1e-2 at the other loud positions. A token seen more than once has a sum of gradients for a row,
orthogonal to no one input, and narrowing it loses its true positions. So a pooled token whose smallest cosine is at
most ``ORTHOGONAL_MAX`` keeps its weight only at the loud positions where its cosine is within ``ORTHOGONAL_RATIO`` of
that smallest, scaled by how close it comes (smallest / cosine), so that each loud position lists first the tokens
most orthogonal there. On MiniLM CoLA, SST-2 and RT B=4 (20 batches each) that keeps 2747 of 6101 pooled (token, loud
position) pairs and loses 8 of the 648 true ones; the ratio alone kept 1662 and lost 32 (30 of tokens seen more than
once), which cost RT batch 16 three sentences. A label token (the decoder's share is large in its row) keeps its
weight everywhere.

Removing the decoder's share first (``decoder_share`` fits it from the rows outside the bag) sharpens the test: a
once-seen token's row is then most orthogonal at its own position for 98% of them (80% with the share, MiniLM SST-2
B=4). It also finds once-seen tokens that the quiet fit placed although they sit at a loud position (the fit spreads
such a token over quiet positions whose gradients happen to explain it; about two per batch): when its row is
``LOUD_MARGIN`` times more orthogonal at a loud position than at any live quiet one, it is pooled there too. And the
same test sets the quiet fit's slack apart (``Pairing.slack``): a nearly orthogonal token's small shares at the
positions where its row is far from orthogonal (``FAR_RATIO``), which at B=8 put 12-24 tokens seen once elsewhere
at each quiet position. A token seen twice whose one occurrence dominates looks the same, so the slack is kept, to be
left out only where the lists are too wide for the equations that test them (``span.CROWDED``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from textleak.attacks.decoder_share import decoder_share
from textleak.attacks.leakage import label_bag, output_bias_gradient
from textleak.attacks.span_scoring import EmbeddingParts
from textleak.update import Update

WORD = "word_embeddings.weight"
POSITION = "position_embeddings.weight"
#: A tied decoder's share of the word gradient has the rank of the masked positions; outside rows of higher rank
#: than this fraction of the hidden size are noise, not a decoder, and the update is not paired.
DECODER_RANK_SHARE = 0.5
#: Singular values below this fraction of the largest one are rounding in the outside rows (float32 sums).
DECODER_RANK_TOL = 1e-6
#: The loud positions stand above the others' gradient norms by at least this factor (the largest gap in log norm).
LOUD_GAP = 1.3
#: Splits of the positions into loud and quiet tried at most (``_loud_splits``).
LOUD_SPLITS = 3
#: A masked-LM fit whose relative residual is above this did not separate the loud positions: the next split is
#: tried, and after the last, no pairing.
MASKED_MAX_RESIDUAL = 0.5
#: Unplaced weight below this is the fit's slack, not a token at a loud position (MiniLM SST-2 B=4, three batches:
#: tokens that sit at one have 0.36-1.0 unplaced but for 13 of 63; tokens that do not, 0 but for 16 of 146, up to 0.54).
POOLED_FLOOR = 0.2
#: A pooled token is narrowed when its word row's smallest cosine with a loud position's centred input is at most
#: this (the median for tokens seen once is 7e-5, for tokens seen more often 2.5e-3).
ORTHOGONAL_MAX = 3e-4
#: A narrowed token keeps the loud positions where that cosine is within this factor of its smallest.
ORTHOGONAL_RATIO = 10.0
#: A token the quiet fit placed is pooled at the loud positions when, its decoder share removed, its row is this many
#: times less orthogonal at every live quiet position than at its best loud one. MiniLM SST-2 and RT B=4 (20
#: batches each): 48 of the 87 once-seen tokens at a loud position that the fit had placed on quiet ones, 46 of them
#: at their own position first, against 4 tokens pooled that sit at no loud position.
LOUD_MARGIN = 3.0
#: With the decoder's share removed, a nearly orthogonal token's (``ORTHOGONAL_MAX``) shares below ``FAR_SHARE`` at
#: live positions where its row's cosine is over this factor above its smallest are slack. MiniLM SST-2 B=8 batch 1:
#: the lists held 285 (token, position) pairs of tokens seen once elsewhere (12-24 a quiet position), 30 without the
#: slack; a once-seen token's own position has the smallest cosine for 94% of them and is within 30x of it for all but
#: one (median margin to the next position 56x).
FAR_RATIO = 30.0
#: A share this large is an occurrence, not slack: a token seen two or three times has one at each place (without
#: this floor the same batch lost four more true pairs of such tokens, whose rows are orthogonal where one dominates).
FAR_SHARE = 0.3


@dataclass(frozen=True)
class Pairing:
    """Token-position weights: ``weights[i, p]`` is the share of token ``tokens[i]``'s gradient at position p."""

    tokens: list[int]
    weights: torch.Tensor  # (len(tokens), positions)
    residual: float  # relative residual of the fit: 0 when every token of the batch is unique
    #: (positions,) bool, or None: positions the fit left out (an mlm update's [MASK]-holding ones). There each
    #: token's weight is what the fit did not place of it, so any of them may sit there, and none is known to.
    pooled: torch.Tensor | None = None
    #: (len(tokens), positions), or None: shares the LayerNorm test moved out of ``weights`` as the fit's slack
    #: (``FAR_RATIO``); a token may still sit there, after the others.
    slack: torch.Tensor | None = None

    def ranked(self, position: int, floor: float, *, slack: bool = False) -> list[tuple[int, float]]:
        """(token, share) at ``position`` with a share of at least ``floor``, largest first; of the slack shares
        when ``slack``."""
        if slack and self.slack is None:
            return []
        column = (self.slack if slack else self.weights)[:, position]
        order = column.argsort(descending=True).tolist()
        return [(self.tokens[i], float(column[i])) for i in order if column[i] >= floor]

    def single_occurrences(self, share: float) -> set[tuple[int, int]]:
        """(token, position) pairs holding at least ``share`` of the token's gradient: tokens seen once there."""
        held = self.weights >= share
        if self.pooled is not None:
            held[:, self.pooled] = False
        rows, cols = held.nonzero(as_tuple=True)
        return {(self.tokens[r], c) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)}


def _gradient(update: Update, suffix: str) -> torch.Tensor | None:
    """The update's gradient of the parameter named ``suffix``, in its own dtype: the word table's is large
    (BERT-base: 23M entries), so only the rows used are taken to float64."""
    for name, grad in update.gradients.items():
        if name.endswith(suffix):
            return grad
    return None


def _project_simplex_rows(values: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto the probability simplex (sort-based, exact)."""
    ordered = -np.sort(-values, axis=1)
    cumulative = np.cumsum(ordered, axis=1) - 1
    support = ordered - cumulative / np.arange(1, values.shape[1] + 1) > 0
    last = (support * np.arange(values.shape[1])).argmax(1)
    theta = cumulative[np.arange(len(values)), last] / (last + 1)
    return np.maximum(values - theta[:, None], 0.0)


def _project_capped_rows(values: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto ``{w >= 0, sum w <= 1}``: the clipped row, or the simplex's."""
    clipped = np.maximum(values, 0.0)
    over = clipped.sum(1) > 1
    if over.any():
        clipped[over] = _project_simplex_rows(values[over])
    return clipped


def _outside(word: torch.Tensor, bag: list[int]) -> torch.Tensor:
    """The word-gradient rows of tokens outside the bag, in float64: no input holds them, only a tied decoder fills
    them."""
    outside = torch.ones(word.shape[0], dtype=torch.bool)
    outside[bag] = False
    return word[outside].to(torch.float64)


def _untied(word: torch.Tensor, bag: list[int]) -> bool:
    """Whether the word-embedding gradient is the input side alone: every row outside the bag is zero."""
    filled = word.abs().amax(dim=1) > 0
    filled[bag] = False
    return not bool(filled.any())


def _fit(
    rows: torch.Tensor, targets: torch.Tensor, iterations: int, project: Callable[[np.ndarray], np.ndarray]
) -> tuple[torch.Tensor, float]:
    """Weights W (rows x targets) with ``targets ~ W.T @ rows``, each row of W projected by ``project``, and the
    relative residual; accelerated projected gradient (FISTA) on the least-squares fit, in numpy (its small
    per-step arrays run about twice as fast there as in torch)."""
    scale = float(targets.norm()) or 1.0
    scaled_rows, scaled_targets = (rows / scale).numpy(), (targets / scale).numpy()
    # the gradient G W - C in the small (rows x rows) space
    gram, cross = scaled_rows @ scaled_rows.T, scaled_rows @ scaled_targets.T
    lipschitz = float(np.linalg.norm(gram, 2)) or 1.0
    weights = project(np.full((len(scaled_rows), len(scaled_targets)), 1.0 / len(scaled_targets)))
    momentum, step = weights.copy(), 1.0
    for _ in range(iterations):
        updated = project(momentum - (gram @ momentum - cross) / lipschitz)
        next_step = (1 + (1 + 4 * step * step) ** 0.5) / 2
        momentum = updated + (step - 1) / next_step * (updated - weights)
        weights, step = updated, next_step
    misfit = np.linalg.norm(scaled_targets - weights.T @ scaled_rows)
    residual = float(misfit / max(float(np.linalg.norm(scaled_targets)), 1e-300))
    return torch.from_numpy(weights), residual


def _decoder_basis(word: torch.Tensor, bag: list[int]) -> torch.Tensor | None:
    """An orthonormal basis (hidden, n) of the word rows outside the bag (a tied decoder's share), or None when that
    span is too wide to be a decoder's."""
    outside = _outside(word, bag)
    # the row space from the (hidden x hidden) Gram matrix, whose eigenvalues are the squared singular values:
    # 5x faster than an SVD of the ~30k outside rows, and float64 resolves 1e-12 of its largest eigenvalue
    values, vectors = torch.linalg.eigh(outside.T @ outside)
    singular = values.clamp_min(0).sqrt()
    basis = vectors[:, singular > DECODER_RANK_TOL * float(singular.max())]
    return None if basis.shape[1] > DECODER_RANK_SHARE * word.shape[1] else basis


def _loud_splits(targets: torch.Tensor) -> list[torch.Tensor]:
    """Candidate sets of loud positions (the [MASK]-holding ones), widest gap first: the positions whose gradient
    norm stands above the rest by one of the ``LOUD_SPLITS`` largest gaps in log norm that reach ``LOUD_GAP``, and
    not every live position. Positions no live sentence reaches (zero gradient: padding, or a sentence with nothing
    masked) are quiet and take no part in the split. The widest gap is not always the loud edge: at B=8 a position
    only one short sentence reaches can fall 3x below the next (MiniLM SST-2 B=8 batch 3), wider than the edge's 2x,
    and the caller takes the first split whose quiet positions its fit explains."""
    norms = targets.norm(dim=1)
    live = norms > 0
    ordered = norms[live].log().sort().values
    gaps = ordered[1:] - ordered[:-1]
    splits = []
    for k in gaps.argsort(descending=True)[:LOUD_SPLITS].tolist():
        loud = live & (norms.clamp_min(1e-300).log() > ordered[k])
        if float(gaps[k]) >= math.log(LOUD_GAP) and not bool(loud[live].all()):
            splits.append(loud)
    return splits


def _orthogonal_places(
    row: torch.Tensor, token: int, places: torch.Tensor, parts: EmbeddingParts, token_type: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions among ``places`` where ``token``'s word-gradient ``row`` is within ``ORTHOGONAL_RATIO`` of its
    most nearly orthogonal to the centred embedding sum (LayerNorm's Jacobian projects the input out of the gradient
    at it), most orthogonal first, and how close each comes to that best (smallest cosine / cosine, in (0, 1]); all
    of them, each at 1, when even the best cosine is above ``ORTHOGONAL_MAX``."""
    cosine = _cosines(row, token, places, parts, token_type)
    order = cosine.argsort()
    best = cosine[order[0]].clamp_min(1e-300)
    if float(best) > ORTHOGONAL_MAX:
        return places, torch.ones(len(places), dtype=torch.float64)
    order = order[cosine[order] <= ORTHOGONAL_RATIO * best]
    return places[order], best / cosine[order]


def _cosines(
    row: torch.Tensor, token: int, places: torch.Tensor, parts: EmbeddingParts, token_type: int
) -> torch.Tensor:
    """|cosine| of ``row`` with ``token``'s centred embedding sum at each of ``places``."""
    inputs = parts.word[token][None] + parts.position[places] + parts.token_type[token_type][None]
    inputs = inputs - inputs.mean(dim=1, keepdim=True)
    row = row.to(torch.float64)
    return (inputs @ row).abs() / (inputs.norm(dim=1) * row.norm()).clamp_min(1e-300)


def _sits_loud(
    row: torch.Tensor, token: int, loud: torch.Tensor, quiet: torch.Tensor, parts: EmbeddingParts, token_type: int
) -> bool:
    """Whether a token the quiet fit placed is rather seen once at a loud position: its row (decoder share
    removed) is nearly orthogonal at a loud position (``ORTHOGONAL_MAX``), and ``LOUD_MARGIN`` times less so at
    every live quiet one."""
    at_loud = float(_cosines(row, token, loud, parts, token_type).min())
    at_quiet = float(_cosines(row, token, quiet, parts, token_type).min()) if len(quiet) else math.inf
    return at_loud <= ORTHOGONAL_MAX and at_quiet >= LOUD_MARGIN * at_loud


def _move_far_shares(
    weights: torch.Tensor,
    slack: torch.Tensor,
    row: torch.Tensor,
    token: int,
    live: torch.Tensor,
    parts: EmbeddingParts,
    token_type: int,
) -> None:
    """Move, in place, a nearly orthogonal token's small shares at the live positions where its row (decoder share
    removed) is far from orthogonal from ``weights`` to ``slack``: a token seen once sits where its row is most
    orthogonal, and the quiet fit's small shares elsewhere are its slack. Kept: shares of at least ``FAR_SHARE``,
    and everything when nothing would be left. A token seen twice whose one occurrence dominates looks the same, so
    the moved shares are offered after the others, not dropped."""
    cosine = _cosines(row, token, live, parts, token_type)
    best = float(cosine.min())
    if best > ORTHOGONAL_MAX:
        return
    far = live[(cosine > FAR_RATIO * best) & (weights[live] < FAR_SHARE)]
    if bool((weights[live] > 0).sum() > (weights[far] > 0).sum()):
        slack[far] = weights[far]
        weights[far] = 0.0


def _pair_masked(
    word: torch.Tensor,
    targets: torch.Tensor,
    bag: list[int],
    mask: int,
    iterations: int,
    labels: set[int],
    parts: EmbeddingParts | None,
    token_type: int,
    decoder_bias: torch.Tensor | None,
    bias_gradient: torch.Tensor | None,
) -> Pairing | None:
    """Pairing of a masked-LM update (tied decoder): the fit on the quiet positions, without [MASK], after
    projecting the decoder's share out; each loud position gets [MASK] and every token's unplaced weight, only at its
    nearly orthogonal loud positions when ``parts`` (the embedding tables) are given. With the decoder's bias
    gradient too, each row's decoder share is fitted (``decoder_share``) and removed before that test, a token
    the fit placed on quiet positions but seen once at a loud one is pooled there too, and a nearly orthogonal
    token's small shares far from its orthogonal positions become slack (``_move_far_shares``)."""
    basis = _decoder_basis(word, bag)
    if basis is None:
        return None
    complement = torch.eye(word.shape[1], dtype=torch.float64) - basis @ basis.T
    rows, targets = word[bag].to(torch.float64) @ complement, targets @ complement
    fitted = torch.tensor([i for i, t in enumerate(bag) if t != mask])
    for loud in _loud_splits(targets):
        quiet, noisy = (~loud).nonzero().flatten(), loud.nonzero().flatten()
        placed, residual = _fit(rows[fitted], targets[quiet], iterations, _project_capped_rows)
        if residual <= MASKED_MAX_RESIDUAL:
            break
    else:
        return None
    weights = torch.zeros(len(bag), len(targets), dtype=torch.float64)
    weights[fitted[:, None], quiet] = placed
    unplaced = (1 - placed.sum(1)).clamp_min(0)
    weights[fitted[:, None], noisy] = torch.where(unplaced >= POOLED_FLOOR, unplaced, 0.0)[:, None]
    slack = torch.zeros_like(weights)
    if parts is not None:
        predicted = None
        if bias_gradient is not None:
            inside = sorted({*bag, *labels})
            predicted = decoder_share(word, basis, inside, parts.word, decoder_bias, bias_gradient)
        live = (targets.norm(dim=1) > 0).nonzero().flatten()
        live_quiet = live[~loud[live]]
        for row, index in enumerate(fitted.tolist()):
            token = bag[index]
            if token in labels:
                continue
            own = word[token].to(torch.float64) - (0 if predicted is None else predicted(token))
            weight = None
            if unplaced[row] >= POOLED_FLOOR:
                weight = float(unplaced[row])
            elif predicted is not None and _sits_loud(own, token, noisy, live_quiet, parts, token_type):
                weight = 1.0
            if weight is not None:
                kept, closeness = _orthogonal_places(own, token, noisy, parts, token_type)
                weights[index, noisy] = 0.0
                weights[index, kept] = weight * closeness
            if predicted is not None:
                _move_far_shares(weights[index], slack[index], own, token, live, parts, token_type)
    if mask in bag:
        weights[bag.index(mask), noisy] = 1.0
    return Pairing(tokens=list(bag), weights=weights, residual=residual, pooled=loud, slack=slack)


def pair_tokens(
    update: Update,
    bag: list[int],
    positions: int,
    *,
    offset: int = 0,
    iterations: int = 3000,
    exact: bool = True,
    mask: int | None = None,
    parts: EmbeddingParts | None = None,
    token_type: int = 0,
    decoder_bias: torch.Tensor | None = None,
) -> Pairing | None:
    """Token-position weights for the candidate ``bag`` over the first ``positions`` positions (position 0 at
    table row ``offset``).

    None when the update lacks the word- or position-embedding gradient (frozen embeddings), or when the bag is
    empty. A tied decoder's share of the word gradient (mlm) is projected out when ``mask`` (the [MASK] id) is
    given; other tied updates (all-tokens, where every position is loud) are not paired. ``exact`` (span's use):
    also None when the rows outside the bag are not exactly zero, or not a decoder's low-rank share, i.e. under
    noise, where span's anchors would mislead (CoLA, B=4, noise 1e-6: 64.7 ROUGE-1 with noisy pairing, 69.5
    without). With ``exact=False`` a classifier's noisy update is paired too (its word gradient is the input side
    alone), for attacks that only narrow candidates with it. ``parts`` (the model's embedding tables, position rows
    from position 0) and ``token_type`` let an mlm pairing narrow where its pooled tokens sit among the loud
    positions (LayerNorm's orthogonality, above); with them, the decoder's share is fitted (``decoder_share``, from
    the decoder's bias ``decoder_bias``, None for zero, and the update's gradient of it) and removed first.
    """
    word, position = _gradient(update, WORD), _gradient(update, POSITION)
    if word is None or position is None or not bag:
        return None
    targets = position[offset : offset + positions].to(torch.float64)
    task = update.metadata.task
    if not _untied(word, bag):
        if task == "mlm" and mask is not None:
            labels = set(label_bag(update) or ())
            return _pair_masked(
                word, targets, bag, mask, iterations, labels, parts, token_type, decoder_bias,
                output_bias_gradient(update),
            )
        if exact or task != "classification":
            return None
    weights, residual = _fit(word[bag].to(torch.float64), targets, iterations, _project_simplex_rows)
    return Pairing(tokens=list(bag), weights=weights, residual=residual)
