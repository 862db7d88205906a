"""Extracting features into a :class:`~bnfix.fusion.store.FeatureStore` on worker processes.

Decoding a video, resampling its audio track and computing a 1024-frame fbank is CPU work in
C (FFmpeg, torch kernels) mixed with Python glue that holds the GIL, so threads stop paying past
a core or two; processes scale with the cores. Each worker computes one sample at a time and
writes the row itself (``pwrite`` into the store's file), so only a small record travels back
to the parent, which appends it to the index as soon as it arrives: a run killed half-way keeps
everything finished before the kill.

Workers run torch single-threaded (as DataLoader workers do): per-clip tensors are too small
for intra-op threads to pay, and workers x threads would oversubscribe the cores.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rich.console

from bnfix.errors import BnfixError, one_line
from bnfix.fusion.store import FeatureStore, Record, write_row

__all__ = ["SAMPLE_TIMEOUT", "Computed", "Job", "Kind", "default_workers", "extract"]

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

#: Seconds a sample may take on a worker process before it is given up as stuck (the config's
#: ``data.sample_timeout`` default: generous for clips, to be raised for hour-long videos).
SAMPLE_TIMEOUT = 600.0


@dataclass
class Computed:
    """What a kind computes for one sample: the row, or why there is none."""

    array: np.ndarray | None = None
    frames: int = 0
    error: str | None = None
    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0
    aspect: float = 1.0


class Kind(Protocol):
    """A modality's feature computation; must pickle (it is sent to the worker processes)."""

    kind: str

    def prepare(self) -> None: ...

    def compute(self, source: Any) -> Computed: ...


@dataclass
class Job:
    """One sample to extract: its entry name, key, what to compute from, and its row."""

    name: str
    key: str
    source: Any  # what Kind.compute takes (a path, a list of frame files, ...)
    row: int
    error: str | None = None  # known before computing (the source cannot even be listed)


