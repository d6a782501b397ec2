"""One job, wherever it runs (this process, a worker process, a Ray task): client -> attack -> score -> record.

Models are cached per process (a few at most), so a worker that runs many batches loads each model once.
"""

from __future__ import annotations

import functools
import time
import traceback
from collections.abc import Callable
from typing import Any

from textleak.attacks import Attack, get_attack
from textleak.evaluation.matrix import Job, defense_specs, parse_attack
from textleak.experiment import attack_sentences
from textleak.models import LoadedModel, load_model
from textleak.tasks import head_for

MODEL_CACHE_SIZE = 4


@functools.lru_cache(maxsize=MODEL_CACHE_SIZE)
def cached_model(spec: str, head: str, seed: int) -> LoadedModel:
    """``load_model`` once per (spec, head, seed) in this process; callers must not modify the model."""
    return load_model(spec, head=head, seed=seed)


def prepare(job: Job) -> tuple[LoadedModel, Attack]:
    """The model (cached) and the configured attack of a job: the set-up a time limit should not count."""
    name, options = parse_attack(job.attack)
    options.setdefault("seed", job.batch_seed)
    return cached_model(job.model, head_for(job.task), job.model_seed), get_attack(name, **options)


def execute(job: Job, target: LoadedModel, attack: Attack) -> dict[str, Any]:
    """Simulate the defended client on the job's batch, attack its update, and return the scored record."""
    start = time.perf_counter()
    labels = list(job.labels) if job.task == "classification" and job.labels is not None else None
    result = attack_sentences(
        target,
        list(job.sentences),
        attack,
        task=job.task,
        seed=job.batch_seed,
        labels=labels,
        reveal=job.reveal,
        defenses=defense_specs(job.defense),
    )
    assert result.scores is not None  # the client's truth is always known here
    recovered = [""] * len(job.sentences)
    for pair in result.scores.pairs:
        recovered[pair["ref_index"]] = result.reconstruction.texts[pair["pred_index"]]
    return {
        **base_record(job),
        "status": "ok",
        "recovered": recovered,
        "scores": {"without_special": result.scores.without_special, "with_special": result.scores.with_special},
        "seconds": result.reconstruction.timings.get("total_s", 0.0),
        "client_seconds": result.client_seconds,
        "wall_seconds": time.perf_counter() - start,
        "warnings": list(result.reconstruction.warnings),
        "attack_config": result.reconstruction.config,
        "defense_records": [dict(record) for record in result.update.metadata.defenses],
    }


def run_job(job: Job, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Prepare and execute a job; an exception becomes an ``error`` record so the rest of the matrix goes on.

    ``on_start`` is called between set-up and the batch itself (a time limit counts from there).
    """
    try:
        target, attack = prepare(job)
        if on_start is not None:
            on_start()
        return execute(job, target, attack)
    except Exception as error:  # recorded, shown in the report, retried with --retry
        return error_record(job, error)


def base_record(job: Job) -> dict[str, Any]:
    """What every record of a job holds, whatever its status: key, setting, batch, configuration."""
    return {
        "type": "batch",
        "key": job.key,
        **job.identity(),
        "batch_seed": job.batch_seed,
        "model_seed": job.model_seed,
        "reveal": list(job.reveal),
        "indices": list(job.indices),
        "sentences": list(job.sentences),
        "labels": None if job.labels is None else list(job.labels),
    }


def error_record(job: Job, error: BaseException) -> dict[str, Any]:
    """The record of a job that raised."""
    last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return failure_record(job, "error", f"{type(error).__name__}: {error}{where}")


def timeout_record(job: Job, limit: float) -> dict[str, Any]:
    """The record of a job stopped at the time limit."""
    return failure_record(job, "timeout", f"stopped after the {limit:g} s time limit")


def failure_record(job: Job, status: str, message: str) -> dict[str, Any]:
    """The record of a job that produced no scores: its status and why."""
    return {**base_record(job), "status": status, "error": message}
