"""Benchmark the span attack: data set x model x task x batch size -> ROUGE, exact match, token accuracy, s/batch.

Threat model per batch: the client (victim) trains on B consecutive sentences of a dev set and sends its gradient
(lengths not revealed); the attacker runs ``span`` on it; the evaluator matches the answer to the private batch
(Hungarian on ROUGE-1) and scores it against the *original* sentences (for mlm: before masking).

    python scripts/bench_span.py --batch-sizes 1 2 4 8 --batches 5 --tasks classification mlm
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from textleak.attacks.span import SpanAttack
from textleak.client import simulate_client
from textleak.evaluation.sources import BENCHMARKS, load_benchmark
from textleak.metrics import score_batch
from textleak.models import load_model
from textleak.tasks import head_for

REPO = Path(__file__).resolve().parents[1]
DATASETS = BENCHMARKS


def read_dataset(root: Path, name: str) -> list[tuple[str, int]]:
    """(sentence, label) pairs in file order, read by the evaluation harness's loader."""
    data = load_benchmark(name, root)
    return list(zip(data.sentences, data.labels or (), strict=True))


def run_setting(target, data, *, task: str, batch_size: int, batches: int, seed: int, attack: SpanAttack) -> dict:
    """Attack ``batches`` consecutive batches and average the scores (without special tokens, plus R-1 with)."""
    rows = []
    for i in range(batches):
        chunk = data[i * batch_size : (i + 1) * batch_size]
        if len(chunk) < batch_size:
            break
        sentences, labels = [s for s, _ in chunk], [y for _, y in chunk]
        update, truth = simulate_client(
            target, sentences, task=task, labels=labels if task == "classification" else None, seed=seed + i, reveal=()
        )
        start = time.perf_counter()
        result = attack.reconstruct(update, target)
        seconds = time.perf_counter() - start
        scores = score_batch(result.token_ids, truth.original_ids, target.tokenizer)
        rows.append(
            {
                **{k: scores.without_special[k] for k in ("rouge1", "rouge2", "exact_match", "token_accuracy")},
                "rouge1_with_special": scores.with_special["rouge1"],
                "seconds": seconds,
                "tokens": sum(len(ids) for ids in truth.input_ids),
                # mlm: sentences with nothing masked carry no loss, hence no gradient: no attack can see them
                "unlabelled_sentences": _unlabelled(truth.labels) if task == "mlm" else 0,
                "exact_match_live": _exact_live(result.token_ids, truth, task),
                "rouge1_live": _rouge1_live(result.token_ids, truth, task, target.tokenizer, scores),
                "warnings": result.warnings,
            }
        )
    keys = ("rouge1", "rouge2", "exact_match", "token_accuracy", "rouge1_with_special", "seconds", "tokens",
            "unlabelled_sentences", "exact_match_live", "rouge1_live")
    summary = {k: statistics.fmean(r[k] for r in rows) for k in keys} if rows else {}
    summary["max_seconds"] = max((r["seconds"] for r in rows), default=0.0)
    summary["batches"] = len(rows)
    summary["batches_with_warnings"] = sum(bool(r["warnings"]) for r in rows)
    summary["per_batch"] = rows
    return summary


def _unlabelled(labels: tuple) -> int:
    return sum(all(label == -100 for label in row) for row in labels)


def _live(truth, task: str) -> list:
    """The private sentences that reached the gradient: for mlm those with a masked token, for other tasks all."""
    return [ids for ids, labels in zip(truth.original_ids, truth.labels, strict=True)
            if task != "mlm" or not all(label == -100 for label in labels)]


def _rouge1_live(answer: list[list[int]], truth, task: str, tokenizer, scores) -> float:
    """ROUGE-1 (without special tokens) over the sentences that reached the gradient, each matched to its best
    answer sentence; the batch's ``scores`` when every sentence did."""
    live = _live(truth, task)
    if len(live) == len(truth.original_ids):
        return scores.without_special["rouge1"]
    return score_batch(answer, live, tokenizer).without_special["rouge1"] if live else 1.0


def _exact_live(answer: list[list[int]], truth, task: str) -> float:
    """Exact matches among the sentences that reached the gradient (for mlm those with a masked token; for the
    other tasks all of them), each answer sentence matching at most one private sentence."""
    live = _live(truth, task)
    pool = Counter(tuple(ids) for ids in answer)
    hits = 0
    for ids in live:
        if pool[tuple(ids)] > 0:
            pool[tuple(ids)] -= 1
            hits += 1
    return hits / len(live) if live else 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO / ".." / "shared" / "data" / "text")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=["default", "random:bert-base"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--batches", type=int, default=5, help="consecutive batches per setting, from the start")
    parser.add_argument("--tasks", nargs="+", default=["classification", "mlm"])
    parser.add_argument("--seed", type=int, default=0, help="model seed and first client seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "span_benchmark.json")
    parser.add_argument("--option", action="append", default=[], help="span option key=value (JSON value), e.g. "
                        "time_limit=120")
    args = parser.parse_args(argv)
    options = {key: json.loads(value) for key, _, value in (text.partition("=") for text in args.option)}
    torch.set_num_threads(args.threads)

    data = {name: read_dataset(args.data_root, name) for name in args.datasets}
    settings = [(m, t, d, b) for m in args.models for t in args.tasks for d in args.datasets for b in args.batch_sizes]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "config": config,
        "attack_config": SpanAttack(**options).config.__dict__,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "results": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    loaded: dict[tuple[str, str], object] = {}
    attack = SpanAttack(**options)
    for model_spec, task, dataset, batch_size in tqdm(settings, desc="span benchmark", unit="setting"):
        key = (model_spec, head_for(task))
        if key not in loaded:
            loaded[key] = load_model(model_spec, head=key[1], seed=args.seed)
        summary = run_setting(
            loaded[key], data[dataset], task=task, batch_size=batch_size, batches=args.batches, seed=args.seed,
            attack=attack,
        )
        report["results"].append({"model": model_spec, "task": task, "dataset": dataset, "batch_size": batch_size,
                                  **summary})
        args.out.write_text(json.dumps(report, indent=1))
    for row in report["results"]:
        print(
            f"{row['model']:>18} {row['task']:>14} {row['dataset']:>5} B={row['batch_size']:<2} "
            f"R1 {100 * row.get('rouge1', 0):5.1f} R2 {100 * row.get('rouge2', 0):5.1f} "
            f"EM {100 * row.get('exact_match', 0):5.1f} (live {100 * row.get('exact_match_live', 0):5.1f}) "
            f"TA {100 * row.get('token_accuracy', 0):5.1f} "
            f"{row.get('seconds', 0):6.2f} s/batch, unlabelled {row.get('unlabelled_sentences', 0):.1f}/batch"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
