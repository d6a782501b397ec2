"""Load textleak's metrics as Hugging Face `evaluate` modules from local folders."""

from pathlib import Path
from typing import Any

_MODULES_DIR = Path(__file__).parent / "evaluate_modules"
EVALUATE_METRICS = {
    "rouge": _MODULES_DIR / "textleak_rouge",
    "token_accuracy": _MODULES_DIR / "textleak_token_accuracy",
}


def load_evaluate_metric(name: str) -> Any:
    """``evaluate.load`` of the bundled module folder; never contacts the hub.

    A local folder is resolved before any hub lookup, so this works with
    HF_HUB_OFFLINE=1 and no network. Returns an ``evaluate.EvaluationModule``.
    """
    if name not in EVALUATE_METRICS:
        known = ", ".join(sorted(EVALUATE_METRICS))
        raise ValueError(f"unknown textleak evaluate metric {name!r}; known: {known}")
    import evaluate  # deferred: importing evaluate pulls in datasets/pyarrow (slow)

    return evaluate.load(str(EVALUATE_METRICS[name]))
