"""Benchmark lamp against the tag baseline: clean updates, Gaussian noise, and updates without the first layers.

Threat model per batch: the client (victim) fine-tunes a sequence classifier on B consecutive dev sentences and
sends its gradient, through the condition's defense; the attacker knows the lengths (as LAMP assumes) and infers
the labels; the evaluator matches the answer to the private batch (Hungarian on ROUGE-1) and scores it without
special tokens. Every finished batch is written to the JSON file at once, so ``--resume`` continues a run.

    python scripts/bench_lamp.py --models default --datasets cola --batch-sizes 1 --sentences 5 \\
        --conditions clean noise freeze --attacks lamp tag --resume
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from textleak.attacks import get_attack
from textleak.evaluation.sources import BENCHMARKS, load_benchmark
from textleak.experiment import attack_sentences
from textleak.models import load_model
from textleak.priors import train_ngram

REPO = Path(__file__).resolve().parents[1]
DATASETS = BENCHMARKS
METRICS = ("rouge1", "rouge2", "token_accuracy", "bag_f1", "exact_match")


def read_dataset(root: Path, name: str, limit: int) -> tuple[list[str], list[int]]:
    """The first ``limit`` sentences and labels of a dev set, read by the evaluation harness's loader."""
    data = load_benchmark(name, root)
    return list(data.sentences[:limit]), list((data.labels or ())[:limit])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "text")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=["default", "random:bert-base"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sentences", type=int, default=8, help="sentences per data set (batches = this / B)")
    parser.add_argument("--conditions", nargs="+", default=["clean", "noise", "freeze"])
    parser.add_argument("--noise-sigma", type=float, default=1e-4, help="Gaussian noise std for condition noise")
    parser.add_argument("--freeze", default="freeze:patterns=,first_layers=2", help="defense spec of condition freeze")
    parser.add_argument("--attacks", nargs="+", default=["lamp", "tag"])
    parser.add_argument("--tag-iterations", type=int, default=200)
    parser.add_argument(
        "--lamp-option", action="append", default=[], metavar="KEY=VALUE", help="lamp option (repeatable)"
    )
    parser.add_argument(
        "--prior-text", type=Path, default=None, help="n-gram text (default: wikitext2/valid.txt in --data-root)"
    )
    parser.add_argument(
        "--prior-file", type=Path, default=Path(tempfile.gettempdir()) / "textleak_prior_wikitext2_valid.safetensors"
    )
    parser.add_argument("--lamp-name", default="lamp", help="row label of this lamp configuration")
    parser.add_argument("--merge-from", type=Path, nargs="*", default=[], help="add the runs and rows of these files")
    parser.add_argument("--note", action="append", default=[], help="a line of notes kept in the JSON (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="keep the batches already in --out and run the rest")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "lamp_benchmark.json")
    args = parser.parse_args()
    if args.prior_text is None:
        args.prior_text = args.data_root / "wikitext2" / "valid.txt"
    return args


def lamp_options(items: list[str], prior_file: Path, seed: int) -> dict:
    """lamp's options from KEY=VALUE strings (JSON values where they parse), with the trained prior by default."""
    options: dict = {"prior": f"ngram:{prior_file}", "seed": seed}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def defenses_for(condition: str, args: argparse.Namespace) -> list[str]:
    return {"clean": [], "noise": [f"noise:sigma={args.noise_sigma}"], "freeze": [args.freeze]}[condition]


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean scores (percent) and seconds per sentence per (model, data set, B, condition, attack)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["model"], row["dataset"], row["batch_size"], row["condition"], row["attack"])
        groups.setdefault(key, []).append(row)
    table = []
    for (model, dataset, batch_size, condition, attack), items in sorted(groups.items()):
        entry = {
            "model": model,
            "dataset": dataset,
            "batch_size": batch_size,
            "condition": condition,
            "attack": attack,
            "batches": len(items),
            "without_special": {m: 100 * statistics.mean(r["without_special"][m] for r in items) for m in METRICS},
            "seconds_per_sentence": sum(r["seconds"] for r in items) / sum(r["batch_size"] for r in items),
        }
        table.append(entry)
    return table


def save(path: Path, runs: list[dict], rows: list[dict], notes: list[str]) -> None:
    """Write the notes, every run's configuration, the summary and the rows (after each batch, to resume)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"notes": notes, "runs": runs, "summary": aggregate(rows), "rows": rows}
    path.write_text(json.dumps(payload, indent=1))


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    options = lamp_options(args.lamp_option, args.prior_file, args.seed)
    config = json.loads(json.dumps(vars(args), default=str))  # paths as strings
    config["lamp_options"] = options
    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    previous = json.loads(args.out.read_text()) if args.resume and args.out.exists() else {}
    rows: list[dict] = previous.get("rows", [])
    notes: list[str] = [*previous.get("notes", []), *args.note]
    runs: list[dict] = [*previous.get("runs", []), {"config": config, "environment": environment}]
    for other in args.merge_from:
        merged = json.loads(other.read_text())
        runs += merged.get("runs", [])
        notes += merged.get("notes", [])
        rows += merged.get("rows", [])
    done = {(r["model"], r["dataset"], r["batch_size"], r["condition"], r["attack"], r["batch"]) for r in rows}
    for model_spec in args.models:
        target = load_model(model_spec, head="classification", seed=args.seed)
        if "lamp" in args.attacks and "prior" in options and not args.prior_file.exists():
            started = time.perf_counter()
            args.prior_file.parent.mkdir(parents=True, exist_ok=True)
            train_ngram(args.prior_text, target.tokenizer).save(args.prior_file)
            print(f"trained the n-gram prior on {args.prior_text} in {time.perf_counter() - started:.1f} s")
        attacks = {
            args.lamp_name: get_attack("lamp", **options),
            "tag": get_attack("tag", iterations=args.tag_iterations, seed=args.seed),
        }
        for dataset in args.datasets:
            sentences, labels = read_dataset(args.data_root, dataset, args.sentences)
            for batch_size in args.batch_sizes:
                for condition in args.conditions:
                    for attack_name in [args.lamp_name if a == "lamp" else a for a in args.attacks]:
                        for index in range(len(sentences) // batch_size):
                            key = (model_spec, dataset, batch_size, condition, attack_name, index)
                            if key in done:
                                continue
                            part = slice(index * batch_size, (index + 1) * batch_size)
                            started = time.perf_counter()
                            result = attack_sentences(
                                target,
                                sentences[part],
                                attacks[attack_name],
                                task="classification",
                                seed=args.seed + index,
                                labels=labels[part],
                                reveal=("lengths",),
                                defenses=defenses_for(condition, args),
                            )
                            rec, scores = result.reconstruction, result.scores
                            assert scores is not None
                            rows.append(
                                {
                                    "model": model_spec,
                                    "dataset": dataset,
                                    "batch_size": batch_size,
                                    "condition": condition,
                                    "defenses": defenses_for(condition, args),
                                    "attack": attack_name,
                                    "batch": index,
                                    "references": sentences[part],
                                    "recovered": rec.texts,
                                    "without_special": scores.without_special,
                                    "with_special": scores.with_special,
                                    "seconds": time.perf_counter() - started,
                                    "timings": rec.timings,
                                    "candidate_sets": rec.details.get("candidate_sets"),
                                    "parametrisation": rec.details.get("parametrisation"),
                                    "warnings": rec.warnings,
                                    "attack_config": rec.config,
                                }
                            )
                            w = scores.without_special
                            print(
                                f"{model_spec} {dataset} B={batch_size} {condition:>6} {attack_name:>4} #{index}: "
                                f"R1 {100 * w['rouge1']:5.1f} R2 {100 * w['rouge2']:5.1f} "
                                f"{rows[-1]['seconds']:6.1f} s | {rec.texts}",
                                flush=True,
                            )
                            environment["load_average_now"] = os.getloadavg()
                            save(args.out, runs, rows, notes)
    save(args.out, runs, rows, notes)
    for entry in aggregate(rows):
        w = entry["without_special"]
        print(
            f"{entry['model']:>16} {entry['dataset']:>4} B={entry['batch_size']} {entry['condition']:>6} "
            f"{entry['attack']:>4}: R1 {w['rouge1']:5.1f} R2 {w['rouge2']:5.1f} "
            f"{entry['seconds_per_sentence']:7.1f} s/sentence ({entry['batches']} batches)"
        )


if __name__ == "__main__":
    main()