def default_workers() -> int:
    """The cores this process may use (cgroup/affinity aware on Linux)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def extract(
    kind: Kind,
    store: FeatureStore,
    jobs: Sequence[Job],
    workers: int,
    console: rich.console.Console,
    timeout: float = SAMPLE_TIMEOUT,
) -> int:
    """Compute every job into ``store``; returns how many were computed. Progress and ETA on
    the console; a kill loses at most the samples in flight. On worker processes, a sample
    still computing after ``timeout`` seconds is recorded as stuck (see :func:`_parallel`)."""
    if not jobs:
        return 0
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    workers = max(1, min(workers, len(jobs)))
    label = f"{kind.kind} features ({workers} process{'es' if workers > 1 else ''})"
    log = _PlainProgress(console, label, len(jobs))

    def done(record: Record) -> None:
        store.commit([record])  # at once: a kill loses only the samples in flight
        log.advance()
        progress.advance(task)

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("·"),
        TimeElapsedColumn(),
        TextColumn("· eta"),
        TimeRemainingColumn(),
    )
    with contextlib.ExitStack() as stack:
        pool = None
        if workers > 1:  # forked before the progress bar's refresh thread exists
            pool = stack.enter_context(_pool(kind, workers))
        else:
            kind.prepare()
        progress = stack.enter_context(Progress(*columns, console=console, transient=True))
        task = progress.add_task(label, total=len(jobs))
        if pool is None:
            for job in jobs:
                done(_run(kind, store.data_path, job))
        else:
            _parallel(pool, kind, store, jobs, workers, done, progress, timeout)
    return len(jobs)


@contextlib.contextmanager
def _pool(kind: Kind, workers: int) -> Iterator[ProcessPoolExecutor]:
    """``workers`` processes, all started now (a no-op job each waits for them).

    Forked (where fork exists), so a caller's script is never re-imported by the workers —
    a spawned or fork-server worker re-runs an unguarded script's top level, which would start
    the extraction again inside the worker, wait for the store's lock and hang. Forking is
    safe here because it happens before any thread of ours starts, and each worker sets
    torch to one thread before its first op (a forked child must not enter the parent's
    OpenMP pool).
    """
    with ProcessPoolExecutor(
        workers,
        mp_context=worker_context(),
        initializer=_init_worker,
        initargs=(kind, os.getpid()),
    ) as pool:
        try:
            for future in [pool.submit(_ready) for _ in range(workers)]:
                future.result()
        except BrokenProcessPool as e:
            raise BnfixError(
                "feature-extraction worker processes could not start; when calling bnfix "
                'from a script, put the call under `if __name__ == "__main__":`, or use one '
                "process (data.workers = 1)"
            ) from e
        yield pool


def _ready() -> bool:
    return True


def _parallel(
    pool: ProcessPoolExecutor,
    kind: Kind,
    store: FeatureStore,
    jobs: Sequence[Job],
    workers: int,
    done: Callable[[Record], None],
    progress: Any,
    timeout: float,
) -> None:
    """Run every job on ``pool``, and on fresh pools should one break.

    A worker that dies (a decoder crashing on a damaged file, the OOM killer) breaks the whole
    pool, and the pool cannot say which job killed it. So does one that hangs: when no job has
    finished for ``timeout`` seconds, the workers are killed. The jobs then in flight are run
    again one at a time, each in a process of its own with ``timeout`` seconds to finish: one
    that kills its process again, or runs out of time, is recorded as unreadable with what
    happened, like any file that cannot be decoded (so a resumed run does not stumble on it
    again), and the rest of the dataset carries on in a fresh pool. Every round settles at
    least the jobs it had in flight, so this ends; a pool that breaks before taking any
    (twice in a row) is an error, not a loop.
    """
    queue = deque(jobs)
    idle_breaks = 0  # pools that broke with nothing in flight: no round may do that twice
    with contextlib.ExitStack() as pools:
        while True:
            outcome = _drain(pool, store, queue, workers, done, timeout)
            if outcome is None:
                return
            what, suspects = outcome
            idle_breaks = idle_breaks + 1 if not suspects else 0
            if idle_breaks > 1:
                raise BnfixError(
                    f"{what}, twice, before taking a sample; the machine may be out of memory "
                    "(data.workers = 1 extracts in this process)"
                )
            pool.shutdown(wait=True)
            with _display_stopped(progress):  # new processes fork while no refresh thread runs
                progress.console.print(
                    f"{what}; retrying the {len(suspects)} sample(s) in flight one at a time"
                )
                for job in suspects:
                    done(_alone(kind, store.data_path, job, timeout))
                if not queue:
                    return
                pool = pools.enter_context(_pool(kind, workers))


def _drain(
    pool: ProcessPoolExecutor,
    store: FeatureStore,
    queue: deque[Job],
    workers: int,
    done: Callable[[Record], None],
    timeout: float,
) -> tuple[str, list[Job]] | None:
    """Keep ``2 x workers`` jobs in flight (a bounded queue: memory stays O(workers)) until
    ``queue`` is empty (None) or the pool breaks: then what broke it, and the jobs in flight it
    did not finish."""
    died = "a feature-extraction worker process died"
    flight: dict[Future[Record], Job] = {}
    try:
        while queue or flight:
            while queue and len(flight) < 2 * workers:
                job = queue.popleft()
                try:
                    flight[pool.submit(_run_in_worker, store.data_path, job)] = job
                except BrokenProcessPool:
                    queue.appendleft(job)
                    return died, _settle(flight, done)
            finished, _ = wait(flight, timeout=timeout, return_when=FIRST_COMPLETED)
            if not finished:
                _kill_workers(pool)
                return f"no feature-extraction job finished in {timeout:g} s", _settle(flight, done)
            if any(isinstance(f.exception(), BrokenProcessPool) for f in finished):
                return died, _settle(flight, done)
            for future in finished:
                done(future.result())
                del flight[future]
    except BaseException:
        for future in flight:
            future.cancel()
        raise
    return None


def _settle(flight: dict[Future[Record], Job], done: Callable[[Record], None]) -> list[Job]:
    """A broken pool's jobs in flight: hand on those that finished, return the rest."""
    wait(flight)  # a broken pool fails every pending future at once
    suspects = []
    for future, job in flight.items():
        if isinstance(future.exception(), BrokenProcessPool):
            suspects.append(job)
        else:
            done(future.result())
    return suspects


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    """SIGKILL a pool's processes (its own map: other children of this process live on); the
    pool then breaks and fails its pending jobs."""
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        process.kill()


@contextlib.contextmanager
def _display_stopped(progress: Any) -> Iterator[None]:
    progress.stop()
    try:
        yield
    finally:
        progress.start()


