"""A static, self-contained HTML report: tables, plots as embedded PNG, example sentences, failures.

Every piece of text that came from data or configuration is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from typing import Any

from textleak.evaluation.aggregate import SettingSummary, setting_of
from textleak.evaluation.plots import batch_size_plot, defense_plot, matplotlib_available
from textleak.evaluation.tables import ANCHOR_NOTE, NO_ANCHOR, VARIANT_NAMES, anchor_grid, summary_grid

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
.note { color: #666; font-size: 0.9em; }
img { max-width: 100%; }
"""


def html_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """An escaped HTML table."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes | None, alt: str, missing: str) -> str:
    if png is None:
        return f'<p class="note">{html.escape(missing)}</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def example_rows(records: Sequence[dict[str, Any]], *, limit: int = 12) -> list[list[Any]]:
    """(setting, original, recovered, batch ROUGE-1) pairs from the first batch of each setting, taken in turn
    across (data set, attack) groups so that a large matrix shows every data set and attack before repeating one."""
    first: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        if record["status"] == "ok":
            setting = setting_of(record)
            if setting not in first or record["batch_index"] < first[setting]["batch_index"]:
                first[setting] = record
    candidates: list[tuple[int, int, list[Any]]] = []  # (turn in its (data set, attack) group, order seen, row)
    turns: dict[tuple[str, str], int] = {}
    for setting, record in first.items():
        label = "{} B={} {} [{}] {} {}".format(*setting)
        score = f"{100 * record['scores']['without_special']['rouge1']:.1f}"
        for original, recovered in zip(record["sentences"], record["recovered"], strict=True):
            group = (record["dataset"], record["attack"])
            turns[group] = turns.get(group, -1) + 1
            candidates.append((turns[group], len(candidates), [label, original, recovered, score]))
    return [row for _, _, row in sorted(candidates, key=lambda c: c[:2])[:limit]]


def render_html(
    summaries: Sequence[SettingSummary],
    records: Sequence[dict[str, Any]],
    *,
    config: dict[str, Any],
    variant: str = "without_special",
    examples: int = 12,
    title: str = "textleak evaluation",
) -> str:
    """The whole report as one HTML document (no external files or scripts)."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts.append(f"<h2>Recovery by setting</h2><p class='note'>{html.escape(VARIANT_NAMES[variant])}; "
                 "mid [95% bootstrap interval] over batches, in %; seconds: mean per batch (attack only).</p>")
    parts.append(html_table(*summary_grid(summaries, variant=variant)))
    header, rows = anchor_grid(summaries)
    parts.append("<h2>Published numbers beside ours</h2>")
    parts.append(html_table(header, rows) + f"<p class='note'>{html.escape(ANCHOR_NOTE)}</p>" if rows
                 else f"<p class='note'>{html.escape(NO_ANCHOR)}</p>")
    parts.append("<h2>Plots</h2>")
    if matplotlib_available():
        parts.append(_image(batch_size_plot(summaries, variant=variant), "ROUGE-1 against batch size",
                            "No undefended setting to plot against batch size."))
        parts.append(_image(defense_plot(summaries, variant=variant), "ROUGE-1 against defense strength",
                            "No defended setting to plot against defense strength."))
    else:
        parts.append("<p class='note'>Plots omitted: matplotlib is not installed "
                     "(pip install \"textleak[plot]\").</p>")
    parts.append("<h2>Examples</h2><p class='note'>The first batch of each setting; recovered sentences are "
                 "shown beside the original they were matched to (Hungarian on ROUGE-1).</p>")
    parts.append(html_table(["setting", "original", "recovered", "batch ROUGE-1 (%)"], example_rows(records,
                                                                                                 limit=examples)))
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        parts.append(f"<h2>Timeouts and errors ({len(failed)})</h2>")
        parts.append(html_table(["key", "status", "message"],
                                [[r["key"], r["status"], r.get("error", "")] for r in failed[:50]]))
    parts.append("<h2>Configuration</h2><pre>" + html.escape(json.dumps(config, indent=2, default=str)) + "</pre>")
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")
