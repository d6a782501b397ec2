"""Token-level leakage metrics on id sequences (no tokenizer needed)."""

from collections import Counter
from collections.abc import Sequence


def _ids(seq: Sequence[int]) -> list[int]:
    """Plain Python ints, so numpy/torch scalars hash and compare by value."""
    return [int(token) for token in seq]


def _require_reference(ref: list[int], metric: str) -> None:
    if not ref:
        raise ValueError(f"{metric}: reference sequence is empty; the metric is undefined")


def token_accuracy(pred: Sequence[int], ref: Sequence[int]) -> float:
    """Fraction of reference positions where the prediction has the same id.

    Position-exact: missing positions count as wrong and extra predicted
    positions earn nothing, so the score is always in [0, 1].
    """
    pred_ids, ref_ids = _ids(pred), _ids(ref)
    _require_reference(ref_ids, "token_accuracy")
    hits = sum(p == r for p, r in zip(pred_ids, ref_ids, strict=False))
    return hits / len(ref_ids)


def bag_of_tokens(pred: Sequence[int], ref: Sequence[int]) -> dict[str, float]:
    """Order-free precision/recall/F1 over token multisets.

    Overlap is the Counter intersection, so a token repeated k times in the
    reference can be credited at most k times. An empty prediction scores 0.
    """
    pred_ids, ref_ids = _ids(pred), _ids(ref)
    _require_reference(ref_ids, "bag_of_tokens")
    overlap = sum((Counter(pred_ids) & Counter(ref_ids)).values())
    precision = overlap / len(pred_ids) if pred_ids else 0.0
    recall = overlap / len(ref_ids)
    total = precision + recall
    f1 = 2 * precision * recall / total if total else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def exact_match(pred: Sequence[int], ref: Sequence[int]) -> float:
    """1.0 when the id sequences are identical, else 0.0."""
    return 1.0 if _ids(pred) == _ids(ref) else 0.0
