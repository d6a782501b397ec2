"""Where jobs run: in this process, in worker processes with a per-batch time limit, or as Ray tasks.

Every executor has one method, ``run(jobs, on_result)``, and calls ``on_result(record)`` in this process as each
job finishes, so the caller appends it to the store at once whatever the executor.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from textleak.errors import TextleakError
from textleak.evaluation.matrix import Job
from textleak.evaluation.worker import failure_record, run_job, timeout_record

OnResult = Callable[[dict[str, Any]], None]
EXECUTORS = ("local", "ray")
POLL_S = 0.2


class Executor(Protocol):
    """Runs jobs and reports each record as it finishes."""

    def run(self, jobs: Sequence[Job], on_result: OnResult) -> None: ...


class InProcessExecutor:
    """Jobs one after another in this process (no time limit: nothing could stop a batch that hangs)."""

    def __repr__(self) -> str:
        return "InProcessExecutor()"

    def run(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        for job in jobs:
            on_result(run_job(job))


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _process_main(connection: Connection, threads: int) -> None:
    """A worker process: receive jobs until None, say when each batch starts, send back each record."""
    _set_threads(threads)
    while (job := connection.recv()) is not None:
        record = run_job(job, on_start=lambda: connection.send(("started", None)))
        connection.send(("done", record))


class _Slot:
    """One spawned worker process, its pipe, and the job it is running."""

    def __init__(self, context: Any, threads: int) -> None:
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_process_main, args=(child, threads), daemon=True)
        self.process.start()
        child.close()
        self.job: Job | None = None
        self.started: float | None = None

    def submit(self, job: Job) -> None:
        self.connection.send(job)
        self.job, self.started = job, None

    def close(self, *, kill: bool = False) -> None:
        if not kill and self.process.is_alive():
            try:
                self.connection.send(None)
                self.process.join(timeout=5)
            except (BrokenPipeError, OSError):
                pass
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


class ProcessExecutor:
    """Jobs in ``workers`` spawned processes (models cached in each); a batch past ``time_limit`` seconds is
    stopped (its process killed and replaced) and recorded as a timeout.

    The limit counts from the start of the batch itself, after the worker has loaded the model.
    """

    def __init__(self, *, workers: int = 1, time_limit: float | None = None, threads: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if time_limit is not None and time_limit <= 0:
            raise ValueError(f"the time limit must be > 0 seconds, got {time_limit}")
        self.workers, self.time_limit, self.threads = workers, time_limit, threads

    def __repr__(self) -> str:
        return f"ProcessExecutor(workers={self.workers}, time_limit={self.time_limit}, threads={self.threads})"

    def run(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        context = multiprocessing.get_context("spawn")
        queue = deque(jobs)
        slots = [_Slot(context, self.threads) for _ in range(min(self.workers, len(jobs)))]
        try:
            while queue or any(slot.job is not None for slot in slots):
                for index, slot in enumerate(slots):
                    if slot.job is None and queue:
                        if not slot.process.is_alive():  # died while idle
                            slot.close(kill=True)
                            slots[index] = slot = _Slot(context, self.threads)
                        slot.submit(queue.popleft())
                busy = [slot for slot in slots if slot.job is not None]
                ready = wait([slot.connection for slot in busy], timeout=POLL_S)
                for index, slot in enumerate(slots):
                    if slot.job is None:
                        continue
                    record, lost = self._poll(slot, ready)
                    if lost:  # hung or dead: replace the process
                        slot.close(kill=True)
                        slots[index] = _Slot(context, self.threads)
                    elif record is not None:
                        slot.job = None
                    if record is not None:
                        on_result(record)
        finally:
            for slot in slots:
                slot.close(kill=slot.job is not None)

    def _poll(self, slot: _Slot, ready: list[Any]) -> tuple[dict[str, Any] | None, bool]:
        """(the finished job's record or None while its batch runs on, whether the worker is lost)."""
        assert slot.job is not None
        if slot.connection in ready:
            try:
                kind, record = slot.connection.recv()
            except (EOFError, OSError):
                code = slot.process.exitcode
                return failure_record(slot.job, "error", f"the worker process died (exit code {code})"), True
            if kind == "started":
                slot.started = time.monotonic()
                return None, False
            return record, False
        if self.time_limit is not None and slot.started is not None:
            if time.monotonic() - slot.started > self.time_limit:
                return timeout_record(slot.job, self.time_limit), True
        return None, False


def _ray_job(job: Job, threads: int) -> dict[str, Any]:
    """A job as a Ray task (Ray reuses worker processes, so the model cache carries over between tasks)."""
    _set_threads(threads)
    return run_job(job)


class RayExecutor:
    """Jobs as Ray tasks on a local instance or the cluster at ``address``; records come back to this process.

    With a ``time_limit``, a task still running that long after it was submitted is cancelled and recorded as a
    timeout (each task reserves ``threads`` CPUs and no more tasks are in flight than the cluster's CPUs hold, so
    submission is close to the start; the first task on a fresh Ray worker also pays for loading the model).
    """

    def __init__(
        self, *, address: str | None = None, time_limit: float | None = None, threads: int = 1
    ) -> None:
        if time_limit is not None and time_limit <= 0:
            raise ValueError(f"the time limit must be > 0 seconds, got {time_limit}")
        self.address, self.time_limit, self.threads = address, time_limit, threads

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, time_limit={self.time_limit}, threads={self.threads})"

    def run(self, jobs: Sequence[Job], on_result: OnResult) -> None:
        try:
            import ray
        except ImportError as error:
            raise TextleakError('the ray executor needs Ray: pip install "textleak[ray]"') from error
        started_here = not ray.is_initialized()
        if started_here:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        task = ray.remote(num_cpus=self.threads, max_retries=0)(_ray_job)
        capacity = max(1, int(ray.cluster_resources().get("CPU", 1)) // self.threads)
        queue = deque(jobs)
        running: dict[Any, tuple[Job, float]] = {}
        try:
            while queue or running:
                while queue and len(running) < capacity:
                    job = queue.popleft()
                    running[task.remote(job, self.threads)] = (job, time.monotonic())
                ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    job, _ = running.pop(ref)
                    try:
                        record = ray.get(ref)
                    except Exception as error:  # a crashed worker or a Ray failure: record it, go on
                        record = failure_record(job, "error", f"Ray task failed: {type(error).__name__}: {error}")
                    on_result(record)
                if self.time_limit is not None:
                    now = time.monotonic()
                    for ref, (job, submitted) in list(running.items()):
                        if now - submitted > self.time_limit:
                            ray.cancel(ref, force=True)
                            del running[ref]
                            on_result(timeout_record(job, self.time_limit))
        finally:
            for ref in running:
                ray.cancel(ref, force=True)
            if started_here:
                ray.shutdown()


def make_executor(
    kind: str = "local",
    *,
    workers: int = 0,
    time_limit: float | None = None,
    threads: int = 1,
    ray_address: str | None = None,
) -> Executor:
    """``local``: in this process when ``workers`` is 0 and there is no time limit, else a process pool
    (a time limit needs a process it can stop); ``ray``: Ray tasks."""
    if kind == "ray":
        return RayExecutor(address=ray_address, time_limit=time_limit, threads=threads)
    if kind != "local":
        raise ValueError(f"unknown executor {kind!r}; expected one of {', '.join(EXECUTORS)}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0 and time_limit is None:
        return InProcessExecutor()
    return ProcessExecutor(workers=max(workers, 1), time_limit=time_limit, threads=threads)
