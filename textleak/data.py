"""Sentence sources: plain text files (one sentence a line) and the project's own sample sentences."""

from __future__ import annotations

from pathlib import Path

SAMPLE_FILE = "sample_sentences.txt"


def read_sentences(path: str | Path, *, limit: int | None = None) -> list[str]:
    """Non-blank lines of a UTF-8 text file, stripped; an empty file is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sentence file {path} does not exist")
    sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        raise ValueError(f"sentence file {path} holds no sentences (expected one sentence per line)")
    return sentences[:limit]


def read_cola(path: str | Path, *, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Sentences and acceptability labels of a CoLA tsv (no header; label in column 2, sentence in column 4)."""
    sentences, labels = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 4:
            raise ValueError(f"{path}:{number}: expected 4 tab-separated CoLA columns, found {len(fields)}")
        labels.append(int(fields[1]))
        sentences.append(fields[3].strip())
    if not sentences:
        raise ValueError(f"CoLA file {path} holds no sentences")
    return sentences[:limit], labels[:limit]


def sample_sentences_path() -> Path:
    """Our own sample sentences: packaged in the wheel, or ``data/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_data" / SAMPLE_FILE, here.parent / "data" / SAMPLE_FILE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the sample sentences ({SAMPLE_FILE}) are missing from this installation")


def sample_sentences(*, limit: int | None = None) -> list[str]:
    """The sentences the CLI attacks when given none (short, made up, with private-looking content)."""
    return read_sentences(sample_sentences_path(), limit=limit)


def batches(sentences: list[str], size: int) -> list[list[str]]:
    """Consecutive batches of ``size`` sentences (the last may be smaller)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [sentences[i : i + size] for i in range(0, len(sentences), size)]
