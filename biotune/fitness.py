"""Fitness of a genome (docs/algorithm.md §3), recorded in the run store as it finishes.

Every evaluation gets the next sequence number of the run. When a run is resumed, the search
replays from its last checkpoint with the same random states, so it asks for the same genomes in
the same order: an evaluation already in the store under that number is returned without
training. The training runs themselves go through the run's executor (``executors.py``), which
may run a batch of them at once in other processes; this module, in the driver, is the only
writer of the store.

Two levers live here, beside the trainer: the frozen-prefix activation cache (exact,
``prefix_cache.py``) and, with ``ga.prune``, early abandoning of runs that trail the fold's
earlier runs (approximate, ``Pruner``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field

import optuna
import torch

from .config import Config, GAConfig, TrainConfig
from .data import Fold
from .executors import (
    Executor,
    OutOfGPUMemoryError,
    SerialExecutor,
    TaskFailure,
    TrainingFailedError,
)
from .genome import decode
from .prefix_cache import HIT, MISS, NOT_APPLICABLE, PrefixCache
from .store import RunStore
from .train import resolve_device, train

log = logging.getLogger(__name__)

WORST = {"acc": 1.0, "acc+std": 1.0, "loss": 10.0}


MAX_FAILED_IN_A_ROW = 3


class ReplayMismatchError(ValueError):
    """A resumed run asked for a different genome than the one stored under the same number."""


@dataclass(frozen=True)
class PruneSnapshot:
    """The runs of a fold that finished before a batch of evaluations started: what every run of
    the batch is compared with, in whichever process it trains (plain data, sent to workers)."""

    trials: tuple  # optuna FrozenTrials, in the order the runs were made
    percentile: float
    warmup: int

    def stop_early(self):
        """A ``stop_early(epoch, best)`` for the trainer, backed by a study holding the snapshot."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        pruner = optuna.pruners.PercentilePruner(100 - self.percentile, n_startup_trials=self.warmup)
        study = optuna.create_study(direction="maximize", pruner=pruner)
        study.add_trials(self.trials)
        trial = study.ask()

        def stop(epoch: int, best: float) -> bool:
            trial.report(best, epoch)
            return trial.should_prune()

        return stop


class Pruner:
    """``ga.prune``: optuna's PercentilePruner over the training runs of each fold.

    Each training run (a genome and a seed) is a trial whose intermediate value at epoch e is its
    best validation macro accuracy up to e. After ``prune_warmup`` finished runs on the fold, a
    run below the ``prune_percentile``-th percentile of them at the same epoch stops (optuna's
    percentile is 100 minus ours: it names the top share kept). A run is compared with the runs
    that finished before its batch of evaluations started (``snapshot``), never with runs of its
    own batch, so the decisions are the same whether the batch's runs go one after another or at
    once. Runs are added in the order they were made, from a live search or from the store on
    resume alike, so a resumed search prunes what the uninterrupted one pruned.
    """

    def __init__(self, config: GAConfig):
        self.config = config
        self.trials: dict[int, list] = {}

    def snapshot(self, fold: int) -> PruneSnapshot:
        return PruneSnapshot(tuple(self.trials.get(fold, ())), self.config.prune_percentile,
                             self.config.prune_warmup)

    def add(self, fold: int, per_seed: list[dict]) -> None:
        for record in per_seed:
            progress = _best_so_far(record.get("history", []))
            state, value = _trial_outcome(record["status"], progress)
            if state != optuna.trial.TrialState.FAIL:
                self.trials.setdefault(fold, []).append(
                    optuna.trial.create_trial(state=state, value=value, intermediate_values=progress))


def _best_so_far(history: list[float]) -> dict[int, float]:
    best, progress = -math.inf, {}
    for epoch, value in enumerate(history):
        best = max(best, value)
        progress[epoch] = best
    return progress


def _trial_outcome(status: str, progress: dict[int, float]) -> tuple:
    if status == "pruned":
        return optuna.trial.TrialState.PRUNED, None
    if status != "ok" or not progress:
        return optuna.trial.TrialState.FAIL, None
    return optuna.trial.TrialState.COMPLETE, max(progress.values())


