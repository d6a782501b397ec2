"""The aggregate table as Markdown, CSV and JSON, and the published numbers beside ours."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from textleak.evaluation.aggregate import VARIANTS, Interval, SettingSummary
from textleak.evaluation.anchors import MODEL, SOURCE, TASK, anchors_for
from textleak.evaluation.matrix import NO_DEFENSE

COLUMNS = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L"), ("token_accuracy", "token acc"),
           ("exact_match", "exact"))
VARIANT_NAMES = {"without_special": "without special tokens", "with_special": "with special tokens ([CLS]/[SEP])"}


def check_variant(variant: str) -> str:
    """Return the variant name, or raise naming the known ones."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown score variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return variant


def percent(interval: Interval | None) -> str:
    """``mid [low, high]`` in percent, or ``-``."""
    if interval is None:
        return "-"
    return f"{100 * interval.mid:.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def seconds(interval: Interval | None) -> str:
    """Mean seconds per batch, or ``-``."""
    return "-" if interval is None else f"{interval.mean:.2f}"


def markdown(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pipes in cells escaped)."""

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(row) for row in rows)]) + "\n"


def summary_grid(
    summaries: Sequence[SettingSummary], *, variant: str = "without_special"
) -> tuple[list[str], list[list[Any]]]:
    """Header and rows, one per setting: batches, ROUGE-1/2/L, token accuracy, exact match (``variant``), ROUGE-1/2
    of the other variant, seconds per batch; mid [95% interval] in percent."""
    other = next(v for v in VARIANTS if v != check_variant(variant))
    other_tag = "with specials" if other == "with_special" else "without specials"
    header = ["data", "B", "attack", "defense", "model", "task", "batches", *(name for _, name in COLUMNS),
              f"ROUGE-1 ({other_tag})", f"ROUGE-2 ({other_tag})", "s/batch", "timeouts", "errors"]
    rows = []
    for summary in summaries:
        s, ours, theirs = summary.setting, summary.metrics.get(variant, {}), summary.metrics.get(other, {})
        rows.append(
            [s["dataset"], s["batch_size"], s["attack"], s["defense"], s["model"], s["task"], summary.batches,
             *(percent(ours.get(metric)) for metric, _ in COLUMNS),
             percent(theirs.get("rouge1")), percent(theirs.get("rouge2")),
             seconds(summary.seconds), summary.timeouts, summary.errors]
        )
    return header, rows


def anchor_rows(summaries: Sequence[SettingSummary]) -> list[dict[str, Any]]:
    """Published numbers and ours (undefended settings only) for each (data set, batch size) that has both."""
    rows: list[dict[str, Any]] = []
    shown: set[tuple[str, int]] = set()
    for summary in summaries:
        s = summary.setting
        setting = (s["dataset"], s["batch_size"])
        if s["defense"] != NO_DEFENSE or not summary.batches or not anchors_for(*setting):
            continue
        if setting not in shown:
            shown.add(setting)
            for anchor in anchors_for(*setting):
                rows.append({"dataset": anchor.dataset, "batch_size": anchor.batch_size, "who": "published",
                             "method": anchor.method, "model": MODEL, "task": TASK, "batches": 100,
                             "rouge1_with": anchor.rouge1, "rouge2_with": anchor.rouge2,
                             "rouge1_without": None, "rouge2_without": None})
        metrics = summary.metrics
        rows.append({"dataset": s["dataset"], "batch_size": s["batch_size"], "who": "ours", "method": s["attack"],
                     "model": s["model"], "task": s["task"], "batches": summary.batches,
                     **{f"{m}_{tag}": 100 * metrics[v][m].mid for m in ("rouge1", "rouge2")
                        for v, tag in (("with_special", "with"), ("without_special", "without"))}})
    return rows


ANCHOR_NOTE = (f"Published: {SOURCE}; they decode with [CLS]/[SEP], so compare with our 'with specials' columns. "
               "Ours may use another model, task, sentence sample and far fewer batches: read the rows side by side, "
               "not as a replication.")
NO_ANCHOR = "No setting of this run matches a published one (CoLA / SST-2 / RT at B=1, 2, 4, 8, no defense)."


def anchor_grid(summaries: Sequence[SettingSummary]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of the anchor comparison (ROUGE in percent, mid F-measure)."""

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    header = ["data", "B", "", "method", "model", "task", "batches", "R-1 with specials", "R-2 with specials",
              "R-1 without", "R-2 without"]
    rows = [[r["dataset"], r["batch_size"], r["who"], r["method"], r["model"], r["task"], r["batches"],
             number(r["rouge1_with"]), number(r["rouge2_with"]), number(r["rouge1_without"]),
             number(r["rouge2_without"])] for r in anchor_rows(summaries)]
    return header, rows


def markdown_report(summaries: Sequence[SettingSummary], *, variant: str = "without_special") -> str:
    """The Markdown report body: the aggregate table, then the published numbers beside ours."""
    header, rows = anchor_grid(summaries)
    anchors = markdown(header, rows) + "\n" + ANCHOR_NOTE if rows else NO_ANCHOR
    return (f"## Recovery by setting ({VARIANT_NAMES[variant]}; mid [95% bootstrap interval] over batches, %)\n\n"
            + markdown(*summary_grid(summaries, variant=variant))
            + "\n## Published numbers beside ours\n\n" + anchors + "\n")


def csv_text(summaries: Sequence[SettingSummary]) -> str:
    """Flat CSV: the setting, batch counts, and low/mid/high/mean of every metric in both variants (fractions)."""
    rows = [summary.flat() for summary in summaries]
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
