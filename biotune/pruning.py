"""``ga.prune``: early abandoning of fitness runs that trail the fold's earlier runs (approximate).

optuna's PercentilePruner over the training runs of each fold. Each training run (a genome and a
seed) is a trial whose intermediate value at epoch e is its best validation macro accuracy up to
e. After ``prune_warmup`` finished runs on the fold, a run below the ``prune_percentile``-th
percentile of them at the same epoch stops (optuna's percentile is 100 minus ours: it names the
top share kept).

A run is compared with the runs that finished before its batch of evaluations started (a
snapshot), never with runs of its own batch, so the decisions do not depend on whether the
batch's runs go one after another or at once. Runs are added in the order they were made, from a
live search or from the store on resume alike, so a resumed search prunes what the
uninterrupted one pruned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

from .config import GAConfig


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
    """The finished runs of each fold, as optuna trials, in the order they were made."""

    def __init__(self, config: GAConfig):
        self.config = config
        self.trials: dict[int, list] = {}

    def snapshot(self, fold: int) -> PruneSnapshot:
        return PruneSnapshot(tuple(self.trials.get(fold, ())), self.config.prune_percentile,
                             self.config.prune_warmup)

    def snapshots(self, folds) -> dict[int, PruneSnapshot]:
        return {fold: self.snapshot(fold) for fold in folds}

    def add_in_order(self, runs: list[tuple[int, int, list[dict]]]) -> None:
        """``(seq, fold, per-seed records)`` of evaluations, stored or trained, added by ``seq``:
        in the order they were made, whichever executor ran them."""
        for _, fold, per_seed in sorted(runs, key=lambda run: run[0]):
            self.add(fold, per_seed)

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
