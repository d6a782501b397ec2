"""Gather `bench_span.py` result files into one table of the span attack's figures, checked against its targets.

Each (model, task, data set, batch size) cell takes its figures from the last file given that holds it, so a rerun
listed later replaces an earlier one. The targets are the span issue's: ROUGE-1 >= 99 and exact match >= 95% at every
B <= 8, B=1 under 5 s and B=8 under 60 s a batch (mean). For `mlm` ROUGE-1 and exact match are judged over the
sentences that reached the gradient (a sentence with nothing masked carries no loss, so no attack can see it); the
figures over every sentence are in the table beside them (files written before ``rouge1_live`` was recorded cannot
be judged on ROUGE-1 for mlm, and say so, unless every live sentence was exact). Writes ``OUT.md`` (a readable
table) and ``OUT.csv``.

    python scripts/span_table.py results/span_b8/*_3e28135.json results/span_matrix/*.json --out results/span_matrix
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import NamedTuple

#: The span issue's targets.
MIN_ROUGE1 = 0.99
MIN_EXACT = 0.95
MAX_B = 8
MAX_SECONDS = {1: 5.0, 8: 60.0}
#: Batches per setting the issue asks for; a verdict on fewer says how many.
ISSUE_BATCHES = 20
#: The issue's benchmark matrix, listed with ``--matrix`` (cells not measured are shown as such).
MATRIX = {
    "model": ("default", "random:bert-base"),
    "task": ("classification", "mlm"),
    "dataset": ("cola", "sst2", "rt"),
    "batch_size": (1, 2, 4, 8, 16),
}
COLUMNS = ("model", "task", "dataset", "batch_size", "batches", "rouge1", "rouge1_live", "rouge2", "exact_match",
           "exact_match_live", "token_accuracy", "seconds", "max_seconds", "verdict", "file")


class Cell(NamedTuple):
    """One setting's figures and the file they came from."""

    row: dict
    source: str


def read_cells(paths: list[Path]) -> dict[tuple[str, str, str, int], Cell]:
    """Every setting in ``paths``, the last file's figures where several hold it."""
    cells: dict[tuple[str, str, str, int], Cell] = {}
    for path in paths:
        report = json.loads(path.read_text())
        if "results" not in report:
            raise ValueError(f"{path} is not a bench_span.py result file (no 'results' list)")
        for row in report["results"]:
            if not row.get("batches"):
                continue
            cells[row["model"], row["task"], row["dataset"], row["batch_size"]] = Cell(row, path.name)
    return cells


def verdict(row: dict) -> str:
    """'meets', the targets it misses, or 'no target' beyond B=8."""
    batch_size = row["batch_size"]
    if batch_size > MAX_B:
        return "no target"
    mlm = row["task"] == "mlm"
    exact = row["exact_match_live"] if mlm else row["exact_match"]
    rouge1 = row.get("rouge1_live") if mlm else row["rouge1"]
    if rouge1 is None and row["exact_match_live"] == 1.0:  # every live sentence exact: ROUGE-1 100 over them
        rouge1 = 1.0
    missed = []
    if rouge1 is None:
        missed.append("R1 over the live sentences not recorded")
    elif rouge1 < MIN_ROUGE1:
        missed.append(f"R1 < {100 * MIN_ROUGE1:.0f}")
    if exact < MIN_EXACT:
        missed.append(f"exact < {100 * MIN_EXACT:.0f}%")
    if batch_size in MAX_SECONDS and row["seconds"] >= MAX_SECONDS[batch_size]:
        missed.append(f"{row['seconds']:.0f} s >= {MAX_SECONDS[batch_size]:.0f} s")
    verdict = "meets" if not missed else "misses: " + ", ".join(missed)
    return verdict if row["batches"] >= ISSUE_BATCHES else f"{verdict} ({row['batches']} of {ISSUE_BATCHES} batches)"


def table_rows(cells: dict[tuple[str, str, str, int], Cell], matrix: bool = False) -> list[dict]:
    """The cells as flat rows (percentages and seconds rounded), sorted by model, task, data set and batch size;
    with ``matrix``, also a 'not measured' row for each cell of ``MATRIX`` no file holds."""
    rows = []
    keys = set(cells)
    if matrix:
        keys |= {(m, t, d, b) for m in MATRIX["model"] for t in MATRIX["task"] for d in MATRIX["dataset"]
                 for b in MATRIX["batch_size"]}
    for key in sorted(keys):
        if key not in cells:
            rows.append({**dict.fromkeys(COLUMNS, ""), **dict(zip(COLUMNS, key, strict=False)),
                         "verdict": "not measured"})
            continue
        row, source = cells[key].row, cells[key].source
        rows.append({
            "model": row["model"], "task": row["task"], "dataset": row["dataset"], "batch_size": row["batch_size"],
            "batches": row["batches"],
            **{k: round(100 * row[k], 1) for k in ("rouge1", "rouge2", "exact_match", "exact_match_live",
                                                   "token_accuracy")},
            "rouge1_live": "" if row.get("rouge1_live") is None else round(100 * row["rouge1_live"], 1),
            "seconds": round(row["seconds"], 1), "max_seconds": round(row["max_seconds"], 1),
            "verdict": verdict(row), "file": source,
        })
    return rows


def markdown(rows: list[dict]) -> str:
    """A markdown table of ``rows``."""
    header = ("model", "task", "data", "B", "batches", "R-1", "R-1 (live)", "R-2", "exact %", "exact % (live)",
              "token acc", "s / batch", "max s", "targets", "file")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="bench_span.py JSON files, later ones taking precedence")
    parser.add_argument("--out", type=Path, required=True, help="output prefix: writes OUT.md and OUT.csv")
    parser.add_argument("--matrix", action="store_true", help="also list the issue's settings no file holds")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.files if not p.is_file()]
    if missing:
        parser.error(f"no such result file: {', '.join(missing)}")
    rows = table_rows(read_cells(args.files), matrix=args.matrix)
    if not rows:
        parser.error("the files hold no measured setting")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(markdown(rows))
    with Path(f"{args.out}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