@dataclass
class FitnessInputs:
    """What every fitness run reads: shared once per search with the executor's workers."""

    model: object
    dataset: object
    folds: list[Fold]
    train: TrainConfig
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # names these inputs in a worker
    local: bool = True  # False in a copy sent to another process
    _prefixes: PrefixCache | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "local": False, "_prefixes": None}

    def prefixes(self) -> PrefixCache:
        """This process's prefix cache for these inputs. Where the inputs were made, it lives and
        goes with them; a worker is sent a new copy with every run, so it keeps the cache of the
        latest inputs it was sent (one search at a time), by token."""
        if self.local:
            if self._prefixes is None:
                self._prefixes = PrefixCache(self.model, self.dataset, self.folds, self.train)
            return self._prefixes
        if self.token not in _worker_prefixes:
            _worker_prefixes.clear()
            _worker_prefixes[self.token] = PrefixCache(self.model, self.dataset, self.folds, self.train)
        return _worker_prefixes[self.token]


_worker_prefixes: dict[str, PrefixCache] = {}


def fitness_run(inputs: FitnessInputs, plan, fold: int, seed: int, pruning: PruneSnapshot | None,
                progress: bool = False) -> dict:
    """One training run of a fitness evaluation, in whichever process the executor picked: its
    per-seed record (plain data), with the prefix cache's status and the run's wall-clock seconds."""
    started = time.perf_counter()
    prefix, prefix_status = inputs.prefixes().get(plan, fold)
    result = train(inputs.model, inputs.dataset, plan, inputs.train, seed,
                   prefix=prefix or inputs.prefixes().fold_images(fold),
                   stop_early=pruning.stop_early() if pruning is not None else None, progress=progress)
    return {"seed": seed, "status": result.status, "best_epoch": result.best_epoch, "epochs": result.epochs,
            "seconds": result.seconds, "train_images": result.train_images, **result.val,
            "history": [h["val_macro_acc"] for h in result.history],
            "threads": torch.get_num_threads(), "worker": f"{socket.gethostname()}:{os.getpid()}",
            "prefix_cache": prefix_status, "task_seconds": time.perf_counter() - started}


@dataclass
class _Training:
    """An evaluation of a batch whose runs are out with the executor."""

    position: int  # in the batch
    seq: int
    request: dict
    genes: list[float]
    plan: object
    key: str  # evaluation-cache key
    runs: dict = field(default_factory=dict)  # seed position -> per-seed record
    followers: list[_Training] = field(default_factory=list)  # the same plan later in the batch


