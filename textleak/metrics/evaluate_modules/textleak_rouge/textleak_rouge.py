"""Offline Hugging Face `evaluate` module wrapping textleak.metrics.rouge."""

import datasets
import evaluate

from textleak.metrics.rouge import rouge

_DESCRIPTION = (
    "ROUGE-1/2/L F-measure, precision and recall from rouge_score (no stemming), "
    "averaged over aligned prediction/reference pairs. Loads from a local folder, no hub access."
)
_KWARGS_DESCRIPTION = (
    "Args: predictions (list[str]), references (list[str]) aligned by position. "
    "Returns: dict with rouge1, rouge2, rougeL and their _precision/_recall, each a mean in [0, 1]."
)


class TextleakRouge(evaluate.Metric):
    """Mean of textleak.metrics.rouge over aligned pairs (no Hungarian matching)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        if not references:
            raise ValueError("textleak_rouge: no prediction/reference pairs to score")
        scores = [rouge(p, r) for p, r in zip(predictions, references, strict=True)]
        return {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
