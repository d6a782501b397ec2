"""``textleak evaluate``: argument parsing, the progress bar and printing; the work is done by the runner."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from textleak.evaluation.executors import EXECUTORS, make_executor
from textleak.evaluation.matrix import DEFENSE_JOIN, NO_DEFENSE, EvaluationConfig
from textleak.evaluation.runner import ReportOptions, run_evaluation
from textleak.evaluation.sources import BENCHMARKS, SAMPLING
from textleak.evaluation.tables import markdown_report

DEFAULT_OUT = Path("results/evaluation")
DEFAULT_BATCHES = 4


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evaluate`` on the ``textleak`` command's subparsers (also used by ``scripts/evaluate.py``)."""
    parser = subparsers.add_parser(
        "evaluate",
        help="run an attack x model x task x defense x batch size matrix on data sets; resumable; reports",
        description="Evaluate attacks over a matrix of settings: results go to OUT.jsonl as each batch finishes "
        "(a rerun skips recorded batches), then OUT.md/.csv/.json/.html are written from all of them.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", action="extend", metavar="SOURCE",
                      help=f"benchmark name ({', '.join(BENCHMARKS)}; needs --data-root), a .tsv/.csv/.jsonl/.txt "
                      "file, or a folder saved by datasets (or hf:FOLDER); default: cola")
    data.add_argument("--data-root", type=Path, help="folder holding cola/, sst2/, rotten_tomatoes/")
    data.add_argument("--split", help="benchmark split (default dev) or split of a saved DatasetDict")
    data.add_argument("--column", help="sentence column of tsv/csv/jsonl/datasets (default: sentence, else text)")
    data.add_argument("--label-column", help="label column (default: label when present)")
    count = data.add_mutually_exclusive_group()
    count.add_argument("--sentences", type=int, help="sentences per batch size")
    count.add_argument("--batches", type=int, help=f"batches per batch size (default {DEFAULT_BATCHES})")
    data.add_argument("--sample", choices=SAMPLING, default="first", help="the first N sentences or N at random")
    matrix = parser.add_argument_group("the matrix")
    matrix.add_argument("--models", nargs="+", action="extend", help="model specs (default: default)")
    matrix.add_argument("--tasks", nargs="+", action="extend", help="client tasks (default: classification)")
    matrix.add_argument("--attacks", nargs="+", action="extend", metavar="ATTACK",
                        help="name[:key=value,...], e.g. span tag:iterations=100 (default: span)")
    matrix.add_argument("--defenses", nargs="+", action="extend", metavar="SETTING",
                        help=f"{NO_DEFENSE} or defense specs joined by {DEFENSE_JOIN!r}, e.g. none noise:sigma=1e-3 "
                        f"'prune:ratio=0.9{DEFENSE_JOIN}quantize:dtype=fp16' (default: {NO_DEFENSE})")
    matrix.add_argument("--batch-sizes", nargs="+", action="extend", type=int, help="default: 1")
    matrix.add_argument("--reveal", default="lengths", help="what the attacker knows: lengths,labels or none")
    matrix.add_argument("--seed", type=int, default=0, help="sampling, client masking and attack seed (+ batch index)")
    matrix.add_argument("--model-seed", type=int, default=0, help="seed of freshly initialised weights")
    run = parser.add_argument_group("how it runs")
    run.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output prefix (default {DEFAULT_OUT})")
    run.add_argument("--executor", choices=EXECUTORS, default="local")
    run.add_argument("--workers", type=int, default=0,
                     help="local worker processes (0: this process, unless --time-limit needs one)")
    run.add_argument("--time-limit", type=float, help="seconds per batch; a batch past it is recorded as a timeout")
    run.add_argument("--ray-address", help="Ray cluster address (default: start a local Ray instance)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    run.add_argument("--retry", action="store_true", help="run again the batches recorded as timeout or error")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    report = parser.add_argument_group("the report")
    report.add_argument("--special-tokens", choices=("without", "with"), default="without",
                        help="which score variant leads the tables (both are recorded)")
    report.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    report.add_argument("--confidence", type=float, default=0.95, help="bootstrap interval (default 0.95)")
    report.add_argument("--examples", type=int, default=12, help="example sentence pairs in the HTML report")
    return parser


def config_from_args(args: argparse.Namespace) -> EvaluationConfig:
    """The evaluation configuration the arguments describe (defaults filled in)."""
    reveal = tuple(part for part in args.reveal.split(",") if part and part != "none")
    return EvaluationConfig(
        data=tuple(args.data or ("cola",)),
        models=tuple(args.models or ("default",)),
        tasks=tuple(args.tasks or ("classification",)),
        attacks=tuple(args.attacks or ("span",)),
        defenses=tuple(args.defenses or (NO_DEFENSE,)),
        batch_sizes=tuple(args.batch_sizes or (1,)),
        sentences=args.sentences,
        batches=None if args.sentences is not None else (DEFAULT_BATCHES if args.batches is None else args.batches),
        sample=args.sample,
        seed=args.seed,
        model_seed=args.model_seed,
        reveal=reveal,
        data_root=None if args.data_root is None else str(args.data_root),
        split=args.split,
        column=args.column,
        label_column=args.label_column,
    )


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the evaluation the arguments describe, with a progress bar; print the table and where files went."""
    import torch

    torch.set_num_threads(args.threads)
    config = config_from_args(args)
    report = ReportOptions(variant=f"{args.special_tokens}_special", resamples=args.bootstrap,
                           confidence=args.confidence, seed=config.seed, examples=args.examples)
    executor = make_executor(args.executor, workers=args.workers, time_limit=args.time_limit, threads=args.threads,
                             ray_address=args.ray_address)
    bar: dict[str, tqdm] = {}

    def on_plan(total: int, done: int) -> None:
        bar["bar"] = tqdm(total=total, initial=done, desc="batches", unit="batch", disable=args.no_progress)

    def on_record(record: dict[str, Any]) -> None:
        bar["bar"].set_postfix_str(f"{record['dataset']} B={record['batch_size']} {record['attack']}: "
                                   f"{record['status']}", refresh=False)
        bar["bar"].update(1)

    arguments = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    try:
        result = run_evaluation(config, args.out, executor=executor, report=report, retry=args.retry,
                                meta={"arguments": arguments}, on_plan=on_plan, on_record=on_record)
    finally:
        if "bar" in bar:
            bar["bar"].close()
    print(f"{result.jobs} batches planned: {result.ran} run now, {result.skipped} already recorded")
    if result.damaged_lines:
        print(f"note: skipped {result.damaged_lines} damaged line(s) in {args.out}.jsonl (their batches ran again)")
    failures = [r for r in result.records if r["status"] != "ok"]
    for record in failures[:5]:
        print(f"{record['status']}: {json.loads(record['key'])}: {record.get('error', '')}")
    if len(failures) > 5:
        print(f"... and {len(failures) - 5} more timeouts/errors (see the HTML report)")
    print("\n" + markdown_report(result.summaries, variant=report.variant))
    print("wrote " + ", ".join(str(path) for path in result.paths.values()))
    return 0
