"""Span check of one encoder layer: an orthonormal basis of its inputs, and residuals of embedding candidates.

For a linear layer ``Y = X W^T`` the weight gradient is ``G^T X``, so its row space is spanned by the layer's
inputs. For the first layer those inputs are ``LayerNorm(word + position + type)``; every candidate
(token, position, type) is scored by its relative residual against that span. The residual is computed from
per-component Gram products (word x position-type), never one projection per candidate, in float64 and in
vocabulary chunks so that memory stays bounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from textleak.update import Update

#: Names of the query/key/value projections across the BERT family (BERT/RoBERTa/MiniLM, DistilBERT, others), by role.
PROJECTIONS = {
    "query": ("query", "q_lin", "q_proj"),
    "key": ("key", "k_lin", "k_proj"),
    "value": ("value", "v_lin", "v_proj"),
}
QKV_NAMES = tuple(name for names in PROJECTIONS.values() for name in names)
#: Singular values below this fraction of the largest are never counted as signal.
RANK_FLOOR = 1e-12
#: The lower half of a spectrum under i.i.d. noise follows a Gaussian matrix's up to a common scale: the spread
#: (largest over smallest) of their ratios stays below this there (1.02-1.04 under noise or DP-SGD on MiniLM), while
#: pruning or masking leaves a structured bulk (1.1-2.1) and a clean full-rank spectrum spreads far more.
GAUSSIAN_SPREAD = 1.1
#: Without a clear fall or a Gaussian bulk, singular values above this multiple of the median stand out of the bulk.
NOISE_BULK = 2.5


@dataclass(frozen=True)
class SpanBasis:
    """Orthonormal basis (d, rank) of a layer's input span, with the normalised spectrum it was cut from."""

    basis: torch.Tensor
    spectrum: torch.Tensor
    rank: int
    gap: float  # sigma[rank-1] / sigma[rank]; inf when the span is the whole space
    noise: float = 0.0  # a true input row's typical relative residual under the update's additive noise (0: none seen)
    edge: bool = False  # the rank was read at the float32 floor's edge (a clean update whose span leaves room)

    @property
    def full(self) -> bool:
        """Whether the span fills the space: LayerNorm outputs of an untrained model (gain 1, bias 0) are all
        centred, so they never span more than d - 1 dimensions."""
        return self.rank >= self.basis.shape[0] - 1

    def residual(self, rows: torch.Tensor) -> torch.Tensor:
        """Relative residual ``|x - P x| / |x|`` of each row of ``rows`` against the span."""
        rows = rows.to(torch.float64)
        rest = rows - (rows @ self.basis) @ self.basis.T
        return rest.norm(dim=-1) / rows.norm(dim=-1).clamp_min(1e-300)


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder's layer list, found by structure (``base_model.encoder.layer`` or ``.transformer.layer``)."""
    base = getattr(model, "base_model", model)
    for owner in ("encoder", "transformer"):
        layers = getattr(getattr(base, owner, None), "layer", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the encoder layers of {type(model).__name__}")


def first_attention(model: torch.nn.Module) -> tuple[int, dict[str, torch.nn.Linear]] | None:
    """The first encoder layer's head count and its query/key/value projections by role ("query", "key", "value";
    found by structure and ``PROJECTIONS``), or None when the layer has no recognisable attention module."""
    attention = next(
        (m for m in encoder_layers(model)[0].modules() if hasattr(m, "num_attention_heads") or hasattr(m, "n_heads")),
        None,
    )
    if attention is None:
        return None
    heads = getattr(attention, "num_attention_heads", None) or getattr(attention, "n_heads", None)
    children = dict(attention.named_children())
    found = {role: next((children[n] for n in names if n in children), None) for role, names in PROJECTIONS.items()}
    return int(heads), {role: m for role, m in found.items() if isinstance(m, torch.nn.Linear)}


def qkv_gradient_names(model: torch.nn.Module, layer_index: int) -> list[str]:
    """Parameter names of the query/key/value weights of encoder layer ``layer_index``."""
    layer = encoder_layers(model)[layer_index]
    owner = {id(p): name for name, p in model.named_parameters()}
    names = [
        owner[id(module.weight)]
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in QKV_NAMES
    ]
    if not names:
        raise ValueError(f"no query/key/value projections found in encoder layer {layer_index}")
    return names


def stacked_gradient(update: Update, names: list[str]) -> torch.Tensor:
    """The weight gradients of ``names`` stacked along the output axis, in float64."""
    missing = [n for n in names if n not in update.gradients]
    if missing:
        raise ValueError(f"the update lacks the gradients {missing}")
    return torch.cat([update.gradients[n].to(torch.float64) for n in names], dim=0)


def span_basis(stacked: torch.Tensor, rank_tol: float | None = None) -> SpanBasis:
    """Basis of the row space of ``stacked`` (outputs x inputs).

    ``rank_tol`` keeps singular values above that fraction of the largest; None cuts at the largest drop of the
    spectrum (float32 client gradients leave a noise floor near 1e-8, so a fixed tolerance overestimates rank), or,
    when nothing falls clearly, at the edge of the additive noise's bulk (``_noise_bulk``).
    """
    _, sigma, vh = torch.linalg.svd(stacked, full_matrices=False)
    spectrum = sigma / sigma[0].clamp_min(1e-300)
    d = vh.shape[1]
    rank, noise, edge = _cut(spectrum, tuple(stacked.shape), rank_tol)
    gap = math.inf if rank >= len(spectrum) else float(spectrum[rank - 1] / spectrum[rank].clamp_min(1e-300))
    return SpanBasis(
        basis=vh[:rank].T.contiguous(),
        spectrum=spectrum,
        rank=min(rank, d),
        gap=gap,
        noise=noise,
        edge=edge,
    )


def span_score(stacked: torch.Tensor) -> tuple[int, float]:
    """(rank, nuclear norm) of ``stacked`` as ``span_basis`` reads them (automatic cut), from the singular values
    alone: about 3x faster than the basis (BERT-base's first layer: 0.3 s against 0.9 s), for peeling's label and
    rank tests, which need no basis."""
    sigma = torch.linalg.svdvals(stacked)
    rank, _, _ = _cut(sigma / sigma[0].clamp_min(1e-300), tuple(stacked.shape), None)
    return min(rank, stacked.shape[1]), float(sigma.sum())


def _cut(spectrum: torch.Tensor, shape: tuple[int, int], rank_tol: float | None) -> tuple[int, float, bool]:
    """(rank, noise, whether the rank was read at the float32 floor's edge) of a normalised spectrum: above
    ``rank_tol``, or at its largest drop (the edge), or at the edge of its noise bulk (see ``span_basis``)."""
    if rank_tol is not None:
        return max(1, int((spectrum > rank_tol).sum())), 0.0, False
    rank = _largest_drop(spectrum)
    return (rank, 0.0, True) if rank else (*_noise_bulk(spectrum, shape), False)


def _largest_drop(spectrum: torch.Tensor) -> int:
    """Rank at the last fall of the spectrum by at least 10x: the edge of the float32 noise floor; 0 without one.

    Inside the signal the spectrum can fall by 100x too (one dominant direction), but the noise floor below
    the true rank declines smoothly, so the last clear fall is the rank.
    """
    logs = torch.log10(spectrum.clamp_min(RANK_FLOOR * 1e-3))
    drops = logs[:-1] - logs[1:]
    drops[spectrum[:-1] <= RANK_FLOOR] = 0
    clear = (drops >= 1.0).nonzero().flatten()
    return int(clear[-1]) + 1 if len(clear) else 0


def _noise_bulk(spectrum: torch.Tensor, shape: tuple[int, int]) -> tuple[int, float]:
    """(rank, noise) of a spectrum without a clear fall: a low-rank gradient plus noise (noised, DP or pruned updates).

    Under i.i.d. noise the noise's singular values are a Gaussian matrix's of the same shape (a seeded sample),
    scaled by its standard deviation, which the lower half of the spectrum gives; the values above the sample's
    largest, so scaled, are signal. A true input row then leaves the estimated span by about
    ``std * sqrt(d - rank) / s`` (d = ``shape[1]``, the inputs) for the signal values ``s`` it draws on (first-order
    subspace perturbation): the median over the signal values is ``noise``, in the same relative units as
    ``SpanBasis.residual`` (MiniLM, CoLA B=4 under noise 1e-7 to 1e-5: within 1.3x of the true rows' median
    residual). Any other bulk (pruning, masking): the values above ``NOISE_BULK`` times the median, noise 0. Full
    rank when neither finds a bulk.
    """
    bulk = _gaussian_spectrum(shape)
    lower = slice(len(spectrum) // 2, len(spectrum))
    ratios = spectrum[lower] / bulk[lower]
    if float(ratios.max() / ratios.min().clamp_min(1e-300)) <= GAUSSIAN_SPREAD:
        std = float(ratios.median())
        rank = int((spectrum > std * bulk[0]).sum())
        if 0 < rank <= len(spectrum) // 2:
            return rank, std * math.sqrt(shape[1] - rank) * float(spectrum[:rank].pow(-2).median().sqrt())
        return len(spectrum), 0.0
    signal = int((spectrum > NOISE_BULK * float(spectrum.median())).sum())
    return (len(spectrum) if signal == 0 or signal > len(spectrum) // 2 else signal), 0.0


@lru_cache(maxsize=8)
def _gaussian_spectrum(shape: tuple[int, int]) -> torch.Tensor:
    """Singular values of a seeded standard Gaussian matrix of ``shape``: one SVD per gradient shape, shared by
    both layers' spans and by every update of the same model."""
    sample = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return torch.linalg.svdvals(sample)


@dataclass(frozen=True)
class EmbeddingParts:
    """The first layer's input pieces: word, position and type tables plus the LayerNorm, in float64."""

    word: torch.Tensor  # (V, d)
    position: torch.Tensor  # (P, d): row p is position p (RoBERTa's offset rows already dropped)
    token_type: torch.Tensor  # (T, d); a single zero row for models without token types
    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float
    position_offset: int = 0  # table row of position 0 (RoBERTa: padding_idx + 1)


def embedding_parts(model: torch.nn.Module) -> EmbeddingParts:
    """Read the embedding tables and LayerNorm of a BERT-family model by structure.

    RoBERTa-style embeddings (a ``padding_idx`` on the embedding module) number positions from
    ``padding_idx + 1``; their first rows are dropped so that row p is always the p-th token's position.
    """
    emb = getattr(model, "base_model", model).embeddings
    offset = getattr(emb, "padding_idx", None)
    offset = 0 if offset is None else offset + 1
    word = emb.word_embeddings.weight.detach().to(torch.float64)
    types = getattr(emb, "token_type_embeddings", None)
    token_type = torch.zeros(1, word.shape[1], dtype=torch.float64) if types is None else types.weight.detach()
    norm = next(m for m in emb.modules() if isinstance(m, torch.nn.LayerNorm))
    return EmbeddingParts(
        word=word,
        position=emb.position_embeddings.weight.detach()[offset:].to(torch.float64),
        token_type=token_type.to(torch.float64),
        gamma=norm.weight.detach().to(torch.float64),
        beta=norm.bias.detach().to(torch.float64),
        eps=float(norm.eps),
        position_offset=offset,
    )


def candidate_residuals(
    parts: EmbeddingParts,
    span: SpanBasis,
    positions: int,
    types: list[int],
    *,
    keep: int = 32,
    chunk: int = 4096,
    exclude: torch.Tensor | None = None,
    vocabulary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` lowest relative residuals per (position, type) over the whole vocabulary, or over the token ids
    ``vocabulary`` only.

    Returns (residuals, token ids), each (positions, len(types), keep), residuals ascending. ``exclude`` is a
    (V,) mask of tokens never to propose (reserved entries the tokenizer never emits).
    With z = e + p + t, LayerNorm gives x = gamma * C z / s + beta (C centres, s = sqrt(|C z|^2 / d + eps)),
    so ``|R x|^2`` and ``|x|^2`` (R = projection off the span) expand into word x (position, type) Gram products.
    """
    basis, d = span.basis, parts.word.shape[1]
    pt = (parts.position[:positions, None, :] + parts.token_type[types][None, :, :]).reshape(-1, d)
    pt_c = pt - pt.mean(-1, keepdim=True)
    u_pt = parts.gamma * pt_c
    ru_pt = u_pt - (u_pt @ basis) @ basis.T
    r_beta = parts.beta - basis @ (basis.T @ parts.beta)
    right = torch.cat([ru_pt, u_pt], dim=0).T  # (d, 2m)
    m = pt.shape[0]
    pt_sq, rupt_sq, upt_sq = (pt_c * pt_c).sum(-1), (ru_pt * ru_pt).sum(-1), (u_pt * u_pt).sum(-1)
    rupt_b, upt_b = ru_pt @ r_beta, u_pt @ parts.beta
    rb_sq, b_sq = float(r_beta @ r_beta), float(parts.beta @ parts.beta)
    best_res = torch.full((m, 0), math.inf, dtype=torch.float64)
    best_ids = torch.zeros((m, 0), dtype=torch.long)
    scored = torch.arange(parts.word.shape[0]) if vocabulary is None else vocabulary
    if exclude is not None:
        scored = scored[~exclude[scored]]
    for start in range(0, len(scored), chunk):
        e_c = parts.word[scored[start : start + chunk]]
        e_c = e_c - e_c.mean(-1, keepdim=True)
        u_e = parts.gamma * e_c
        proj = u_e @ basis
        ue_sq = (u_e * u_e).sum(-1)
        rue_sq = ue_sq - (proj * proj).sum(-1)
        cross = u_e @ right  # u_e . R u_pt  and  u_e . u_pt
        s_sq = ((e_c * e_c).sum(-1)[:, None] + pt_sq + 2 * (e_c @ pt_c.T)) / d + parts.eps
        s = s_sq.sqrt()
        ra_sq = rue_sq[:, None] + rupt_sq + 2 * cross[:, :m]
        a_sq = ue_sq[:, None] + upt_sq + 2 * cross[:, m:]
        rue_b = u_e @ r_beta
        ue_b = u_e @ parts.beta
        res_sq = ra_sq / s_sq + 2 * (rue_b[:, None] + rupt_b) / s + rb_sq
        x_sq = a_sq / s_sq + 2 * (ue_b[:, None] + upt_b) / s + b_sq
        rel = (res_sq.clamp_min(0) / x_sq).sqrt().T  # (m, chunk)
        ids = scored[start : start + chunk].expand(m, -1)
        merged = torch.cat([best_res, rel], dim=1)
        order = merged.topk(min(keep, merged.shape[1]), dim=1, largest=False)
        best_res = order.values
        best_ids = torch.cat([best_ids, ids], dim=1).gather(1, order.indices)
    shape = (positions, len(types), best_res.shape[1])
    return best_res.reshape(shape), best_ids.reshape(shape)


def first_layer_inputs(parts: EmbeddingParts, ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor):
    """LayerNorm(word + position + type) for explicit (token, position, type) triples; the slow reference."""
    z = parts.word[ids] + parts.position[positions] + parts.token_type[types]
    return torch.nn.functional.layer_norm(z, (z.shape[-1],), parts.gamma, parts.beta, parts.eps)
