"""Where the tokens go: sequence lengths (known, or recovered from the gradient) and the special-token layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from textleak.errors import CapabilityError
from textleak.update import Update

LENGTH_MODES = ("auto", "known", "recovered")


def recovered_length(update: Update) -> int:
    """Padded sequence length read off the position-embedding gradient: its last non-zero row.

    Padding positions are masked out of attention, so they receive exactly zero gradient.
    """
    names = [n for n in update.gradients if n.endswith("position_embeddings.weight")]
    if not names:
        raise CapabilityError("cannot recover the sequence length: the update has no position-embedding gradient")
    rows = update.gradients[names[0]].abs().sum(-1).nonzero()
    if rows.numel() == 0:
        raise CapabilityError("cannot recover the sequence length: the position-embedding gradient is all zero")
    return int(rows.max()) + 1


def resolve_lengths(update: Update, mode: str) -> tuple[list[int], list[str]]:
    """Per-sequence lengths ([CLS] and [SEP] included) and any warning about how they were obtained."""
    if mode not in LENGTH_MODES:
        raise ValueError(f"length must be one of {LENGTH_MODES}, got {mode!r}")
    known = update.metadata.knowledge.lengths
    if mode == "known" and known is None:
        raise CapabilityError("length='known' but the update does not reveal sequence lengths")
    if known is not None and mode != "recovered":
        return list(known), []
    length = recovered_length(update)
    warnings = []
    if update.metadata.batch_size > 1:
        warnings.append(
            f"recovered only the longest length ({length}); every sequence of the batch is assumed that long"
        )
    return [length] * update.metadata.batch_size, warnings


@dataclass(frozen=True)
class Layout:
    """Token slots of a batch: fixed special tokens, free positions to recover, attention mask."""

    fixed_ids: torch.Tensor  # (B, L) special token ids, pad id after the end; free slots hold the pad id too
    free: torch.Tensor  # (B, L) bool: positions whose token is unknown
    attention_mask: torch.Tensor  # (B, L)

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, lengths: list[int], seq_len: int | None = None) -> Layout:
        """[CLS] first, [SEP] last, [PAD] after it, as a BERT tokenizer lays out a padded batch."""
        seq_len = max(lengths) if seq_len is None else seq_len
        if min(lengths) < 2 or max(lengths) > seq_len:
            raise ValueError(f"lengths {lengths} do not fit sequences of length {seq_len} with [CLS] and [SEP]")
        positions = torch.arange(seq_len)
        length = torch.tensor(lengths)[:, None]
        attention = (positions[None, :] < length).long()
        fixed = torch.full((len(lengths), seq_len), tokenizer.pad_token_id, dtype=torch.long)
        fixed[:, 0] = tokenizer.cls_token_id
        fixed[torch.arange(len(lengths)), length[:, 0] - 1] = tokenizer.sep_token_id
        free = (positions[None, :] > 0) & (positions[None, :] < length - 1)
        return cls(fixed, free, attention)

    def fill(self, free_ids: torch.Tensor) -> list[list[int]]:
        """Sequences (unpadded) with ``free_ids`` (B, L) written into the free slots."""
        ids = torch.where(self.free, free_ids, self.fixed_ids)
        return [row[: int(n)].tolist() for row, n in zip(ids, self.attention_mask.sum(1), strict=True)]
