"""Offline Hugging Face `evaluate` module wrapping textleak.metrics.token_accuracy."""

import datasets
import evaluate

from textleak.metrics.tokens import token_accuracy

_DESCRIPTION = (
    "Position-exact token accuracy: fraction of reference positions whose id the "
    "prediction reproduces, averaged over aligned pairs. Loads from a local folder, no hub access."
)
_KWARGS_DESCRIPTION = (
    "Args: predictions (list[list[int]]), references (list[list[int]]) aligned by position. "
    "Returns: dict with token_accuracy, a mean in [0, 1]."
)


class TextleakTokenAccuracy(evaluate.Metric):
    """Mean of textleak.metrics.token_accuracy over aligned pairs."""

    def _info(self) -> evaluate.MetricInfo:
        ids = datasets.List(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": ids, "references": ids}),
        )

    def _compute(self, predictions: list[list[int]], references: list[list[int]]) -> dict[str, float]:
        if not references:
            raise ValueError("textleak_token_accuracy: no prediction/reference pairs to score")
        scores = [token_accuracy(p, r) for p, r in zip(predictions, references, strict=True)]
        return {"token_accuracy": sum(scores) / len(scores)}
