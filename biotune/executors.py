"""Where training runs execute (``executor.kind``): this process, local worker processes, or Ray.

Searches, the final protocol and experiment rows hand their training runs to ``Executor.map``
and read each result as it finishes; no other file knows which executor runs them. The rules
every executor keeps:

- A call is ``function(shared, *arguments)``; ``shared`` is the large read-only input (model and
  dataset), sent through shared memory by the process pool, put in Ray's object store once.
- A call that raises (or whose worker dies) is retried once, then its result is a
  ``TaskFailure`` and the other calls go on.
- Out of GPU memory is never a result (it would become a fitness): the process frees its cache
  before the retry, and a second time stops the ``map`` with ``OutOfGPUMemoryError``.
- Each worker process is pinned to the GPU ``gpus.places`` gives it, ``executor.runs_per_gpu`` per GPU.
- A worker process keeps the shared input of the latest calls (by its ``token``, where it has
  one), so what a call builds on it serves the calls after it (a search's prefix cache).
- Workers return plain results; only the caller writes the run store (SQLite has one writer).
- Results do not depend on the executor: a training run depends on its inputs, seed and threads.

Ray is imported only for ``executor.kind = ray``. A Ray task that asks for a GPU runs in a worker
that exits after it (``max_calls=1``: its CUDA memory goes back to the device); CPU tasks reuse
their workers.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from . import gpus
from .config import ConfigError, ExecutorConfig, TrainConfig

log = logging.getLogger(__name__)

ATTEMPTS = 2  # a call that raises is retried once


class TrainingFailedError(RuntimeError):
    """Training runs that raised on every attempt, more than a search or protocol goes on past."""


class OutOfGPUMemoryError(TrainingFailedError):
    """A call that ran out of GPU memory on both attempts: the map stops, nothing of it is a result."""


class _RanOutOfMemory(RuntimeError):
    """One attempt that ran out of GPU memory, raised once its process freed the memory."""


@dataclass
class TaskFailure:
    """The result of a call that raised on every attempt."""

    error: str  # "TypeName: message" of the last attempt

    def __str__(self) -> str:
        return f"failed after {ATTEMPTS} attempts: {self.error}"


def threads_per_run(executor: ExecutorConfig, train: TrainConfig) -> int:
    """Torch CPU threads of one training run: ``train.num_threads``, else this machine's cores
    shared among the runs that go at once (one run: all of them)."""
    return train.num_threads or max(1, (os.cpu_count() or 1) // executor.workers)


def make_executor(executor: ExecutorConfig, train: TrainConfig) -> Executor:
    """The executor the settings ask for, its runs placed on GPUs (gpus.py); a device or placement
    this machine cannot give fails here, before anything trains."""
    places = gpus.places(executor, train) if executor.kind != "ray" else []
    if places:
        log.info("training runs on GPU(s) %s, %s", ", ".join(dict.fromkeys(slot.gpu for slot in places)),
                 "the whole memory each" if places[0].share == 1 else f"{places[0].share:.3g} of the memory each")
    if executor.kind == "serial":
        return SerialExecutor(places[0] if places else None)
    threads = threads_per_run(executor, train)
    log.info("%s executor: %d training runs at once, %d torch threads each%s", executor.kind, executor.workers,
             threads, "" if train.num_threads else " (train.num_threads unset: cores / workers; a run's floats "
             "depend on its threads, so compare with a serial run on as many threads)")
    if executor.kind == "process":
        return ProcessExecutor(workers=executor.workers, threads=threads, places=places or None)
    return RayExecutor(workers=executor.workers, threads=threads, gpu_indices=executor.gpus,
                       gpus_per_run=functools.partial(gpus.ray_gpus_per_run, executor, train))


class Executor:
    """``map`` runs calls and yields ``(index, result or TaskFailure)`` as each finishes. A caller
    that stops reading early (Ctrl-C, an error) cancels the calls still out."""

    in_process = False  # calls run in the caller's process (so they may show progress bars)

    def share(self, value):
        """A handle on ``value`` for ``map``'s ``shared``; sent to workers once where possible."""
        return value

    def map(self, function: Callable, calls: Sequence[tuple], shared=None) -> Iterator[tuple[int, object]]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the worker processes of a pool (a Ray started here stays up for the process's
        next runs, and stops when the process exits)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


