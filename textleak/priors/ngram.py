"""An interpolated Kneser-Ney n-gram model over a tokenizer's vocabulary, trained by our own code on a text file.

Each sentence (non-blank line) is tokenised without special tokens and framed by ``order - 1`` start markers
([CLS]) and one end marker ([SEP]). The highest order uses raw counts, lower orders continuation counts (how many
distinct tokens precede an n-gram), every order an absolute discount ``D = n1 / (n1 + 2 n2)`` whose mass goes to
the next lower order; the lowest order interpolates with the uniform distribution, so every token of the
vocabulary has a non-zero probability and every conditional distribution sums to one.
The model is saved as safetensors (n-gram id tables and counts) with its settings as JSON metadata: never pickle.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

FORMAT = "textleak-ngram-1"
_BATCH_LINES = 2048


@dataclass(frozen=True)
class _History:
    """Counts following one history: their total, how many distinct tokens, and the counts themselves."""

    total: int
    counts: dict[int, int]


class NgramPrior:
    """Interpolated Kneser-Ney n-gram model; ``score`` gives each sequence's log-probability (content tokens)."""

    def __init__(
        self,
        counts: Sequence[dict[tuple[int, ...], int]],
        *,
        vocab_size: int,
        bos: int,
        eos: int,
        discounts: Sequence[float] | None = None,
        info: dict[str, str] | None = None,
    ) -> None:
        """``counts[k]`` maps (k+1)-grams to their (raw for the top order, continuation otherwise) counts."""
        self.order = len(counts)
        if self.order < 1:
            raise ValueError("an n-gram model needs at least one order of counts")
        self.vocab_size, self.bos, self.eos = vocab_size, bos, eos
        self.counts = [dict(c) for c in counts]
        self.discounts = list(discounts) if discounts is not None else [_discount(c) for c in self.counts]
        self.info = dict(info or {})
        self._histories: list[dict[tuple[int, ...], _History]] = []
        for table in self.counts:
            grouped: dict[tuple[int, ...], dict[int, int]] = {}
            for gram, count in table.items():
                grouped.setdefault(gram[:-1], {})[gram[-1]] = count
            self._histories.append({h: _History(sum(c.values()), c) for h, c in grouped.items()})
        self._unigram = self._unigram_distribution()

    def __repr__(self) -> str:
        sizes = ", ".join(str(len(c)) for c in self.counts)
        return f"NgramPrior(order={self.order}, vocab={self.vocab_size}, n-grams per order=[{sizes}])"

    def _unigram_distribution(self) -> torch.Tensor:
        history = self._histories[0].get((), _History(0, {}))
        uniform = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        if history.total == 0:
            return uniform
        discount = self.discounts[0]
        dist = uniform * (discount * len(history.counts) / history.total)
        ids = torch.tensor(list(history.counts), dtype=torch.long)
        values = torch.tensor(list(history.counts.values()), dtype=torch.float64)
        dist[ids] += (values - discount).clamp_min(0) / history.total
        return dist

    def distribution(self, history: Sequence[int]) -> torch.Tensor:
        """P(w | history) for every token w of the vocabulary (float64, sums to one)."""
        context = self._context(history)
        dist = self._unigram.clone()
        for k in range(1, self.order):
            found = self._histories[k].get(tuple(context[len(context) - k :]))
            if found is None:
                continue
            discount = self.discounts[k]
            dist *= discount * len(found.counts) / found.total
            ids = torch.tensor(list(found.counts), dtype=torch.long)
            values = torch.tensor(list(found.counts.values()), dtype=torch.float64)
            dist[ids] += (values - discount).clamp_min(0) / found.total
        return dist

    def probability(self, token: int, history: Sequence[int]) -> float:
        """P(token | history), the same number ``distribution(history)[token]`` holds, without the full vector."""
        context = self._context(history)
        prob = float(self._unigram[token])
        for k in range(1, self.order):
            found = self._histories[k].get(tuple(context[len(context) - k :]))
            if found is None:
                continue
            discount = self.discounts[k]
            prob = max(found.counts.get(token, 0) - discount, 0) / found.total + (
                discount * len(found.counts) / found.total * prob
            )
        return prob

    def _context(self, history: Sequence[int]) -> list[int]:
        """The last ``order - 1`` tokens, padded on the left with start markers."""
        pad = [self.bos] * (self.order - 1)
        return (pad + [int(t) for t in history])[len(history) :] if self.order > 1 else []

    def score(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probability of each sequence including its end marker."""
        out = []
        for sequence in sequences:
            tokens = [int(t) for t in sequence] + [self.eos]
            total = 0.0
            for i, token in enumerate(tokens):
                total += math.log(max(self.probability(token, tokens[:i]), 1e-300))
            out.append(total)
        return torch.tensor(out, dtype=torch.float64)

    def save(self, path: str | Path) -> Path:
        """Write the counts as safetensors (one id table and one count vector per order), settings as JSON."""
        path = Path(path)
        tensors = {}
        for k, table in enumerate(self.counts, start=1):
            grams = list(table)
            tensors[f"grams_{k}"] = torch.tensor(grams, dtype=torch.long).reshape(len(grams), k)
            tensors[f"counts_{k}"] = torch.tensor([table[g] for g in grams], dtype=torch.long)
        settings = {
            "format": FORMAT,
            "order": self.order,
            "vocab_size": self.vocab_size,
            "bos": self.bos,
            "eos": self.eos,
            "discounts": self.discounts,
            "info": self.info,
        }
        save_file(tensors, str(path), metadata={"textleak_ngram": json.dumps(settings)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> NgramPrior:
        """Read a model written by ``save``; a missing or foreign file is an error naming the path."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"n-gram model file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except Exception as error:  # safetensors raises untyped errors on damaged files
            raise ValueError(f"could not read n-gram model {path}: {error}") from error
        settings = json.loads(header.get("textleak_ngram", "{}"))
        if settings.get("format") != FORMAT:
            raise ValueError(f"{path} is not a textleak n-gram model (format {settings.get('format')!r})")
        counts = []
        for k in range(1, settings["order"] + 1):
            grams, values = tensors[f"grams_{k}"].tolist(), tensors[f"counts_{k}"].tolist()
            counts.append({tuple(g): int(v) for g, v in zip(grams, values, strict=True)})
        return cls(
            counts,
            vocab_size=settings["vocab_size"],
            bos=settings["bos"],
            eos=settings["eos"],
            discounts=settings["discounts"],
            info=settings.get("info"),
        )


def _discount(table: dict[tuple[int, ...], int]) -> float:
    """Absolute discount n1 / (n1 + 2 n2) from the counts of counts (0.75 when undefined)."""
    histogram = Counter(table.values())
    n1, n2 = histogram.get(1, 0), histogram.get(2, 0)
    return n1 / (n1 + 2 * n2) if n1 + n2 > 0 and n1 > 0 else 0.75


def count_ngrams(sentences: Iterable[Sequence[int]], order: int, bos: int, eos: int) -> list[dict[tuple, int]]:
    """Raw counts for the top order and continuation counts for the lower ones (Kneser-Ney)."""
    if order < 1:
        raise ValueError(f"n-gram order must be >= 1, got {order}")
    top: Counter[tuple[int, ...]] = Counter()
    for sentence in sentences:
        tokens = [bos] * (order - 1) + [int(t) for t in sentence] + [eos]
        for i in range(order - 1, len(tokens)):
            top[tuple(tokens[i - order + 1 : i + 1])] += 1
    tables: list[dict[tuple, int]] = [dict(top)]
    for _ in range(order - 1):
        lower: Counter[tuple[int, ...]] = Counter(gram[1:] for gram in tables[0])
        tables.insert(0, dict(lower))
    return tables


def train_ngram(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, *, order: int = 3, limit: int | None = None
) -> NgramPrior:
    """Train an n-gram prior on the non-blank lines of a UTF-8 text file (``limit`` lines at most)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"n-gram training text {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    if not lines:
        raise ValueError(f"n-gram training text {path} holds no text")
    encoded: list[list[int]] = []
    for start in range(0, len(lines), _BATCH_LINES):
        batch = tokenizer(lines[start : start + _BATCH_LINES], add_special_tokens=False, verbose=False)
        encoded.extend(batch["input_ids"])
    bos, eos = tokenizer.cls_token_id, tokenizer.sep_token_id
    counts = count_ngrams(encoded, order, bos, eos)
    info = {"trained_on": str(path), "lines": str(len(lines)), "tokenizer": str(tokenizer.name_or_path)}
    return NgramPrior(counts, vocab_size=len(tokenizer), bos=bos, eos=eos, info=info)
