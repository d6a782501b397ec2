"""Benchmark of the optimisation attacks (dlg, tag, cosine) on CoLA dev: recovery and speed.

Sequence classification as in the LAMP/DAGER tables (labels are not revealed: the attacks infer them), lengths
known as LAMP assumes. Results (per batch and aggregated, with the full configuration) go to a JSON file that is
rewritten after every batch, so an interrupted run keeps what it measured.

    python scripts/bench_optimization.py --sentences 10 --batch-sizes 1 2 --models default random:bert-base
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from textleak.attacks import get_attack
from textleak.data import batches, read_cola
from textleak.experiment import attack_sentences
from textleak.models import load_model

REPO = Path(__file__).resolve().parents[1]
METRICS = ("rouge1", "rouge2", "rougeL", "token_accuracy", "bag_f1", "exact_match")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data" / "text")
    parser.add_argument("--sentences", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["default", "random:bert-base"])
    parser.add_argument("--attacks", nargs="+", default=["dlg", "tag", "cosine"])
    parser.add_argument("--task", default="classification")
    parser.add_argument(
        "--iterations", nargs="+", default=["dlg=20", "tag=300", "cosine=300"], help="per attack: name=N"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="keep the batches already in --out and run the rest")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "optimization_benchmark.json")
    return parser.parse_args()


def aggregate(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["attack"], row["batch_size"]), []).append(row)
    table = []
    for (model, attack, batch_size), items in groups.items():
        entry = {"model": model, "attack": attack, "batch_size": batch_size, "batches": len(items)}
        for variant in ("without_special", "with_special"):
            entry[variant] = {m: 100 * statistics.mean(r[variant][m] for r in items) for m in METRICS}
        entry["seconds_per_batch"] = statistics.mean(r["seconds"] for r in items)
        entry["seconds_per_sentence"] = sum(r["seconds"] for r in items) / sum(r["batch_size"] for r in items)
        entry["seconds_per_iteration"] = statistics.mean(r["seconds_per_iteration"] for r in items)
        table.append(entry)
    return table


def main() -> None:
    args = parse_args()
    iterations = {k: int(v) for k, v in (item.split("=") for item in args.iterations)}
    sentences, labels = read_cola(args.data_root / "cola" / "dev.tsv", limit=args.sentences)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    rows: list[dict] = json.loads(args.out.read_text())["rows"] if args.resume and args.out.exists() else []
    done = {(r["model"], r["attack"], r["batch_size"], r["batch"]) for r in rows}
    jobs = [(m, a, b) for m in args.models for a in args.attacks for b in args.batch_sizes]
    bar = tqdm(total=sum(len(batches(sentences, b)) for _, _, b in jobs), desc="batches")
    for model_spec in args.models:
        target = load_model(model_spec, head="classification", seed=args.seed)
        for attack_name in args.attacks:
            attack = get_attack(attack_name, iterations=iterations[attack_name], seed=args.seed)
            for batch_size in args.batch_sizes:
                start_index = 0
                for index, group in enumerate(batches(sentences, batch_size)):
                    group_labels = labels[start_index : start_index + len(group)]
                    start_index += len(group)
                    if (model_spec, attack_name, batch_size, index) in done:
                        bar.update()
                        continue
                    started = time.perf_counter()
                    result = attack_sentences(
                        target, group, attack, task=args.task, seed=args.seed + index, labels=group_labels
                    )
                    rec, scores = result.reconstruction, result.scores
                    assert scores is not None
                    rows.append(
                        {
                            "model": model_spec,
                            "attack": attack_name,
                            "batch_size": batch_size,
                            "batch": index,
                            "references": group,
                            "recovered": rec.texts,
                            "without_special": scores.without_special,
                            "with_special": scores.with_special,
                            "seconds": time.perf_counter() - started,
                            "seconds_per_iteration": rec.timings["per_iteration_s"],
                            "labels": rec.details.get("labels"),
                            "warnings": rec.warnings,
                            "attack_config": rec.config,
                        }
                    )
                    bar.update()
                    environment["load_average_now"] = os.getloadavg()
                    payload = {"config": config, "environment": environment, "summary": aggregate(rows), "rows": rows}
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(payload, indent=1))
    bar.close()
    for entry in aggregate(rows):
        w = entry["without_special"]
        print(
            f"{entry['model']:>18} {entry['attack']:>7} B={entry['batch_size']}: R1 {w['rouge1']:5.1f} "
            f"R2 {w['rouge2']:5.1f} tokacc {w['token_accuracy']:5.1f} exact {w['exact_match']:5.1f} "
            f"{entry['seconds_per_sentence']:7.1f} s/sentence {entry['seconds_per_iteration']:.3f} s/it"
        )


if __name__ == "__main__":
    main()
