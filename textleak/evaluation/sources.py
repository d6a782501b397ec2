"""Where the private sentences come from: local files, the three benchmark folders, saved ``datasets`` data sets.

A source spec is one of:

- ``cola`` / ``sst2`` / ``rt`` (aliases ``sst-2``, ``rotten_tomatoes``): the benchmark folder under ``data_root``
  (CoLA's headerless tsv, SST-2's ``sentence<TAB>label`` tsv, Rotten Tomatoes' ``rt-polarity.pos/.neg``);
- a ``.tsv`` / ``.csv`` (with a header row) or ``.jsonl`` file: the sentence column chosen by name;
- a ``.txt`` file: one sentence a line, no labels;
- ``hf:<folder>`` or a folder written by ``datasets``' ``save_to_disk``: loaded with ``load_from_disk``.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textleak.data import read_cola

BENCHMARKS = ("cola", "sst2", "rt")
ALIASES = {"sst-2": "sst2", "rotten_tomatoes": "rt", "rotten-tomatoes": "rt"}
SENTENCE_COLUMNS = ("sentence", "text")
LABEL_COLUMN = "label"
HF_PREFIX = "hf:"
SAMPLING = ("first", "random")


@dataclass(frozen=True)
class TextDataset:
    """Sentences in source order with their labels (None when the source has none) and where they came from."""

    name: str
    sentences: tuple[str, ...]
    labels: tuple[int, ...] | None
    origin: str

    def __post_init__(self) -> None:
        if not self.sentences:
            raise ValueError(f"data set {self.name!r} ({self.origin}) holds no sentences")
        if self.labels is not None and len(self.labels) != len(self.sentences):
            raise ValueError(f"data set {self.name!r}: {len(self.labels)} labels for {len(self.sentences)} sentences")


def load_source(
    spec: str,
    *,
    data_root: str | Path | None = None,
    split: str | None = None,
    column: str | None = None,
    label_column: str | None = None,
) -> TextDataset:
    """The data set a spec names (see the module docstring); errors name the spec and what was expected."""
    name = ALIASES.get(spec.lower(), spec.lower())
    if name in BENCHMARKS and not Path(spec).exists():
        if data_root is None:
            raise ValueError(f"data set {spec!r} is a benchmark name: give its folder with --data-root")
        return load_benchmark(name, data_root, split=split or "dev")
    if spec.startswith(HF_PREFIX):
        return load_saved_dataset(spec[len(HF_PREFIX) :], split=split, column=column, label_column=label_column)
    path = Path(spec)
    if path.is_dir():
        return load_saved_dataset(path, split=split, column=column, label_column=label_column)
    if not path.is_file():
        raise FileNotFoundError(
            f"data source {spec!r} is neither a benchmark name ({', '.join(BENCHMARKS)}), a file nor a folder"
        )
    return load_file(path, column=column, label_column=label_column)


def load_file(path: str | Path, *, column: str | None = None, label_column: str | None = None) -> TextDataset:
    """A .tsv/.csv (header row), .jsonl (one object a line) or .txt (one sentence a line) file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if column is not None:
            raise ValueError(f"{path}: a .txt file has no columns (got --column {column!r})")
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return TextDataset(path.stem, tuple(line for line in lines if line), None, str(path))
    if suffix in (".tsv", ".csv"):
        with path.open(encoding="utf-8", newline="") as handle:
            if suffix == ".tsv":  # GLUE-style: tab-separated and unquoted (sentences hold stray '"')
                reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(handle)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    elif suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from error
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, found {type(row).__name__}")
                rows.append(row)
        columns = list(dict.fromkeys(key for row in rows for key in row))
    else:
        raise ValueError(f"{path}: unknown file type {suffix!r}; expected .tsv, .csv, .jsonl or .txt")
    return _from_rows(path.stem, str(path), rows, columns, column, label_column)


