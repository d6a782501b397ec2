"""The run plan: every (model, task, data set, batch size, attack, defense, batch) a matrix asks for, as jobs.

Attacks are written ``name[:key=value,...]`` (values parsed as JSON where they parse, e.g. ``tag:iterations=50``),
defense settings as one or more defense specs joined by ``|`` (``prune:ratio=0.9|noise:sigma=1e-4``) or ``none``.
Each job carries everything a worker needs (sentences included) and a key that names it in the result store.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from textleak.attacks import ATTACKS
from textleak.defenses import as_defenses
from textleak.errors import unknown_name
from textleak.evaluation.sources import SAMPLING, TextDataset, sample_indices
from textleak.tasks import check_task

NO_DEFENSE = "none"
DEFENSE_JOIN = "|"
KEY_FIELDS = ("model", "task", "dataset", "batch_size", "attack", "defense", "batch_index", "seed")


@dataclass(frozen=True)
class EvaluationConfig:
    """What to run; recorded with every result so each number says what produced it.

    ``sentences`` or ``batches`` bound how many sentences each batch size uses (neither: every sentence).
    """

    data: tuple[str, ...] = ("cola",)
    models: tuple[str, ...] = ("default",)
    tasks: tuple[str, ...] = ("classification",)
    attacks: tuple[str, ...] = ("span",)
    defenses: tuple[str, ...] = (NO_DEFENSE,)
    batch_sizes: tuple[int, ...] = (1,)
    sentences: int | None = None
    batches: int | None = None
    sample: str = "first"
    seed: int = 0
    model_seed: int = 0
    reveal: tuple[str, ...] = ("lengths",)
    data_root: str | None = None
    split: str | None = None
    column: str | None = None
    label_column: str | None = None

    def __post_init__(self) -> None:
        for name in ("data", "models", "tasks", "attacks", "defenses", "batch_sizes"):
            if not getattr(self, name):
                raise ValueError(f"evaluation needs at least one entry in {name}")
        if self.sentences is not None and self.batches is not None:
            raise ValueError("give either sentences (per batch size) or batches (per batch size), not both")
        for size in self.batch_sizes:
            if size < 1:
                raise ValueError(f"batch sizes must be >= 1, got {size}")
        for count, what in ((self.sentences, "sentences"), (self.batches, "batches")):
            if count is not None and count < 1:
                raise ValueError(f"{what} must be >= 1, got {count}")
        if self.sample not in SAMPLING:
            raise ValueError(f"unknown sampling {self.sample!r}; expected one of {', '.join(SAMPLING)}")
        for task in self.tasks:
            check_task(task)
        for spec in self.attacks:
            parse_attack(spec)
        for setting in self.defenses:
            defense_specs(setting)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable copy."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Job:
    """One batch to attack: the setting it belongs to and the private sentences (picklable, for any executor)."""

    model: str
    task: str
    dataset: str
    batch_size: int
    attack: str
    defense: str
    batch_index: int
    seed: int
    sentences: tuple[str, ...]
    labels: tuple[int, ...] | None
    model_seed: int = 0
    reveal: tuple[str, ...] = ("lengths",)
    indices: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """The store key: a rerun skips every job whose key is recorded."""
        return job_key({name: getattr(self, name) for name in KEY_FIELDS})

    @property
    def batch_seed(self) -> int:
        """The seed of this batch's client (masking) and attack: the run seed plus the batch index."""
        return self.seed + self.batch_index

    def identity(self) -> dict[str, Any]:
        """The key fields as a dict (the setting and the batch), for records."""
        return {name: getattr(self, name) for name in KEY_FIELDS}


def job_key(fields: dict[str, Any]) -> str:
    """A stable text key from the key fields of a job or record."""
    return json.dumps([fields.get(name) for name in KEY_FIELDS])


def parse_attack(spec: str) -> tuple[str, dict[str, Any]]:
    """``name[:key=value,...]`` -> (name, options); values parse as JSON where they can (a JSON list becomes a
    tuple: ``tag:params=["layer.0.","layer.1."]``); an unknown attack name is an error naming the known ones."""
    name, _, rest = spec.partition(":")
    if name not in ATTACKS:
        raise unknown_name("attack", name, ATTACKS)
    options: dict[str, Any] = {}
    for part in filter(None, re.split(r",(?![^\[\]]*\])", rest)):  # commas inside a JSON list do not split
        key, sep, raw = part.partition("=")
        if not sep or not key:
            raise ValueError(f"attack spec {spec!r}: expected key=value options, got {part!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options[key.replace("-", "_")] = tuple(value) if isinstance(value, list) else value
    return name, options


def defense_specs(setting: str) -> tuple[str, ...]:
    """The defense specs of one setting (``none`` -> no defense); each spec is validated now, before any run."""
    if setting.strip() == NO_DEFENSE:
        return ()
    specs = tuple(part.strip() for part in setting.split(DEFENSE_JOIN) if part.strip())
    if not specs:
        raise ValueError(f"empty defense setting {setting!r}; use {NO_DEFENSE!r} for no defense")
    as_defenses(specs)
    return specs


def batch_plan(dataset: TextDataset, batch_size: int, config: EvaluationConfig) -> list[list[int]]:
    """Sentence indices of each batch of one data set at one batch size (the last batch may be smaller)."""
    if config.sentences is not None:
        count: int | None = config.sentences
    elif config.batches is not None:
        count = config.batches * batch_size
    else:
        count = None  # every sentence
    indices = sample_indices(len(dataset.sentences), count, mode=config.sample, seed=config.seed)
    return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]


def build_jobs(config: EvaluationConfig, datasets: Sequence[TextDataset]) -> list[Job]:
    """Every job of the matrix, data set by data set and batch size by batch size (the order a report reads)."""
    names = [dataset.name for dataset in datasets]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"two data sources share the name(s) {repeated}; results would be mixed up")
    jobs = []
    for dataset in datasets:
        for batch_size in config.batch_sizes:
            plan = batch_plan(dataset, batch_size, config)
            for model in config.models:
                for task in config.tasks:
                    for defense in config.defenses:
                        for attack in config.attacks:
                            for index, members in enumerate(plan):
                                labels = None
                                if dataset.labels is not None:
                                    labels = tuple(dataset.labels[i] for i in members)
                                jobs.append(
                                    Job(
                                        model=model,
                                        task=task,
                                        dataset=dataset.name,
                                        batch_size=batch_size,
                                        attack=attack,
                                        defense=defense,
                                        batch_index=index,
                                        seed=config.seed,
                                        sentences=tuple(dataset.sentences[i] for i in members),
                                        labels=labels,
                                        model_seed=config.model_seed,
                                        reveal=config.reveal,
                                        indices=tuple(members),
                                    )
                                )
    return jobs
