"""Map recovered input embeddings back to tokens by nearest neighbour over the word-embedding table."""

from __future__ import annotations

from collections.abc import Collection

import torch
from transformers import PreTrainedTokenizerBase

METRICS = ("cosine", "l2")


def allowed_tokens(
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    *,
    candidates: Collection[int] | None = None,
    allow_mask: bool = False,
) -> torch.Tensor:
    """Boolean mask over the vocabulary of tokens that may fill a non-special position.

    [CLS], [SEP] and [PAD] are placed by the tokenizer's rules, never by the decoder; [MASK] only appears inside an
    MLM input; reserved entries such as BERT's ``[unused17]`` never come out of the tokenizer. ``candidates`` (from
    a side channel) restricts the choice further.
    """
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    if candidates is not None:
        ids = torch.tensor(sorted(candidates), dtype=torch.long)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"candidate token ids must be a non-empty subset of [0, {vocab_size})")
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[ids] = True
    structural = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    if not allow_mask:
        structural.append(tokenizer.mask_token_id)
    for token_id in structural:
        if token_id is not None and token_id < vocab_size:
            allowed[token_id] = False
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(vocab_size)))):
        if token is not None and token.startswith("[unused"):
            allowed[token_id] = False
    if not allowed.any():
        raise ValueError("no token is left to decode into: the candidate set holds only special tokens")
    return allowed


def nearest_tokens(
    embeddings: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor, *, metric: str = "cosine"
) -> torch.Tensor:
    """Index of the nearest allowed row of ``table`` for every row of ``embeddings`` (shape ``(..., d)``).

    ``allowed`` is a (V,) mask shared by every row, or one mask per row, shaped ``(..., V)`` like ``embeddings``.
    """
    if metric not in METRICS:
        raise ValueError(f"decode metric must be one of {METRICS}, got {metric!r}")
    flat = embeddings.reshape(-1, embeddings.shape[-1]).to(table.dtype)
    if metric == "cosine":
        scores = torch.nn.functional.normalize(flat, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    else:
        scores = -torch.cdist(flat, table)
    if allowed.dim() == 1:
        scores[:, ~allowed] = -torch.inf
    else:
        scores = scores.masked_fill(~allowed.reshape(-1, table.shape[0]), -torch.inf)
    return scores.argmax(-1).reshape(embeddings.shape[:-1])
