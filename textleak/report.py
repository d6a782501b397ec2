"""Readable text output: original and recovered sentences side by side, and metric tables."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

METRIC_COLUMNS = ("rouge1", "rouge2", "rougeL", "token_accuracy", "bag_f1", "exact_match")


def side_by_side(pairs: Sequence[tuple[str, str]], *, width: int = 48) -> str:
    """Two wrapped columns, 'original' and 'recovered', one row per sentence pair."""
    lines = [f"{'original':<{width}} | recovered", f"{'-' * width}-+-{'-' * width}"]
    for original, recovered in pairs:
        left = textwrap.wrap(original, width) or [""]
        right = textwrap.wrap(recovered, width) or [""]
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"{a:<{width}} | {b}")
    return "\n".join(lines)


def metrics_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = METRIC_COLUMNS) -> str:
    """A fixed-width table: one row per named result, metric values as percentages."""
    label_width = max([len(name) for name in rows] + [8])
    header = f"{'':<{label_width}}  " + "  ".join(f"{c:>14}" for c in columns)
    body = [
        f"{name:<{label_width}}  "
        + "  ".join(f"{100 * values[c]:>14.1f}" if c in values else f"{'-':>14}" for c in columns)
        for name, values in rows.items()
    ]
    return "\n".join([header, *body])