_kept_shared: dict = {}  # in a worker process: the shared input of the latest calls, by its token


def _in_worker(function: Callable, shared, *arguments):
    """``_attempt`` in a worker process, on the shared input it kept: each call arrives with a
    new copy, replaced here by the first copy of the same token this worker received."""
    token = getattr(shared, "token", None)
    if token is not None:
        if token not in _kept_shared:
            _kept_shared.clear()  # one search at a time: the previous one's caches go
            _kept_shared[token] = shared
        shared = _kept_shared[token]
    return _attempt(function, shared, *arguments)


def _attempt(function: Callable, shared, *arguments):
    """One attempt of a call, in the process that runs it. Out of GPU memory, that process frees
    the failed run's tensors and torch's cache (once the error no longer holds them) first."""
    try:
        return function(shared, *arguments)
    except OutOfGPUMemoryError:  # a nested map's stop: already retried there
        raise
    except Exception as error:
        if not gpus.is_out_of_memory(error):
            raise
        message = " ".join(_describe(error).split())
    gpus.free_cached_memory()
    raise _RanOutOfMemory(message)


def _failed(function: Callable, arguments: tuple, error: BaseException | str, retrying: bool) -> TaskFailure:
    """Log a failed attempt and return the call's result should it stay failed; running out of
    GPU memory a second time (or a nested map's stop) raises ``OutOfGPUMemoryError`` instead."""
    if isinstance(error, OutOfGPUMemoryError):
        raise OutOfGPUMemoryError(str(error)) from None
    if isinstance(error, _RanOutOfMemory):
        if not retrying:
            raise OutOfGPUMemoryError(
                f"{getattr(function, '__name__', function)}{_short(arguments)} ran out of GPU memory on both "
                f"attempts ({error}); nothing of it is stored. To fix: {gpus.ADVICE}; then run it again: what "
                "finished is kept") from None
        text = f"{error} (its process's cached GPU memory freed)"
    else:
        text = error if isinstance(error, str) else _describe(error)
    _log_failure(function, arguments, text, retrying)
    return TaskFailure(text)


def _log_failure(function: Callable, arguments: tuple, error: str, retrying: bool) -> None:
    what = "retrying once" if retrying else "recorded as failed"
    log.error("%s%s raised %s; %s", getattr(function, "__name__", function), _short(arguments), error, what)


def _short(arguments: tuple) -> str:
    text = repr(arguments)
    return text if len(text) < 200 else text[:197] + "...)"


class SerialExecutor(Executor):
    """Every call in this process, one after another, in order (on ``place``'s GPU, if given)."""

    in_process = True

    def __init__(self, place: gpus.Slot | None = None):
        self.place = place

    def map(self, function, calls, shared=None):
        with gpus.placed(self.place):
            for index, arguments in enumerate(calls):
                for attempt in range(1, ATTEMPTS + 1):
                    try:
                        result = _attempt(function, shared, *arguments)
                        break
                    except Exception as error:  # noqa: BLE001 - recorded, the other calls go on
                        log.debug("%s", traceback.format_exc())
                        result = _failed(function, arguments, error, retrying=attempt < ATTEMPTS)
                yield index, result


def _start_process_worker(threads: int, places) -> None:
    """A new worker: its GPU place (taken from the pool's queue of them) before anything starts
    CUDA, then its torch threads."""
    if places is not None:
        gpus.pin(places.get())
    import torch

    torch.set_num_threads(threads)


