"""Fitness of a genome (biotune.md §3), recorded in the run store as it finishes.

Every call gets the next sequence number of the run. When a run is resumed, the search replays
from its last checkpoint with the same random states, so it asks for the same genomes in the same
order: an evaluation already in the store under that number is returned without training.
"""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import asdict

from .config import Config
from .data import Fold
from .genome import decode
from .store import RunStore
from .train import train

log = logging.getLogger(__name__)

WORST = {"acc": 1.0, "acc+std": 1.0, "loss": 10.0}


class ReplayMismatchError(ValueError):
    """A resumed run asked for a different genome than the one stored under the same number."""


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
        self.train_key = json.dumps([asdict(config.train), asdict(config.data), asdict(config.model)],
                                    sort_keys=True, default=str)

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
            return stored["fitness"]

        started = time.perf_counter()
        plan = decode(genes, self.block_names, self.config.ga.encoding)
        outcome, cache_hit, new_cache_entry = None, False, None
        if plan.is_empty:
            outcome = {"status": "no_trained_block", "fitness": self.worst, "per_seed": [], "train_runs": 0}
        else:
            key = json.dumps([fold, self.config.train.seeds, self.train_key, plan.key()])
            if self.use_cache:
                outcome = self.store.cached(self.run_id, key)
                cache_hit = outcome is not None
            if outcome is None:
                outcome = self._train(plan, self.folds[fold])
                new_cache_entry = (key, outcome) if self.use_cache else None
        self.store.add_evaluation(self.run_id, {
            "seq": seq, "generation": generation, "individual": individual, "role": role, "fold": fold,
            "genes": genes, "trained": plan.trained_mask(), "multipliers": plan.multipliers,
            "status": outcome["status"], "fitness": outcome["fitness"],
            "val_macro_acc": outcome.get("val_macro_acc"), "val_top1": outcome.get("val_top1"),
            "val_loss": outcome.get("val_loss"), "per_seed": outcome["per_seed"],
            "train_runs": 0 if cache_hit else outcome["train_runs"], "cache_hit": int(cache_hit),
            "seconds": time.perf_counter() - started,
        }, cached=new_cache_entry)
        return outcome["fitness"]

    def _train(self, plan, fold: Fold) -> dict:
        per_seed = []
        for seed in self.config.train.seeds:
            result = train(self.model, self.dataset, plan, self.config.train, seed,
                           train_idx=fold.train_idx, val_idx=fold.val_idx, progress=self.progress)
            per_seed.append({"seed": seed, "status": result.status, "best_epoch": result.best_epoch,
                             "epochs": result.epochs, "seconds": result.seconds,
                             "train_images": result.train_images, **result.val})
        outcome = {"per_seed": per_seed, "train_runs": len(per_seed)}
        if any(r["status"] != "ok" for r in per_seed):
            return {**outcome, "status": "diverged", "fitness": self.worst}
        psi = [r["macro_acc"] for r in per_seed]
        spread = statistics.pstdev(psi) if len(psi) > 1 else 0.0
        means = {k: statistics.fmean(r[k] for r in per_seed) for k in ("macro_acc", "top1", "loss")}
        fitness = {"acc": 1 - means["macro_acc"], "acc+std": 1 - means["macro_acc"] + spread,
                   "loss": means["loss"]}[self.config.ga.fitness]
        if not math.isfinite(fitness):
            return {**outcome, "status": "diverged", "fitness": self.worst}
        return {**outcome, "status": "ok", "fitness": fitness, "val_macro_acc": means["macro_acc"],
                "val_top1": means["top1"], "val_loss": means["loss"]}
