"""Fitness of a genome (docs/algorithm.md §3), recorded in the run store as it finishes.

Every evaluation gets the next sequence number of the run. When a run is resumed, the search
replays from its last checkpoint with the same random states, so it asks for the same genomes in
the same order: an evaluation already in the store under that number is returned without
training. The training runs themselves go through the run's executor (``executors.py``), which
may run a batch of them at once in other processes; this module, in the driver, is the only
writer of the store.

Two levers reach the runs from here: the frozen-prefix activation cache (exact,
``prefix_cache.py``) and, with ``ga.prune``, early abandoning of runs that trail the fold's
earlier runs (approximate, ``pruning.py``).
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

import torch

from .config import Config, TrainConfig
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
from .pruning import Pruner, PruneSnapshot
from .store import RunStore
from .train import resolve_device, train

log = logging.getLogger(__name__)

WORST = {"acc": 1.0, "acc+std": 1.0, "loss": 10.0}


MAX_FAILED_IN_A_ROW = 3


class ReplayMismatchError(ValueError):
    """A resumed run asked for a different genome than the one stored under the same number."""


@dataclass
class FitnessInputs:
    """What every fitness run reads: shared once per search with the executor's workers."""

    model: object
    dataset: object
    folds: list[Fold]
    train: TrainConfig
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # a worker keeps these inputs by it (executors.py)
    _prefixes: PrefixCache | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_prefixes": None}  # activations never travel: each process builds its own

    def prefixes(self) -> PrefixCache:
        """The prefix cache of these inputs in this process, built on first use."""
        if self._prefixes is None:
            self._prefixes = PrefixCache(self.model, self.dataset, self.folds, self.train)
        return self._prefixes


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


# What becomes of a requested evaluation, decided before anything trains.
STORED, EMPTY, CACHED, REPEAT, TRAIN = "stored", "empty", "cached", "repeat", "train"


