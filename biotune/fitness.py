"""Fitness of a genome (docs/algorithm.md §3), recorded in the run store as it finishes.

Every call gets the next sequence number of the run. When a run is resumed, the search replays
from its last checkpoint with the same random states, so it asks for the same genomes in the same
order: an evaluation already in the store under that number is returned without training.

Two levers live here, beside the trainer: the frozen-prefix activation cache (exact,
``prefix_cache.py``) and, with ``ga.prune``, early abandoning of runs that trail the fold's
earlier runs (approximate, ``Pruner``).
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict

import optuna

from .config import Config, GAConfig
from .data import Fold
from .genome import decode
from .prefix_cache import NOT_APPLICABLE, PrefixCache
from .store import RunStore
from .train import TrainResult, train

log = logging.getLogger(__name__)

WORST = {"acc": 1.0, "acc+std": 1.0, "loss": 10.0}


class ReplayMismatchError(ValueError):
    """A resumed run asked for a different genome than the one stored under the same number."""


class Pruner:
    """``ga.prune``: optuna's PercentilePruner over the training runs of each fold.

    One study per fold; each training run (a genome and a seed) is a trial whose intermediate
    value at epoch e is its best validation macro accuracy up to e. After ``prune_warmup``
    finished runs on the fold, a run below the ``prune_percentile``-th percentile of them at the
    same epoch stops (optuna's percentile is 100 minus ours: it names the top share kept). A
    resumed run feeds the stored runs' histories back in the order they were made, so it prunes
    what the uninterrupted run pruned.
    """

    def __init__(self, config: GAConfig):
        self.config = config
        self.studies: dict[int, optuna.Study] = {}

    def _study(self, fold: int) -> optuna.Study:
        if fold not in self.studies:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            pruner = optuna.pruners.PercentilePruner(100 - self.config.prune_percentile,
                                                     n_startup_trials=self.config.prune_warmup)
            self.studies[fold] = optuna.create_study(direction="maximize", pruner=pruner)
        return self.studies[fold]

    def run(self, fold: int, train_run) -> TrainResult:
        """``train_run(stop_early)`` with a trial of the fold's study behind ``stop_early``."""
        trial, reported = self._study(fold).ask(), set()

        def stop_early(epoch: int, best: float) -> bool:
            trial.report(best, epoch)
            reported.add(epoch)
            return trial.should_prune()

        result = train_run(stop_early)
        progress = _best_so_far([h["val_macro_acc"] for h in result.history])
        for epoch in progress.keys() - reported:  # epochs after the last check: the same record as a replay
            trial.report(progress[epoch], epoch)
        state, value = _trial_outcome(result.status, progress)
        self._study(fold).tell(trial, value, state=state)
        return result

    def replay(self, fold: int, per_seed: list[dict]) -> None:
        for record in per_seed:
            progress = _best_so_far(record.get("history", []))
            state, value = _trial_outcome(record["status"], progress)
            if state != optuna.trial.TrialState.FAIL:
                self._study(fold).add_trial(optuna.trial.create_trial(state=state, value=value,
                                                                      intermediate_values=progress))


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


class Evaluator:
    """Scores genomes on folds for one run: decode, train once per seed, aggregate, cache, store."""

    def __init__(self, *, model, dataset, folds: list[Fold], config: Config, store: RunStore, run_id: str,
                 progress: bool = True):
        self.model, self.dataset, self.folds = model, dataset, folds
        self.config, self.store, self.run_id = config, store, run_id
        self.block_names = [b.name for b in model.blocks]
        self.progress = progress
        self.seq = 0
        self.use_cache = config.ga.cache and config.ga.ga_variant == "improved"
        self.prefixes = PrefixCache(model, dataset, folds, config.train)
        self.pruner = Pruner(config.ga) if config.ga.prune else None
        self.train_key = json.dumps([asdict(config.train), asdict(config.data), asdict(config.model)],
                                    sort_keys=True, default=str)

    def replay_pruning(self) -> None:
        """Feed the pruner the stored runs before ``seq``: a search restored from a checkpoint does
        not ask for them again, yet an uninterrupted search's pruner saw them."""
        if self.pruner is None or self.seq == 0:
            return
        for stored in self.store.evaluations(self.run_id).itertuples():
            if stored.seq < self.seq and stored.train_runs:
                self.pruner.replay(stored.fold, stored.per_seed)

    @property
    def worst(self) -> float:
        return WORST[self.config.ga.fitness]

    def __call__(self, genes, *, fold: int, generation: int, individual: int, role: str) -> float:
        seq, self.seq = self.seq, self.seq + 1
        genes = [float(g) for g in genes]
        stored = self.store.evaluation(self.run_id, seq)
        if stored is not None:
            if stored["genes"] != genes or stored["fold"] != fold:
                raise ReplayMismatchError(
                    f"run {self.run_id}: evaluation {seq} was stored for another genome or fold; the run's "
                    "config or code changed since it started, so it cannot be resumed exactly"
                )
            if self.pruner is not None and stored["train_runs"]:
                self.pruner.replay(fold, stored["per_seed"])
            return stored["fitness"]

        started = time.perf_counter()
        plan = decode(genes, self.block_names, self.config.ga.encoding)
        outcome, cache_hit, new_cache_entry, prefix = None, False, None, NOT_APPLICABLE
        if plan.is_empty:
            outcome = {"status": "no_trained_block", "fitness": self.worst, "per_seed": [], "train_runs": 0}
        else:
            key = json.dumps([fold, self.config.train.seeds, self.train_key, plan.key()])
            if self.use_cache:
                outcome = self.store.cached(self.run_id, key)
                cache_hit = outcome is not None
            if outcome is None:
                outcome, prefix = self._train(plan, fold)
                new_cache_entry = (key, outcome) if self.use_cache else None
        self.store.add_evaluation(self.run_id, {
            "seq": seq, "generation": generation, "individual": individual, "role": role, "fold": fold,
            "genes": genes, "trained": plan.trained_mask(), "multipliers": plan.multipliers,
            "status": outcome["status"], "fitness": outcome["fitness"],
            "val_macro_acc": outcome.get("val_macro_acc"), "val_top1": outcome.get("val_top1"),
            "val_loss": outcome.get("val_loss"), "per_seed": outcome["per_seed"],
            "train_runs": 0 if cache_hit else outcome["train_runs"], "cache_hit": int(cache_hit),
            "prefix_cache": prefix,
            "seconds": time.perf_counter() - started,
        }, cached=new_cache_entry)
        return outcome["fitness"]

    def _train(self, plan, fold: int) -> tuple[dict, str]:
        """Train once per seed; return the outcome and whether the prefix cache hit."""
        prefix, prefix_status = self.prefixes.get(plan, fold)
        per_seed = []
        for seed in self.config.train.seeds:
            def train_run(stop_early=None, seed=seed):
                return train(self.model, self.dataset, plan, self.config.train, seed, prefix=prefix,
                             train_idx=self.folds[fold].train_idx, val_idx=self.folds[fold].val_idx,
                             stop_early=stop_early, progress=self.progress)

            result = train_run() if self.pruner is None else self.pruner.run(fold, train_run)
            per_seed.append({"seed": seed, "status": result.status, "best_epoch": result.best_epoch,
                             "epochs": result.epochs, "seconds": result.seconds,
                             "train_images": result.train_images, **result.val,
                             "history": [h["val_macro_acc"] for h in result.history]})
        outcome = {"per_seed": per_seed, "train_runs": len(per_seed)}
        if any(r["status"] == "diverged" for r in per_seed):
            return {**outcome, "status": "diverged", "fitness": self.worst}, prefix_status
        psi = [r["macro_acc"] for r in per_seed]
        spread = statistics.pstdev(psi) if len(psi) > 1 else 0.0
        means = {k: statistics.fmean(r[k] for r in per_seed) for k in ("macro_acc", "top1", "loss")}
        fitness = {"acc": 1 - means["macro_acc"], "acc+std": 1 - means["macro_acc"] + spread,
                   "loss": means["loss"]}[self.config.ga.fitness]
        if not math.isfinite(fitness):
            return {**outcome, "status": "diverged", "fitness": self.worst}, prefix_status
        status = "pruned" if any(r["status"] == "pruned" for r in per_seed) else "ok"
        return {**outcome, "status": status, "fitness": fitness, "val_macro_acc": means["macro_acc"],
                "val_top1": means["top1"], "val_loss": means["loss"]}, prefix_status
