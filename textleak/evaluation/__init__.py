"""Evaluation harness: a matrix of data sets x models x tasks x attacks x defenses x batch sizes, run batch by batch
into a resumable JSONL store (in this process, worker processes with a time limit, or Ray), then aggregated with
bootstrap intervals into Markdown / CSV / JSON / HTML reports beside the published numbers.

``textleak evaluate`` and ``scripts/evaluate.py`` drive it from the command line; ``run_evaluation`` from Python.
"""

from textleak.evaluation.aggregate import Interval, SettingSummary, aggregate, bootstrap
from textleak.evaluation.executors import InProcessExecutor, ProcessExecutor, RayExecutor, make_executor
from textleak.evaluation.matrix import EvaluationConfig, Job, build_jobs
from textleak.evaluation.runner import EvaluationResult, ReportOptions, run_evaluation
from textleak.evaluation.sources import TextDataset, load_source
from textleak.evaluation.store import ResultStore

__all__ = [
    "EvaluationConfig",
    "EvaluationResult",
    "InProcessExecutor",
    "Interval",
    "Job",
    "ProcessExecutor",
    "RayExecutor",
    "ReportOptions",
    "ResultStore",
    "SettingSummary",
    "TextDataset",
    "aggregate",
    "bootstrap",
    "build_jobs",
    "load_source",
    "make_executor",
    "run_evaluation",
]
