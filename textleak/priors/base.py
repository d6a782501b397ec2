"""The language-prior interface: a log-probability for each token-id sequence, in the attacked tokenizer's ids.

Discrete search ranks candidate sentences by gradient distance plus a weighted prior score; any object with
``score`` fits. Sequences hold content tokens only: callers strip [CLS]/[SEP]/[PAD] and priors add their own
sentence boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class LanguagePrior(Protocol):
    """A language model over the attacked tokenizer's vocabulary."""

    def score(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Total log-probability (natural log) of each sequence, shape ``(len(sequences),)``."""
        ...


def mean_negative_log_prob(prior: LanguagePrior, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Log-perplexity per sequence: the negative log-probability divided by the tokens scored (length + 1 end)."""
    lengths = torch.tensor([len(s) + 1 for s in sequences], dtype=torch.float64)
    return -prior.score(sequences).to(torch.float64) / lengths