def load_benchmark(name: str, data_root: str | Path, *, split: str = "dev") -> TextDataset:
    """CoLA, SST-2 or Rotten Tomatoes from their usual folder layouts under ``data_root``."""
    root = Path(data_root)
    if name == "cola":
        # GLUE's CoLA dev.tsv is the in-domain dev set; some copies append the out-of-domain one: prefer the former.
        candidates = ("in_domain_dev.tsv", "dev.tsv") if split == "dev" else (f"{split}.tsv",)
        path = _first_file(root / "cola", candidates, "CoLA")
        sentences, labels = read_cola(path)
        return TextDataset("cola", tuple(sentences), tuple(labels), str(path))
    if name == "sst2":
        path = _first_file(root / "sst2", (f"{split}.tsv",), "SST-2")
        dataset = load_file(path, column="sentence", label_column=LABEL_COLUMN)
        return TextDataset("sst2", dataset.sentences, dataset.labels, str(path))
    if name == "rt":
        if split != "dev":
            raise ValueError(f"Rotten Tomatoes has no {split!r} split: rt-polarity.pos/.neg are all there is")
        folder = root / "rotten_tomatoes"
        pos = _read_legacy_lines(_first_file(folder, ("rt-polarity.pos",), "Rotten Tomatoes"))
        neg = _read_legacy_lines(_first_file(folder, ("rt-polarity.neg",), "Rotten Tomatoes"))
        # interleaved, so that the first N sentences hold both classes
        pairs = [pair for p, n in zip(pos, neg, strict=False) for pair in ((p, 1), (n, 0))]
        pairs += [(p, 1) for p in pos[len(neg) :]] + [(n, 0) for n in neg[len(pos) :]]
        return TextDataset("rt", tuple(s for s, _ in pairs), tuple(y for _, y in pairs), str(folder))
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")


def load_saved_dataset(
    folder: str | Path, *, split: str | None = None, column: str | None = None, label_column: str | None = None
) -> TextDataset:
    """A Hugging Face ``datasets`` data set saved with ``save_to_disk`` (a Dataset, or one split of a DatasetDict)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"saved data set folder {folder} does not exist")
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError as error:  # pragma: no cover - datasets comes with evaluate
        raise ValueError(f"{folder}: reading a saved data set needs the `datasets` package") from error
    try:
        data = load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise ValueError(f"{folder} is not a folder written by datasets' save_to_disk ({error})") from error
    if isinstance(data, DatasetDict):
        splits = list(data)
        chosen = split or ("validation" if "validation" in splits else splits[0] if len(splits) == 1 else None)
        if chosen not in splits:
            raise ValueError(f"{folder}: choose a split with --split; this data set has {', '.join(splits)}")
        data = data[chosen]
    elif split is not None:
        raise ValueError(f"{folder} holds a single data set, not splits (got --split {split!r})")
    return _from_rows(folder.name, str(folder), list(data), list(data.column_names), column, label_column)


def sample_indices(size: int, count: int | None, *, mode: str = "first", seed: int = 0) -> list[int]:
    """Which sentences to use: the first ``count``, or ``count`` drawn at random without replacement (seeded).

    Random draws take a prefix of one seeded permutation, so a larger ``count`` extends a smaller one.
    """
    if mode not in SAMPLING:
        raise ValueError(f"unknown sampling {mode!r}; expected one of {', '.join(SAMPLING)}")
    if count is not None and count < 1:
        raise ValueError(f"the number of sentences must be >= 1, got {count}")
    count = size if count is None else min(count, size)
    if mode == "first":
        return list(range(count))
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order[:count]


def _from_rows(
    name: str,
    origin: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    column: str | None,
    label_column: str | None,
) -> TextDataset:
    if not rows:
        raise ValueError(f"data set {name!r} ({origin}) holds no rows")
    if column is None:
        column = next((c for c in SENTENCE_COLUMNS if c in columns), None)
        if column is None:
            raise ValueError(
                f"{origin}: no {' or '.join(map(repr, SENTENCE_COLUMNS))} column; choose one with --column "
                f"(columns: {', '.join(columns)})"
            )
    elif column not in columns:
        raise ValueError(f"{origin}: no column {column!r}; columns: {', '.join(columns)}")
    if label_column is None:
        label_column = LABEL_COLUMN if LABEL_COLUMN in columns else None
    elif label_column not in columns:
        raise ValueError(f"{origin}: no label column {label_column!r}; columns: {', '.join(columns)}")
    kept = [row for row in rows if str(row.get(column) or "").strip()]
    sentences = tuple(str(row[column]).strip() for row in kept)
    labels = None
    if label_column is not None:
        labels = tuple(_label(row.get(label_column), origin, index) for index, row in enumerate(kept, start=1))
    return TextDataset(name, sentences, labels, origin)


def _label(value: Any, origin: Any, where: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{origin} (row {where}): label {value!r} is not an integer") from error


def _first_file(folder: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{what}: expected {' or '.join(names)} in {folder}")


def _read_legacy_lines(path: Path) -> list[str]:
    """Non-blank lines of a file that is UTF-8 or, as the original Rotten Tomatoes release, cp1252/latin-1."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:  # bytes cp1252 leaves undefined (0x81, 0x8d, ...)
            text = raw.decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]