class Evaluator:
    """Scores genomes on folds for one run: decode, train once per seed, aggregate, cache, store.

    ``evaluate_many`` takes a batch of genomes that were all proposed before any of them is
    scored (the initial population, the elite re-scores, the exploitation trials): their
    training runs go to the executor at once, and each evaluation is stored as its last run
    finishes. Sequence numbers are given in request order, so the store holds the same numbers
    whichever executor ran, and a resume may use another one.
    """

    def __init__(self, *, model, dataset, folds: list[Fold], config: Config, store: RunStore, run_id: str,
                 progress: bool = True, executor: Executor | None = None):
        self.config, self.store, self.run_id = config, store, run_id
        self.block_names = [b.name for b in model.blocks]
        self.progress = progress
        self.seq = 0
        self.use_cache = config.ga.cache and config.ga.ga_variant == "improved"
        self.pruner = Pruner(config.ga) if config.ga.prune else None
        self.failed_in_a_row = 0
        if config.run.executor != "ray":  # a device this machine lacks fails here, not in every run
            resolve_device(config.train.device)
        self.executor = executor or SerialExecutor()
        self.inputs = self.executor.share(FitnessInputs(model, dataset, folds, config.train))
        self.train_key = json.dumps([asdict(config.train), asdict(config.data), asdict(config.model)],
                                    sort_keys=True, default=str)

    def replay_pruning(self) -> None:
        """Feed the pruner the stored runs before ``seq``: a search restored from a checkpoint does
        not ask for them again, yet an uninterrupted search's pruner saw them."""
        if self.pruner is None or self.seq == 0:
            return
        for stored in self.store.evaluations(self.run_id).itertuples():
            if stored.seq < self.seq and stored.train_runs:
                self.pruner.add(stored.fold, stored.per_seed)

    @property
    def worst(self) -> float:
        return WORST[self.config.ga.fitness]

    def __call__(self, genes, *, fold: int, generation: int, individual: int, role: str) -> float:
        return self.evaluate_many([{"genes": genes, "fold": fold, "generation": generation,
                                    "individual": individual, "role": role}])[0]

    def evaluate_many(self, requests: list[dict]) -> list[float]:
        """Fitness of each request (genes, fold, generation, individual, role), in order."""
        first, self.seq = self.seq, self.seq + len(requests)
        fitness: list[float | None] = [None] * len(requests)
        stored_runs = []  # (seq, fold, per_seed) of stored evaluations: told to the pruner after the batch
        training: dict[int, _Training] = {}  # position in the batch -> evaluation being trained
        leaders: dict[str, _Training] = {}
        for position, request in enumerate(requests):
            seq, genes = first + position, [float(g) for g in request["genes"]]
            stored = self.store.evaluation(self.run_id, seq)
            if stored is not None:
                if stored["genes"] != genes or stored["fold"] != request["fold"]:
                    raise ReplayMismatchError(
                        f"run {self.run_id}: evaluation {seq} was stored for another genome or fold; the run's "
                        "config or code changed since it started, so it cannot be resumed exactly")
                if stored["train_runs"]:
                    stored_runs.append((seq, stored["fold"], stored["per_seed"]))
                fitness[position] = stored["fitness"]
                continue
            plan = decode(genes, self.block_names, self.config.ga.encoding)
            if plan.is_empty:
                outcome = {"status": "no_trained_block", "fitness": self.worst, "per_seed": [], "train_runs": 0}
                fitness[position] = self._store(seq, request, genes, plan, outcome)
                continue
            key = json.dumps([request["fold"], self.config.train.seeds, self.train_key, plan.key()])
            cached = self.store.cached(self.run_id, key) if self.use_cache else None
            if cached is not None:
                fitness[position] = self._store(seq, request, genes, plan, cached, cache_hit=True)
            elif self.use_cache and key in leaders:  # trained by an earlier request of this batch
                leaders[key].followers.append(_Training(position, seq, request, genes, plan, key))
            else:
                training[position] = leaders[key] = _Training(position, seq, request, genes, plan, key)

        snapshots = {fold: self.pruner.snapshot(fold) for fold in {t.request["fold"] for t in training.values()}} \
            if self.pruner is not None else {}
        outcomes = {}  # seq -> outcome of the evaluations trained in this batch
        while training:
            training = self._train_batch(training, snapshots, fitness, outcomes)
        if self.pruner is not None:
            new_runs = [(seq, o["fold"], o["per_seed"]) for seq, o in outcomes.items() if o["train_runs"]]
            for _, fold, per_seed in sorted(stored_runs + new_runs, key=lambda item: item[0]):
                self.pruner.add(fold, per_seed)
        for seq in sorted(outcomes):  # in sequence order, so the stop does not depend on the executor
            self._count_failures(outcomes[seq])
        return fitness

    def _train_batch(self, training: dict, snapshots: dict, fitness: list, outcomes: dict) -> dict:
        """Send the runs of ``training`` (position -> _Training) to the executor; store each
        evaluation, and its repeats in the batch, when its last run finishes. Returns the repeats
        of plans that failed, as the next round to train: a failure is not cached, so one after
        another each repeat would have trained again."""
        calls, owners = [], []
        for position, job in training.items():
            for seed_position, seed in enumerate(self.config.train.seeds):
                calls.append((job.plan, job.request["fold"], seed, snapshots.get(job.request["fold"]),
                              self.progress and self.executor.in_process))
                owners.append((position, seed_position))
        next_round = {}
        with contextlib.closing(self.executor.map(fitness_run, calls, self.inputs)) as finished:
            for call, result in self._stop_out_of_memory(finished):
                position, seed_position = owners[call]
                job = training[position]
                job.runs[seed_position] = result if not isinstance(result, TaskFailure) else \
                    {"seed": self.config.train.seeds[seed_position], "status": "failed", "error": result.error}
                if len(job.runs) < len(self.config.train.seeds):
                    continue
                outcome, prefix, seconds = self._outcome([job.runs[i] for i in range(len(job.runs))])
                failed = outcome["status"] == "failed"  # not cached: the plan is trained again when asked again
                fitness[position] = self._store(job.seq, job.request, job.genes, job.plan, outcome, prefix=prefix,
                                                seconds=seconds,
                                                cache_key=job.key if self.use_cache and not failed else None)
                outcomes[job.seq] = {**outcome, "fold": job.request["fold"]}
                if failed and job.followers:
                    repeat = job.followers[0]  # trains next round; the later repeats follow it
                    repeat.followers = job.followers[1:]
                    next_round[repeat.position] = repeat
                    continue
                for repeat in job.followers:
                    fitness[repeat.position] = self._store(repeat.seq, repeat.request, repeat.genes, repeat.plan,
                                                           outcome, cache_hit=True)
        return next_round

    def _stop_out_of_memory(self, finished):
        """The executor's results. A run out of GPU memory twice stops the search (executors.py):
        its evaluation is not stored, so no fitness is steered by memory; the message names the run."""
        try:
            yield from finished
        except OutOfGPUMemoryError as error:
            raise OutOfGPUMemoryError(f"run {self.run_id}: {error} (this search: biotune search --resume "
                                      f"{self.run_id})") from None

    def _count_failures(self, outcome: dict) -> None:
        """Stop the search when ``MAX_FAILED_IN_A_ROW`` evaluations in a row failed (each run
        raised twice): an error that comes back every time (a bug, host memory that never
        suffices, a worker that cannot import the code) would otherwise fill a whole search with
        worst fitnesses. An isolated failure is recorded and the search goes on. (Running out of
        GPU memory never gets here: it stops the search at once, ``_stop_out_of_memory``.)"""
        self.failed_in_a_row = self.failed_in_a_row + 1 if outcome["status"] == "failed" else 0
        if self.failed_in_a_row >= MAX_FAILED_IN_A_ROW:
            error = next(r["error"] for r in outcome["per_seed"] if r["status"] == "failed")
            raise TrainingFailedError(
                f"run {self.run_id}: {self.failed_in_a_row} evaluations in a row failed, each training run twice; "
                f"the last error: {error}. The search stops here, its finished evaluations kept; fix the cause, "
                f"then resume it (biotune search --resume {self.run_id}): the failed evaluations at its end are "
                "trained again")

    def _store(self, seq: int, request: dict, genes: list[float], plan, outcome: dict, *, cache_hit: bool = False,
               prefix: str = NOT_APPLICABLE, seconds: float = 0.0, cache_key: str | None = None) -> float:
        """Commit one evaluation (and its cache entry, in the same transaction); return its fitness."""
        self.store.add_evaluation(self.run_id, {
            "seq": seq, "generation": request["generation"], "individual": request["individual"],
            "role": request["role"], "fold": request["fold"],
            "genes": genes, "trained": plan.trained_mask(), "multipliers": plan.multipliers,
            "status": outcome["status"], "fitness": outcome["fitness"],
            "val_macro_acc": outcome.get("val_macro_acc"), "val_top1": outcome.get("val_top1"),
            "val_loss": outcome.get("val_loss"), "per_seed": outcome["per_seed"],
            "train_runs": 0 if cache_hit else outcome["train_runs"], "cache_hit": int(cache_hit),
            "prefix_cache": prefix, "seconds": seconds,
        }, cached=(cache_key, outcome) if cache_key is not None else None)
        return outcome["fitness"]

    def _outcome(self, per_seed: list[dict]) -> tuple[dict, str, float]:
        """Aggregate an evaluation's runs (docs/algorithm.md §3); also the prefix cache's status
        (a miss if any run computed the prefix) and the runs' seconds."""
        prefixes = {r.pop("prefix_cache", NOT_APPLICABLE) for r in per_seed}
        prefix = MISS if MISS in prefixes else HIT if HIT in prefixes else NOT_APPLICABLE
        seconds = sum(r.pop("task_seconds", 0.0) for r in per_seed)
        outcome = {"per_seed": per_seed, "train_runs": len(per_seed)}
        if any(r["status"] in ("diverged", "failed") for r in per_seed):
            status = "failed" if any(r["status"] == "failed" for r in per_seed) else "diverged"
            return {**outcome, "status": status, "fitness": self.worst}, prefix, seconds
        psi = [r["macro_acc"] for r in per_seed]
        spread = statistics.pstdev(psi) if len(psi) > 1 else 0.0
        means = {k: statistics.fmean(r[k] for r in per_seed) for k in ("macro_acc", "top1", "loss")}
        fitness = {"acc": 1 - means["macro_acc"], "acc+std": 1 - means["macro_acc"] + spread,
                   "loss": means["loss"]}[self.config.ga.fitness]
        if not math.isfinite(fitness):
            return {**outcome, "status": "diverged", "fitness": self.worst}, prefix, seconds
        status = "pruned" if any(r["status"] == "pruned" for r in per_seed) else "ok"
        return {**outcome, "status": status, "fitness": fitness, "val_macro_acc": means["macro_acc"],
                "val_top1": means["top1"], "val_loss": means["loss"]}, prefix, seconds
