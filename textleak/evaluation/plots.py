"""Plots for the report as PNG bytes: recovery vs batch size, recovery vs defense strength.

Needs matplotlib (``pip install "textleak[plot]"``); without it every function returns None and the report says so.
Figures are built with ``matplotlib.figure.Figure`` directly: no pyplot, no global backend switch.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from textleak.evaluation.aggregate import SettingSummary
from textleak.evaluation.matrix import DEFENSE_JOIN, NO_DEFENSE


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def defense_strength(setting: str) -> tuple[str, float | str]:
    """(family, strength) of a defense setting: the defense names joined by ``+``, and the first option value of
    the first spec (a number where it parses, e.g. ``noise:sigma=1e-3`` -> ("noise", 0.001))."""
    specs = [part.strip() for part in setting.split(DEFENSE_JOIN)]
    family = "+".join(spec.partition(":")[0] for spec in specs)
    options = specs[0].partition(":")[2]
    value = options.split(",")[0].partition("=")[2] if options else ""
    try:
        return family, float(value)
    except ValueError:
        return family, value or "default"


def _panels(count: int) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * count, 3.4))
    return figure, list(figure.subplots(1, count, squeeze=False)[0])


def _png(figure: Any) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _point(summary: SettingSummary, variant: str, metric: str) -> tuple[float, float, float] | None:
    interval = summary.metrics.get(variant, {}).get(metric)
    return None if interval is None else (interval.mid, interval.low, interval.high)


def batch_size_plot(
    summaries: Sequence[SettingSummary], *, variant: str = "without_special", metric: str = "rouge1"
) -> bytes | None:
    """One panel per data set: ``metric`` (mid, with the bootstrap interval) against batch size for each undefended
    (attack, model, task); None without matplotlib or without undefended settings."""
    if not matplotlib_available():
        return None
    series: dict[str, dict[tuple[str, str, str], list[tuple[int, tuple[float, float, float]]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for summary in summaries:
        s = summary.setting
        point = _point(summary, variant, metric)
        if s["defense"] == NO_DEFENSE and point is not None:
            series[s["dataset"]][(s["attack"], s["model"], s["task"])].append((s["batch_size"], point))
    if not series:
        return None
    figure, axes = _panels(len(series))
    for axis, (dataset, lines) in zip(axes, sorted(series.items()), strict=True):
        for (attack, model, task), points in sorted(lines.items()):
            points.sort()
            xs = [x for x, _ in points]
            mids = [p[0] for _, p in points]
            errors = [[p[0] - p[1] for _, p in points], [p[2] - p[0] for _, p in points]]
            axis.errorbar(xs, mids, yerr=errors, marker="o", capsize=3, label=f"{attack} ({model}, {task})")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({x for points in lines.values() for x, _ in points}))
        axis.get_xaxis().set_major_formatter("{x:g}")
        axis.set_title(dataset)
        axis.set_xlabel("batch size")
        axis.set_ylim(-0.05, 1.05)
        axis.legend(fontsize=7)
    axes[0].set_ylabel(f"{metric} ({variant.replace('_', ' ')})")
    return _png(figure)


def defense_plot(
    summaries: Sequence[SettingSummary], *, variant: str = "without_special", metric: str = "rouge1"
) -> bytes | None:
    """One panel per defense family: ``metric`` against strength for each (data set, B, attack, model, task), the
    undefended value dotted; None without matplotlib or without defended settings."""
    if not matplotlib_available():
        return None
    families: dict[str, dict[tuple[Any, ...], list[tuple[float | str, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    clean: dict[tuple[Any, ...], float] = {}
    for summary in summaries:
        s = summary.setting
        point = _point(summary, variant, metric)
        if point is None:
            continue
        line = (s["dataset"], s["batch_size"], s["attack"], s["model"], s["task"])
        if s["defense"] == NO_DEFENSE:
            clean[line] = point[0]
        else:
            family, strength = defense_strength(s["defense"])
            families[family][line].append((strength, point[0]))
    if not families:
        return None
    figure, axes = _panels(len(families))
    for axis, (family, lines) in zip(axes, sorted(families.items()), strict=True):
        strengths = sorted({x for points in lines.values() for x, _ in points}, key=lambda x: (isinstance(x, str), x))
        numeric = all(isinstance(x, float) for x in strengths)
        position = {x: (x if numeric else i) for i, x in enumerate(strengths)}
        for line, points in sorted(lines.items()):
            points.sort(key=lambda p: strengths.index(p[0]))
            drawn = axis.plot([position[x] for x, _ in points], [y for _, y in points], marker="o",
                              label="{} B={} {} ({}, {})".format(*line))
            if line in clean:
                axis.axhline(clean[line], linestyle=":", color=drawn[0].get_color())
        if numeric and min(strengths) > 0 and max(strengths) / min(strengths) >= 100:  # type: ignore[operator]
            axis.set_xscale("log")
        if not numeric:
            axis.set_xticks(range(len(strengths)), [str(x) for x in strengths])
        axis.set_title(family)
        axis.set_xlabel("strength (first option)")
        axis.set_ylim(-0.05, 1.05)
        axis.legend(fontsize=6)
    axes[0].set_ylabel(f"{metric} (dotted: no defense)")
    return _png(figure)