def _alone(kind: Kind, data_path: Path, job: Job, timeout: float) -> Record:
    """One job in a process of its own; one that dies or runs out of time makes an error
    record."""
    context = worker_context()
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_run_and_send, args=(kind, data_path, job, send, os.getpid()))
    process.start()
    send.close()
    record = error = None
    timed_out = False
    try:
        timed_out = not receive.poll(timeout)  # a dead sender reads as ready, then EOF
        if not timed_out:
            record, error = receive.recv()
    except EOFError:  # it died before sending
        pass
    finally:
        receive.close()
        if timed_out:
            process.kill()
        process.join()
    if error is not None:
        raise error
    if record is not None:
        return record
    if timed_out:
        reason = f"still decoding after {timeout:g} s (data.sample_timeout), given up"
    else:
        reason = f"decoding it killed its worker process ({_death(process.exitcode)})"
    return Record(name=job.name, key=job.key, row=-1, error=reason)


def _run_and_send(kind: Kind, data_path: Path, job: Job, send: Any, parent: int) -> None:
    _init_worker(kind, parent)
    try:
        send.send((_run(kind, data_path, job), None))
    except Exception as e:  # a bug, not a dead process: raised again in the parent
        send.send((None, e))


def _death(exitcode: int | None) -> str:
    """How a process ended, for a person: ``SIGSEGV``, ``SIGKILL: out of memory?``, ``exit code 3``
    (a SIGKILL nobody sent by hand is most often the kernel out of memory)."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"{name}: out of memory?" if name == "SIGKILL" else name
    return f"exit code {exitcode}"


def worker_context() -> Any:
    """The start method extraction workers use (see :func:`_pool`): fork where it exists."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


class _PlainProgress:
    """Progress lines for a console that is not a terminal (a batch job's log), where rich
    draws no bar: one line every ``every`` seconds with the rate and the time left."""

    def __init__(self, console: rich.console.Console, label: str, total: int, every: float = 30):
        self.console, self.label, self.total, self.every = console, label, total, every
        self.done = 0
        self.start = self.last = time.monotonic()
        self.active = not console.is_terminal and not console.quiet

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if not self.active or (now - self.last < self.every and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate else float("inf")
        self.console.print(
            f"{self.label}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), "
            f"{rate:.1f}/s, {left / 60:.1f} min left",
            highlight=False,
        )


_WORKER_KIND: list[Kind] = []


def _die_with_parent(parent: int) -> None:
    """Make this worker end when the run that forked it does. A run killed from outside
    (SIGKILL, SIGTERM, the OOM killer) would otherwise leave its workers waiting on their job
    queue for good, holding the feature store's lock (a flock is shared with forked
    children), and the ``--resume`` after it would wait on that lock in silence."""
    if sys.platform.startswith("linux"):
        try:  # the kernel sends SIGKILL when the parent dies
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            _watch_parent(parent)
    else:
        _watch_parent(parent)
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="bnfix-parent-watch", daemon=True).start()


def _init_worker(kind: Kind, parent: int) -> None:
    _die_with_parent(parent)
    import torch

    # First, before any torch op: a forked child must not enter the parent's OpenMP pool
    # (libgomp is not fork-safe); on one thread no parallel region starts. Per-clip tensors
    # are small anyway: processes, not threads, use the cores (as DataLoader workers do).
    torch.set_num_threads(1)
    kind.prepare()
    _WORKER_KIND[:] = [kind]


def _run_in_worker(data_path: Path, job: Job) -> Record:
    return _run(_WORKER_KIND[0], data_path, job)


def _run(kind: Kind, data_path: Path, job: Job) -> Record:
    """Compute one job and write its row; unreadable sources become error records."""
    record = Record(name=job.name, key=job.key, row=-1)
    if job.error is not None:
        record.error = job.error
        return record
    try:
        computed = kind.compute(job.source)
    except BnfixError as e:  # decoders raise path-less BnfixErrors for unusable files
        computed = Computed(error=one_line(e))
    if computed.error is not None or computed.array is None:
        record.error = computed.error or "nothing decoded"
        return record
    write_row(data_path, job.row, computed.array)
    record.row = job.row
    record.frames = computed.frames
    record.total, record.total_sq, record.count = computed.total, computed.total_sq, computed.count
    record.aspect = computed.aspect
    return record
