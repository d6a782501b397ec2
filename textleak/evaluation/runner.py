"""The evaluation harness end to end: load data, plan the matrix, skip what is recorded, run, aggregate, report.

Outputs share one prefix: ``PREFIX.jsonl`` (the resumable store), ``PREFIX.md``, ``PREFIX.csv``, ``PREFIX.json`` and
``PREFIX.html``. The reports cover exactly the jobs of this configuration, read back from the store, so a resumed
run reports the same table as one that never stopped.
"""

from __future__ import annotations

import datetime
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textleak.evaluation.aggregate import SettingSummary, aggregate
from textleak.evaluation.anchors import SOURCE
from textleak.evaluation.executors import Executor, InProcessExecutor
from textleak.evaluation.html_report import render_html
from textleak.evaluation.matrix import EvaluationConfig, Job, build_jobs
from textleak.evaluation.sources import TextDataset, load_source
from textleak.evaluation.store import RUN, ResultStore
from textleak.evaluation.tables import anchor_rows, check_variant, csv_text, markdown_report

REPORT_SUFFIXES = (".md", ".csv", ".json", ".html")


@dataclass(frozen=True)
class ReportOptions:
    """How scores are summarised: which variant leads the tables, and the bootstrap's settings."""

    variant: str = "without_special"
    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0
    examples: int = 12

    def __post_init__(self) -> None:
        check_variant(self.variant)

    def to_dict(self) -> dict[str, Any]:
        return {"variant": self.variant, "bootstrap_resamples": self.resamples, "confidence": self.confidence,
                "bootstrap_seed": self.seed, "examples": self.examples}


@dataclass
class EvaluationResult:
    """What a run did (jobs planned, run now, skipped as recorded) and what it reports."""

    jobs: int
    ran: int
    skipped: int
    damaged_lines: int
    summaries: list[SettingSummary]
    records: list[dict[str, Any]]
    paths: dict[str, Path] = field(default_factory=dict)


def store_path(prefix: str | Path) -> Path:
    """The JSONL store of an output prefix."""
    return Path(f"{prefix}.jsonl")


def load_datasets(config: EvaluationConfig) -> list[TextDataset]:
    """Every data source of the configuration, loaded (errors name the source)."""
    return [
        load_source(spec, data_root=config.data_root, split=config.split, column=config.column,
                    label_column=config.label_column)
        for spec in config.data
    ]


def pending_jobs(jobs: Sequence[Job], store: ResultStore, *, retry: bool = False) -> list[Job]:
    """Jobs without a record (with ``retry``: also those whose record is a timeout or an error)."""
    done = store.batches()
    return [job for job in jobs if job.key not in done or (retry and done[job.key]["status"] != "ok")]


def run_evaluation(
    config: EvaluationConfig,
    prefix: str | Path,
    *,
    executor: Executor | None = None,
    report: ReportOptions | None = None,
    retry: bool = False,
    meta: dict[str, Any] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> EvaluationResult:
    """Run every job of ``config`` not yet in ``PREFIX.jsonl``, then write the reports from the store.

    ``on_plan(total, already_done)`` is called once before running, ``on_record(record)`` after each record is
    stored (the command line drives its progress bar with them). ``meta`` (command line, executor) is recorded.
    """
    report = report or ReportOptions(seed=config.seed)
    executor = executor or InProcessExecutor()
    jobs = build_jobs(config, load_datasets(config))
    store = ResultStore(store_path(prefix))
    store.repair()
    pending = pending_jobs(jobs, store, retry=retry)
    if on_plan is not None:
        on_plan(len(jobs), len(jobs) - len(pending))
    info = {**(meta or {}), "executor": repr(executor), "python": platform.python_version()}
    if pending:
        store.append({"type": RUN, "started_at": _now(), "config": config.to_dict(), "report": report.to_dict(),
                      "meta": info, "jobs": len(jobs), "pending": len(pending)})

    def record_done(record: dict[str, Any]) -> None:
        store.append(record)
        if on_record is not None:
            on_record(record)

    executor.run(pending, record_done)
    latest, damaged = store.batches(), store.read()[1]
    records = [latest[job.key] for job in jobs if job.key in latest]
    summaries = aggregate(records, resamples=report.resamples, confidence=report.confidence, seed=report.seed)
    paths = write_reports(prefix, summaries, records, config=config, report=report, meta=info)
    return EvaluationResult(len(jobs), len(pending), len(jobs) - len(pending), damaged, summaries, records, paths)


def write_reports(
    prefix: str | Path,
    summaries: Sequence[SettingSummary],
    records: Sequence[dict[str, Any]],
    *,
    config: EvaluationConfig,
    report: ReportOptions,
    meta: dict[str, Any],
) -> dict[str, Path]:
    """``PREFIX.md`` / ``.csv`` / ``.json`` / ``.html`` from the summaries; returns the paths by suffix."""
    paths = {suffix: Path(f"{prefix}{suffix}") for suffix in REPORT_SUFFIXES}
    paths[".md"].parent.mkdir(parents=True, exist_ok=True)
    setup = {"config": config.to_dict(), "report": report.to_dict(), "meta": meta}
    intro = (f"# textleak evaluation\n\nStore: `{store_path(prefix).name}` ({len(records)} batch records); the full "
             f"configuration and every interval are in `{paths['.json'].name}`, plots and examples in "
             f"`{paths['.html'].name}`.\n\n")
    paths[".md"].write_text(intro + markdown_report(summaries, variant=report.variant), encoding="utf-8")
    paths[".csv"].write_text(csv_text(summaries), encoding="utf-8")
    payload = {**setup, "anchors_source": SOURCE, "settings": [s.to_dict() for s in summaries],
               "anchors": anchor_rows(summaries)}
    paths[".json"].write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    paths[".html"].write_text(
        render_html(summaries, records, config=setup, variant=report.variant, examples=report.examples),
        encoding="utf-8",
    )
    return paths


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
