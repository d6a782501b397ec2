"""From batch records to one row per setting: bootstrap confidence intervals over batches.

LAMP and DAGER report the *mid* F-measure of ``rouge_score``'s bootstrap aggregator: the median of the means of
resampled sets, with the 2.5th/97.5th percentiles as the interval. ``bootstrap`` does the same, seeded, over
batches (each batch's score is already the mean over its Hungarian-matched sentences).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("rouge1", "rouge2", "rougeL", "token_accuracy", "exact_match")
VARIANTS = ("without_special", "with_special")
SETTING_FIELDS = ("dataset", "batch_size", "attack", "defense", "model", "task")


@dataclass(frozen=True)
class Interval:
    """A bootstrap estimate: the plain mean, the median of resampled means (mid) and the percentile interval."""

    low: float
    mid: float
    high: float
    mean: float

    def to_dict(self) -> dict[str, float]:
        return {"low": self.low, "mid": self.mid, "high": self.high, "mean": self.mean}


def bootstrap(
    values: Sequence[float], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Resample ``values`` with replacement ``resamples`` times (seeded); percentiles of the resampled means."""
    if len(values) == 0:
        raise ValueError("bootstrap needs at least one value")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    data = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[draws].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, mid, high = np.percentile(means, [tail, 50, 100 - tail])
    return Interval(float(low), float(mid), float(high), float(data.mean()))


@dataclass(frozen=True)
class SettingSummary:
    """One row of the report: a setting, how its batches ended, and the bootstrap intervals of its scores."""

    setting: dict[str, Any]
    batches: int
    timeouts: int
    errors: int
    warned: int
    metrics: dict[str, dict[str, Interval]]
    seconds: Interval | None

    def to_dict(self) -> dict[str, Any]:
        """Nested JSON-ready copy."""
        return {
            **self.setting,
            "batches": self.batches,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "batches_with_warnings": self.warned,
            "metrics": {v: {m: i.to_dict() for m, i in ms.items()} for v, ms in self.metrics.items()},
            "seconds_per_batch": None if self.seconds is None else self.seconds.to_dict(),
        }

    def flat(self) -> dict[str, Any]:
        """One flat row (CSV): ``<metric>[_special]_<low|mid|high|mean>`` and ``seconds_<...>`` columns."""
        row = {name: self.setting[name] for name in SETTING_FIELDS}
        row.update(batches=self.batches, timeouts=self.timeouts, errors=self.errors, batches_with_warnings=self.warned)
        for variant in VARIANTS:
            suffix = "_special" if variant == "with_special" else ""
            for metric in METRICS:
                interval = self.metrics.get(variant, {}).get(metric)
                for part in ("mid", "low", "high", "mean"):
                    row[f"{metric}{suffix}_{part}"] = None if interval is None else getattr(interval, part)
        for part in ("mid", "low", "high", "mean"):
            row[f"seconds_{part}"] = None if self.seconds is None else getattr(self.seconds, part)
        return row


def setting_of(record: dict[str, Any]) -> tuple[Any, ...]:
    """The setting a batch record belongs to (its key without the batch index and seed)."""
    return tuple(record[name] for name in SETTING_FIELDS)


def aggregate(
    records: Iterable[dict[str, Any]], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[SettingSummary]:
    """One summary per setting, in the order settings first appear in ``records`` (the runner passes them in plan
    order: data set, batch size, model, task, defense, attack)."""
    estimate = functools.partial(bootstrap, resamples=resamples, confidence=confidence, seed=seed)
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[setting_of(record)].append(record)
    summaries = []
    for setting in groups:
        members = groups[setting]
        done = sorted((r for r in members if r["status"] == "ok"), key=lambda r: r["batch_index"])
        metrics = {
            variant: {m: estimate([r["scores"][variant][m] for r in done]) for m in METRICS}
            for variant in VARIANTS
        } if done else {}
        summaries.append(
            SettingSummary(
                setting=dict(zip(SETTING_FIELDS, setting, strict=True)),
                batches=len(done),
                timeouts=sum(r["status"] == "timeout" for r in members),
                errors=sum(r["status"] == "error" for r in members),
                warned=sum(bool(r.get("warnings")) for r in done),
                metrics=metrics,
                seconds=estimate([r["seconds"] for r in done]) if done else None,
            )
        )
    return summaries
