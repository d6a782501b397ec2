"""ROUGE-1/2/L between a reconstructed and a reference sentence (rouge_score)."""

from functools import lru_cache

from rouge_score import rouge_scorer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    """Build the scorer once; it is stateless, so sharing it is safe."""
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)


def rouge(pred: str, ref: str) -> dict[str, float]:
    """ROUGE F-measure (``rouge1``...) plus ``<type>_precision`` / ``<type>_recall``.

    rouge_score lowercases and keeps only ``[a-z0-9]+`` runs, so "[CLS]" is
    scored as the word "cls" and non-ASCII letters are dropped.
    """
    # RougeScorer.score takes (target, prediction): reference first.
    scores = _scorer().score(ref, pred)
    result: dict[str, float] = {}
    for name in ROUGE_TYPES:
        score = scores[name]
        result[name] = float(score.fmeasure)
        result[f"{name}_precision"] = float(score.precision)
        result[f"{name}_recall"] = float(score.recall)
    return result
