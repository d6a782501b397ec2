"""Optimal one-to-one matching of reconstructions to references."""

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
from scipy.optimize import linear_sum_assignment

T = TypeVar("T")
U = TypeVar("U")


def hungarian_match(
    preds: Sequence[T], refs: Sequence[U], score: Callable[[T, U], float]
) -> list[tuple[int, int]]:
    """Pairs (pred_index, ref_index) maximising the total score, sorted by ref index.

    A batch attack recovers sentences in no particular order, so each
    prediction is credited to the reference it fits best overall (not
    greedily). With unequal counts, min(len(preds), len(refs)) pairs are returned.
    """
    if not preds or not refs:
        return []
    matrix = np.array([[score(p, r) for r in refs] for p in preds], dtype=float)
    rows, cols = linear_sum_assignment(matrix, maximize=True)
    return sorted(zip(rows.tolist(), cols.tolist(), strict=True), key=lambda pair: pair[1])