class ProcessExecutor(Executor):
    """A pool of ``workers`` spawned processes on this machine (spawn: CUDA cannot be used in
    forked children). Tensors in ``shared`` go through torch's shared memory, not copies. With
    ``places``, each worker takes one of them when it starts (a pool that broke starts again
    with all of them)."""

    def __init__(self, workers: int, threads: int, places: list[gpus.Slot] | None = None):
        self.workers, self.threads, self.places = workers, threads, places
        self.pool: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self.pool is None:
            import torch.multiprocessing  # registers the shared-memory reductions for tensors  # noqa: F401

            context = multiprocessing.get_context("spawn")
            places = None
            if self.places:
                places = context.Queue()
                for slot in self.places:
                    places.put(slot)
            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                            initializer=_start_process_worker, initargs=(self.threads, places))
        return self.pool

    def map(self, function, calls, shared=None):
        attempts = dict.fromkeys(range(len(calls)), 0)
        running: dict = {}  # future -> (call index, the pool it went to)
        waiting = list(range(len(calls)))  # at most ``workers`` out at once: a worker that dies then
        try:                                # costs only the runs that were going, not the queued ones
            while waiting or running:
                while waiting and len(running) < self.workers:
                    index = waiting.pop(0)
                    attempts[index] += 1
                    future, pool = self._submit(function, shared, calls[index])
                    running[future] = (index, pool)
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in done:
                    index, pool = running.pop(future)
                    result, failure = self._outcome(future, pool)
                    if failure is None:
                        yield index, result
                        continue
                    retry = attempts[index] < ATTEMPTS
                    result = _failed(function, calls[index], failure, retrying=retry)
                    if retry:
                        waiting.insert(0, index)
                    else:
                        yield index, result
        finally:
            if running:  # the caller stopped early: stop the runs still going rather than wait for them
                self._discard_pool(terminate=True)

    def _submit(self, function, shared, arguments: tuple) -> tuple[Future, ProcessPoolExecutor]:
        """The call's future and the pool it went to."""
        try:
            pool = self._pool()
            return pool.submit(_in_worker, function, shared, *arguments), pool
        except BrokenProcessPool:  # broken by a worker that died since: a new pool takes the call
            self._discard_pool()
            pool = self._pool()
            return pool.submit(_in_worker, function, shared, *arguments), pool

    def _outcome(self, future: Future, pool: ProcessPoolExecutor) -> tuple[object, BaseException | str | None]:
        """``(result, None)`` for a call that returned, ``(None, failure)`` for one that raised."""
        try:
            return future.result(), None
        except BrokenProcessPool as error:
            # A worker died and broke its pool: every call going in that pool fails like this, and
            # the pool cannot say whose run killed the worker, so each spends an attempt (Ray, by
            # contrast, charges a dead worker to its own task).
            if pool is self.pool:
                self._discard_pool()
            return None, f"worker process died ({error})"
        except Exception as error:  # noqa: BLE001 - recorded, the other calls go on
            return None, error

    def _discard_pool(self, terminate: bool = False) -> None:
        if self.pool is None:
            return
        processes = list(getattr(self.pool, "_processes", {}).values())  # the pool offers no public handle
        self.pool.shutdown(wait=False, cancel_futures=True)
        if terminate:
            for process in processes:
                process.terminate()
        self.pool = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _ray_call(function, shared, arguments, threads: int, gpus_per_run: float):
    """A Ray task: the call on ``threads`` torch threads, on the GPU Ray assigned (it sets
    CUDA_VISIBLE_DEVICES, so the task's "cuda" is that device) within its share of the memory,
    then torch's cache emptied."""
    import torch

    torch.set_num_threads(threads)
    share = gpus.Slot(os.environ.get("CUDA_VISIBLE_DEVICES", ""), 0, gpus_per_run) if 0 < gpus_per_run < 1 else None
    try:
        with gpus.placed(share):
            return _in_worker(function, shared, *arguments)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class RayExecutor(Executor):
    """Ray core tasks, at most ``workers`` at once, each asking for ``threads`` CPUs and
    ``gpus_per_run`` GPUs (fractions pack several runs on one GPU; a function of the cluster's
    largest GPU count: asked once it is known). Connects to the cluster in ``RAY_ADDRESS`` when
    set, to a Ray already started in this process, or starts a local one, on ``gpu_indices``
    (this machine's torch indices) where given."""

    def __init__(self, workers: int, threads: int, gpus_per_run: float | Callable[[float], float] = 0.0,
                 gpu_indices: list[int] | None = None):
        try:
            import ray
        except ImportError as error:
            raise ConfigError(f"executor.kind=ray needs Ray ({error}): pip install -c constraints.txt -e '.[ray]'") from None
        self.ray, self.workers, self.threads = ray, workers, threads
        if gpu_indices is not None and (ray.is_initialized() or os.environ.get("RAY_ADDRESS")):
            raise ConfigError(f"executor.gpus={gpu_indices} picks GPUs of this machine for a Ray started here, but a "
                              "Ray cluster is already up (RAY_ADDRESS or ray.init in this process) and places its "
                              "tasks itself: leave executor.gpus unset (executor.runs_per_gpu or "
                              "executor.gpus_per_run set each run's share)")
        if not ray.is_initialized():
            if os.environ.get("RAY_ADDRESS"):
                ray.init(log_to_driver=True)
            else:  # a local cluster with room for the asked concurrency
                _start_local_ray(ray, num_cpus=max(os.cpu_count() or 1, workers * threads), gpu_indices=gpu_indices)
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
        if callable(gpus_per_run):
            gpus_per_run = gpus_per_run(max((node.get("GPU", 0) for node in nodes), default=0))
        self.gpus_per_run = gpus_per_run
        if not any(gpus_per_run <= node.get("GPU", 0) and threads <= node.get("CPU", 0) for node in nodes):
            largest = max(nodes, key=lambda node: (node.get("GPU", 0), node.get("CPU", 0)), default={})
            raise ConfigError(f"each training run asks for {gpus_per_run:g} GPUs (executor.gpus_per_run) and {threads} CPUs "
                              f"(its torch threads), but no node of this Ray cluster has them (the largest: "
                              f"{largest.get('GPU', 0):g} GPUs, {largest.get('CPU', 0):g} CPUs): the runs would wait "
                              "forever. Lower executor.gpus_per_run or train.num_threads, or start a node that has them "
                              "(an autoscaling cluster: start one before the search)")
        self.task = ray.remote(num_cpus=threads, num_gpus=gpus_per_run, max_retries=ATTEMPTS - 1,
                               retry_exceptions=True, max_calls=1 if gpus_per_run else 0)(_ray_call)

    def share(self, value):
        return self.ray.put(value)

    def map(self, function, calls, shared=None):
        ray = self.ray
        waiting, running = list(range(len(calls))), {}
        try:
            while waiting or running:
                while waiting and len(running) < self.workers:
                    index = waiting.pop(0)
                    running[self.task.remote(function, shared, calls[index], self.threads, self.gpus_per_run)] = index
                (done,), _ = ray.wait(list(running), num_returns=1)
                index = running.pop(done)
                try:
                    result = ray.get(done)
                except ray.exceptions.RayError as error:  # raised twice (retried once by Ray), or its worker died twice
                    cause = getattr(error, "cause", None)
                    failure = cause if isinstance(cause, BaseException) else _describe(error).splitlines()[0]
                    result = _failed(function, calls[index], failure, retrying=False)
                yield index, result
        finally:
            for task in running:  # the caller stopped early: free the workers and GPU shares
                ray.cancel(task, force=True)


def _start_local_ray(ray, num_cpus: int, gpu_indices: list[int] | None) -> None:
    """``ray.init`` on this machine; on ``gpu_indices`` alone where given (Ray hands its tasks the GPUs
    CUDA_VISIBLE_DEVICES names when it starts; this process's own setting is put back)."""
    if gpu_indices is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
        return
    ids, before = gpus.physical_ids(gpu_indices), os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    try:
        ray.init(num_cpus=num_cpus, num_gpus=len(ids), include_dashboard=False)
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
