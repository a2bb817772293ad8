"""Random search, TPE and CMA-ES over BioTune's genome, at BioTune's budget (docs/methods.md).

Each differs from BioTune in how it proposes genomes and nothing else: the same genome,
evaluator, folds (trial k on the fold of BioTune's evaluation k), batches and number of
evaluations (``ga.evaluation_batches``). There is no checkpoint: a resumed search replays from
its first evaluation with freshly seeded proposers, and the evaluator answers every stored one,
so each proposer sees the same history and proposes what an uninterrupted run would.
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import random

import optuna
from tqdm.auto import tqdm

from . import ga
from .config import CHOICES, ConfigError, GAConfig

log = logging.getLogger(__name__)

SEARCHERS = tuple(name for name in CHOICES["ga.searcher"] if name != "biotune")  # the baselines here


class RandomGenomes:
    """Uniform genomes that train at least one block, as BioTune's initial population."""

    def __init__(self, *, num_genes: int, num_blocks: int, config: GAConfig):
        self.num_genes, self.num_blocks, self.encoding = num_genes, num_blocks, config.encoding
        self.rng = random.Random(config.seed)

    def ask(self, count: int) -> list[list[float]]:
        return [ga.random_genome(self.num_genes, self.num_blocks, self.encoding, self.rng) for _ in range(count)]

    def tell(self, fitness: list[float]) -> None:
        """Random search learns nothing from a fitness."""


class OptunaGenomes:
    """An optuna study driven by ask/tell: one trial per evaluation, gene i as ``g{i}`` in [0, 1]."""

    def __init__(self, sampler: optuna.samplers.BaseSampler, *, num_genes: int):
        self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.num_genes = num_genes
        self.trials: list[optuna.Trial] = []

    def ask(self, count: int) -> list[list[float]]:
        """A batch of trials, all asked before any is told (the sampler sees them running)."""
        self.trials = [self.study.ask() for _ in range(count)]
        return [[trial.suggest_float(f"g{i}", 0.0, 1.0) for i in range(self.num_genes)] for trial in self.trials]

    def tell(self, fitness: list[float]) -> None:
        for trial, value in zip(self.trials, fitness):
            self.study.tell(trial, value)


def proposer(name: str, *, num_genes: int, num_blocks: int, config: GAConfig):
    """The genome proposer of a searcher, seeded from ``config.seed``."""
    if name == "random":
        return RandomGenomes(num_genes=num_genes, num_blocks=num_blocks, config=config)
    if name == "tpe":
        return OptunaGenomes(optuna.samplers.TPESampler(seed=config.seed), num_genes=num_genes)
    if name == "cmaes":
        if importlib.util.find_spec("cmaes") is None:  # optuna imports it only at the second trial
            raise ConfigError("ga.searcher=cmaes needs the cmaes package: pip install cmaes")
        return OptunaGenomes(optuna.samplers.CmaEsSampler(seed=config.seed), num_genes=num_genes)
    raise ConfigError(f"unknown searcher {name!r}; choose one of: {', '.join(SEARCHERS)}")


class Searcher:
    """A baseline search over BioTune's genome; ``run()`` returns a ``ga.GAResult`` like BioTuneGA's.

    Takes BioTuneGA's arguments (less the checkpoint: a resumed run replays, see the module
    docstring) and the searcher's name.
    """

    def __init__(self, name: str, evaluate: ga.Evaluate, *, num_blocks: int, num_genes: int,
                 config: GAConfig, n_folds: int, progress: bool = True):
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial
        self.name, self.evaluate, self.progress = name, evaluate, progress
        self.genomes = proposer(name, num_genes=num_genes, num_blocks=num_blocks, config=config)
        self.batches = ga.evaluation_batches(config, n_folds)

    def restore(self) -> int:
        """Where a resumed search starts: its first evaluation, each finished one read from the store."""
        return 0

    def run(self) -> ga.GAResult:
        budget = sum(size for _, _, size in self.batches)
        log.info("%s search: %d evaluations, BioTune's budget for this config", self.name, budget)
        records, everyone = [], []
        with tqdm(total=budget, desc=f"{self.name} evaluations", disable=not self.progress) as bar:
            for generation, batches in itertools.groupby(self.batches, key=lambda batch: batch[0]):
                population = []
                for _, fold, size in batches:
                    genomes = self.genomes.ask(size)
                    fitness = ga.score_many(self.evaluate, [
                        {"genes": genes, "fold": fold, "generation": generation, "individual": len(population) + i,
                         "role": "trial"} for i, genes in enumerate(genomes)])
                    self.genomes.tell(fitness)
                    population += [ga.make_individual(genes, value, fold=fold) for genes, value in zip(genomes, fitness)]
                    bar.update(size)
                everyone += population
                records.append(_record(generation, fold, population, everyone))
                bar.set_postfix(best=f"{records[-1]['best_so_far']:.4f}")
        best = min(everyone, key=ga.fitness_of)
        return ga.GAResult(best_genes=list(best), best_fitness=ga.fitness_of(best), logbook=records,
                           evaluations=len(everyone))


def _record(generation: int, fold: int, population: list, everyone: list) -> dict:
    """BioTuneGA's logbook record, for the trials standing in for one of its generations."""
    return {"generation": generation, "fold": fold, "evaluations": len(everyone),
            "best_so_far": min(ga.fitness_of(t) for t in everyone), "diversity": ga.gene_diversity(population),
            **ga.fitness_statistics().compile(population)}