@dataclass
class Requested:
    """One evaluation of a batch: where it stands, and its runs once they are out with the executor."""

    position: int  # in the batch
    seq: int
    request: dict
    genes: list[float]
    kind: str = TRAIN
    plan: object = None
    key: str = ""  # evaluation-cache key
    known: dict | None = None  # the stored evaluation (STORED) or cached outcome (CACHED)
    runs: dict = field(default_factory=dict)  # seed position -> per-seed record
    followers: list[Requested] = field(default_factory=list)  # the same plan later in the batch


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
        if config.executor.kind != "ray":  # a device this machine lacks fails here, not in every run
            resolve_device(config.train.device)
        self.executor = executor or SerialExecutor()
        self.inputs = self.executor.share(FitnessInputs(model, dataset, folds, config.train))
        self.train_key = json.dumps([asdict(config.train), asdict(config.data), asdict(config.model)],
                                    sort_keys=True, default=str)

    def start_at(self, seq: int) -> None:
        """Resume after the first ``seq`` evaluations: a search restored from its checkpoint does
        not ask for them again, so the pruner is told their stored runs here, as the
        uninterrupted search's pruner saw them."""
        self.seq = seq
        if self.pruner is not None and seq > 0:
            self.pruner.add_in_order([(stored.seq, stored.fold, stored.per_seed)
                                      for stored in self.store.evaluations(self.run_id).itertuples()
                                      if stored.seq < seq and stored.train_runs])

    @property
    def worst(self) -> float:
        return WORST[self.config.ga.fitness]

    def __call__(self, genes, *, fold: int, generation: int, individual: int, role: str) -> float:
        return self.evaluate_many([{"genes": genes, "fold": fold, "generation": generation,
                                    "individual": individual, "role": role}])[0]

    def evaluate_many(self, requests: list[dict]) -> list[float]:
        """Fitness of each request (genes, fold, generation, individual, role), in order: each is
        classified first (stored, empty plan, cached, a repeat in this batch, to train), then the
        ones to train go to the executor at once."""
        first, self.seq = self.seq, self.seq + len(requests)
        batch = self._classify(first, requests)
        fitness = [self._answer_untrained(item) for item in batch]
        training = {item.position: item for item in batch if item.kind == TRAIN}
        snapshots = self.pruner.snapshots({item.request["fold"] for item in training.values()}) if self.pruner else {}
        outcomes = {}  # seq -> outcome of the evaluations trained in this batch
        while training:
            training = self._train_batch(training, snapshots, fitness, outcomes)
        if self.pruner is not None:
            self.pruner.add_in_order([(item.seq, item.known["fold"], item.known["per_seed"]) for item in batch
                                      if item.kind == STORED and item.known["train_runs"]]
                                     + [(seq, o["fold"], o["per_seed"]) for seq, o in outcomes.items() if o["train_runs"]])
        for seq in sorted(outcomes):  # in sequence order, so the stop does not depend on the executor
            self._count_failures(outcomes[seq])
        return fitness

    def _classify(self, first: int, requests: list[dict]) -> list[Requested]:
        """What becomes of each request; a plan asked twice in a batch trains once (the leader)."""
        batch, leaders = [], {}
        for position, request in enumerate(requests):
            item = Requested(position, first + position, request, [float(g) for g in request["genes"]])
            item.known = self._stored(item)
            if item.known is not None:
                item.kind = STORED
            else:
                self._classify_new(item, leaders)
            batch.append(item)
        return batch

    def _stored(self, item: Requested) -> dict | None:
        """The evaluation the store holds under this number (a resumed run replays it)."""
        stored = self.store.evaluation(self.run_id, item.seq)
        if stored is not None and (stored["genes"] != item.genes or stored["fold"] != item.request["fold"]):
            raise ReplayMismatchError(
                f"run {self.run_id}: evaluation {item.seq} was stored for another genome or fold; the run's "
                "config or code changed since it started, so it cannot be resumed exactly")
        return stored

    def _classify_new(self, item: Requested, leaders: dict[str, Requested]) -> None:
        item.plan = decode(item.genes, self.block_names, self.config.ga.encoding)
        if item.plan.is_empty:
            item.kind = EMPTY
            return
        item.key = json.dumps([item.request["fold"], self.config.train.seeds, self.train_key, item.plan.key()])
        item.known = self.store.cached(self.run_id, item.key) if self.use_cache else None
        if item.known is not None:
            item.kind = CACHED
        elif self.use_cache and item.key in leaders:
            item.kind = REPEAT
            leaders[item.key].followers.append(item)
        else:
            leaders[item.key] = item

    def _answer_untrained(self, item: Requested) -> float | None:
        """The fitness of an evaluation that trains nothing, stored as it is answered; None for the others."""
        if item.kind == STORED:
            return item.known["fitness"]
        if item.kind == EMPTY:
            return self._store(item, {"status": "no_trained_block", "fitness": self.worst, "per_seed": [],
                                      "train_runs": 0})
        if item.kind == CACHED:
            return self._store(item, item.known, cache_hit=True)
        return None

    def _train_batch(self, training: dict[int, Requested], snapshots: dict, fitness: list, outcomes: dict) -> dict:
        """Send the runs of ``training`` to the executor; store each evaluation, and its repeats in
        the batch, when its last run finishes. Returns the repeats of plans that failed, as the
        next round: a failure is not cached, so each repeat would have trained again."""
        calls, owners = [], []
        for position, item in training.items():
            for seed_position, seed in enumerate(self.config.train.seeds):
                calls.append((item.plan, item.request["fold"], seed, snapshots.get(item.request["fold"]),
                              self.progress and self.executor.in_process))
                owners.append((position, seed_position))
        next_round = {}
        with contextlib.closing(self.executor.map(fitness_run, calls, self.inputs)) as finished:
            for call, result in self._stop_out_of_memory(finished):
                position, seed_position = owners[call]
                item = training[position]
                item.runs[seed_position] = result if not isinstance(result, TaskFailure) else \
                    {"seed": self.config.train.seeds[seed_position], "status": "failed", "error": result.error}
                if len(item.runs) == len(self.config.train.seeds):
                    next_round.update(self._finish(item, fitness, outcomes))
        return next_round

    def _finish(self, item: Requested, fitness: list, outcomes: dict) -> dict[int, Requested]:
        """Store an evaluation whose runs all finished, and its repeats with it; a failed plan's
        first repeat trains next round instead (the later repeats follow it)."""
        outcome, prefix, seconds = self._outcome([item.runs[i] for i in range(len(item.runs))])
        failed = outcome["status"] == "failed"  # not cached: the plan is trained again when asked again
        fitness[item.position] = self._store(item, outcome, prefix=prefix, seconds=seconds,
                                             cache_key=item.key if self.use_cache and not failed else None)
        outcomes[item.seq] = {**outcome, "fold": item.request["fold"]}
        if failed and item.followers:
            repeat = item.followers[0]
            repeat.followers, repeat.kind = item.followers[1:], TRAIN
            return {repeat.position: repeat}
        for repeat in item.followers:
            fitness[repeat.position] = self._store(repeat, outcome, cache_hit=True)
        return {}

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

    def _store(self, item: Requested, outcome: dict, *, cache_hit: bool = False, prefix: str = NOT_APPLICABLE,
               seconds: float = 0.0, cache_key: str | None = None) -> float:
        """Commit one evaluation (and its cache entry, in the same transaction); return its fitness."""
        seq, request, genes, plan = item.seq, item.request, item.genes, item.plan
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
