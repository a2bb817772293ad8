"""BioTune's evolutionary loop on DEAP (docs/algorithm.md §5 and §6).

DEAP supplies the individuals, fitness, statistics, logbook and hall of fame; BioTune's own
operators (rank selection over a shrinking mating pool, blend crossover, extinction-driven
mutation, adoption, momentum, elite exploitation) are small functions below, each testable on
its own. All GA randomness comes from one ``random.Random`` whose state goes into the checkpoint
written after initialisation and after every generation, so a resumed run draws what an
uninterrupted one would.
"""
from __future__ import annotations

import json
import logging
import os
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deap import base, creator, tools
from tqdm.auto import tqdm

from .config import GAConfig
from .genome import trained_blocks

log = logging.getLogger(__name__)

if not hasattr(creator, "BioTuneFitness"):
    creator.create("BioTuneFitness", base.Fitness, weights=(-1.0,))
if not hasattr(creator, "BioTuneIndividual"):
    # extinction: probability driving mutation; momentum: per-gene velocity; fold: where fitness was measured
    creator.create("BioTuneIndividual", list, fitness=creator.BioTuneFitness, extinction=float,
                   momentum=list, fold=int)

Evaluate = Callable[..., float]  # evaluate(genes, *, fold, generation, individual, role) -> fitness


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back."""


# ---------------------------------------------------------------------------------------------
# Operators


def rank_weights(n: int) -> list[int]:
    """How many of the n(n+3)/2 equally likely draws each rank owns (rank 0 = best).

    Rank 0 owns n+2 values, rank k then the next n-k+1, the last rank what is left:
    n=10 -> 12,10,9,8,7,6,5,4,3,1 (sum 65).
    """
    total = n * (n + 3) // 2
    weights = [n + 2] + [n - k + 1 for k in range(1, n - 1)]
    return weights + [total - sum(weights)]


def rank_select(n: int, rng: random.Random) -> int:
    draw = rng.randrange(n * (n + 3) // 2)
    for rank, weight in enumerate(rank_weights(n)):
        if draw < weight:
            return rank
        draw -= weight
    return n - 1


def clip(genes: list[float]) -> list[float]:
    return [min(1.0, max(0.0, g)) for g in genes]


def crossover(p1, p2, rng: random.Random) -> tuple[list[float], list[float]]:
    """Per-gene blend child = r*p1 + (1-r)*p2; momentum = U*p1.m + U*p2.m."""
    genes = []
    for a, b in zip(p1, p2):
        r = rng.random()
        genes.append(r * a + (1 - r) * b)
    momentum = [rng.random() * a + rng.random() * b for a, b in zip(p1.momentum, p2.momentum)]
    return genes, momentum


def mutation_rate(q: float, num_genes: int) -> float:
    return (q * (num_genes - 1) + 1) / num_genes


def mutate(genes: list[float], q: float, rng: random.Random) -> list[float]:
    """Each gene mutates with probability mutation_rate(q, G) by U(-1, 1) * q."""
    rate = mutation_rate(q, len(genes))
    return clip([g + rng.uniform(-1, 1) * q if rng.random() < rate else g for g in genes])


def adopt(genes: list[float], p1, p2, prototype, rng: random.Random) -> list[float]:
    """child += l*a*(mean(p1, p2) - child) + (1-l)*b*(prototype - child)."""
    a, b, lam = rng.random(), rng.random(), rng.random()
    return clip([g + lam * a * ((x + y) / 2 - g) + (1 - lam) * b * (z - g)
                 for g, x, y, z in zip(genes, p1, p2, prototype)])


def extinction_probabilities(fitnesses: list[float]) -> list[float] | None:
    """p_i = (f_i + f_min*(i/(N-1) - 1)) / f_max for fitnesses sorted best first; None when all equal."""
    n, f_min, f_max = len(fitnesses), min(fitnesses), max(fitnesses)
    if not f_max > f_min:
        return None
    return [(f + f_min * (i / (n - 1) - 1)) / f_max for i, f in enumerate(fitnesses)]


def random_genome(num_genes: int, num_blocks: int, encoding: str, rng: random.Random) -> list[float]:
    """Uniform in [0,1]^G, redrawn while no block would be trained."""
    while True:
        genes = [rng.random() for _ in range(num_genes)]
        if trained_blocks(genes, num_blocks, encoding):
            return genes


def evaluation_batches(config: GAConfig, n_folds: int) -> list[tuple[int, int, int]]:
    """(generation, fold, size) of the batches BioTuneGA evaluates for this config, in order: the
    evaluations of a batch are proposed before any of them is scored, so they can run at once.

    The initial population: one batch of N on fold 0 (generation -1). Generation t, on fold
    t mod n_folds: the improved variant first re-scores the E elites when the fold differs from
    the previous generation's (every t >= 1 with several folds), then one batch of 2E exploitation
    trials, then the N - E new members: one at a time with steady breeding (each child's fitness
    decides which parents leave the pool), one batch with generational breeding. In all
    N + T(N + E) evaluations, plus those re-scores (the reference variant skips the 2 trials of an
    elite that trains no block, as the released code does, so there it is an upper bound). With
    steady breeding, the random members that fill a generation once the pool has two members left
    are a batch of their own; that depends on the fitnesses, so the schedule counts them singly.
    The search baselines spend exactly this budget in these batches on these folds
    (searchers.py); a test checks the schedule against the loop itself.
    """
    batches = [(-1, 0, config.population)]
    children = config.population - config.elites
    for t in range(config.generations):
        fold, previous_fold = t % n_folds, (t - 1) % n_folds if t else 0
        if config.ga_variant == "improved" and fold != previous_fold and config.elites:
            batches.append((t, fold, config.elites))
        if config.elites:
            batches.append((t, fold, 2 * config.elites))
        batches += [(t, fold, children)] if config.breeding == "generational" else [(t, fold, 1)] * children
    return batches


def evaluation_schedule(config: GAConfig, n_folds: int) -> list[tuple[int, int]]:
    """(generation, fold) of every evaluation BioTuneGA makes for this config, in order
    (``evaluation_batches``, one entry per evaluation)."""
    return [(generation, fold) for generation, fold, size in evaluation_batches(config, n_folds)
            for _ in range(size)]


# ---------------------------------------------------------------------------------------------
# The loop


def score_many(evaluate: Evaluate, requests: list[dict]) -> list[float]:
    """Fitness of genomes proposed before any of them is scored (dicts of genes, fold, generation,
    individual, role), in order; an evaluator with ``evaluate_many`` (fitness.Evaluator) may
    train them at once, any other is called once per genome."""
    evaluate_many = getattr(evaluate, "evaluate_many", None)
    if evaluate_many is not None and requests:
        return evaluate_many(requests)
    return [evaluate(request["genes"], **{k: v for k, v in request.items() if k != "genes"}) for request in requests]


@dataclass
class GAResult:
    best_genes: list[float]
    best_fitness: float
    logbook: list[dict] = field(default_factory=list)
    evaluations: int = 0
    selection: list[dict] | None = None  # rescore_top_k: each candidate's fitness per fold


def rescore_top_k(evaluate: Evaluate, candidates: list[tuple[list[float], float]], *, n_folds: int,
                  generation: int) -> tuple[dict, list[dict]]:
    """Selection on the same footing: each candidate (genes, its search fitness) is evaluated on
    every fold (one batch), and the best mean fitness wins (ties: the earlier candidate). The best fitness
    seen during a search compares genomes measured on different folds, so a genome that met an
    easy fold can win on luck; here every candidate meets every fold."""
    fitness = score_many(evaluate, [{"genes": genes, "fold": fold, "generation": generation, "individual": index,
                                     "role": "final_select"}
                                    for index, (genes, _) in enumerate(candidates) for fold in range(n_folds)])
    table = []
    for index, (genes, search_fitness) in enumerate(candidates):
        per_fold = fitness[index * n_folds: (index + 1) * n_folds]
        table.append({"genes": list(genes), "search_fitness": search_fitness, "fold_fitness": per_fold,
                      "mean_fitness": statistics.fmean(per_fold)})
    return min(table, key=lambda row: row["mean_fitness"]), table


def make_individual(genes, fitness, *, fold, extinction=0.0, momentum=None):
    """A DEAP individual with its fitness and the fold that fitness was measured on."""
    ind = creator.BioTuneIndividual(genes)
    ind.fitness.values = (fitness,)
    ind.fold, ind.extinction = fold, extinction
    ind.momentum = list(momentum) if momentum is not None else [0.0] * len(genes)
    return ind


def fitness_of(ind) -> float:
    return ind.fitness.values[0]


def _set_extinction(population: list, variant_allows: bool = True) -> None:
    probabilities = extinction_probabilities([fitness_of(i) for i in population]) if variant_allows else None
    if probabilities is not None:
        for ind, p in zip(population, probabilities):
            ind.extinction = p


def fitness_statistics() -> tools.Statistics:
    """The logbook's per-generation numbers; the search baselines record the same ones."""
    stats = tools.Statistics(key=fitness_of)
    stats.register("best", min)
    stats.register("mean", statistics.fmean)
    stats.register("std", statistics.pstdev)
    stats.register("worst", max)
    return stats


def gene_diversity(population: list) -> float:
    """Mean over genes of the population's standard deviation of that gene."""
    return statistics.fmean(statistics.pstdev(column) for column in zip(*population))


class BioTuneGA:
    """Runs §5 with a checkpoint after initialisation and after every generation."""

    def __init__(self, evaluate: Evaluate, *, num_blocks: int, num_genes: int, config: GAConfig,
                 n_folds: int, checkpoint_path: str | Path, progress: bool = True):
        if config.elites >= config.population:
            raise ValueError(f"elites ({config.elites}) must be fewer than the population ({config.population})")
        self.evaluate, self.cfg = evaluate, config
        self.num_blocks, self.num_genes, self.n_folds = num_blocks, num_genes, n_folds
        self.checkpoint_path = Path(checkpoint_path)
        self.progress = progress
        self.improved = config.ga_variant == "improved"
        self.rng = random.Random(config.seed)
        random.seed(config.seed)  # DEAP's own helpers draw from the module-level generator
        self.population: list = []
        # The best-so-far (docs/algorithm.md §5, step 2d). DEAP's default similarity test (equal
        # genes) would skip a genome that comes back re-scored better on a new fold, leaving its
        # stale fitness to be beaten by a worse genome; every individual is compared on fitness
        # alone instead.
        self.hall_of_fame = tools.HallOfFame(1, similar=lambda a, b: False)
        self.logbook = tools.Logbook()
        self.stats = fitness_statistics()
        self.next_generation = 0
        self.evaluations = 0

    # -- evaluation helpers --------------------------------------------------------------------
    def _score_many(self, requests: list[dict]) -> list[float]:
        self.evaluations += len(requests)
        return score_many(self.evaluate, [{**request, "genes": clip(request["genes"])} for request in requests])

    def _score(self, genes, **where) -> float:
        return self._score_many([{"genes": genes, **where}])[0]

    def _random_members(self, *, fold, generation, first_index, count, role) -> list:
        """``count`` random genomes, drawn in order, then scored as one batch."""
        drawn = [random_genome(self.num_genes, self.num_blocks, self.cfg.encoding, self.rng) for _ in range(count)]
        fitness = self._score_many([{"genes": genes, "fold": fold, "generation": generation,
                                     "individual": first_index + i, "role": role} for i, genes in enumerate(drawn)])
        return [make_individual(genes, value, fold=fold) for genes, value in zip(drawn, fitness)]

    # -- §5 steps ------------------------------------------------------------------------------
    def initialise(self) -> None:
        self.population = self._random_members(fold=0, generation=-1, first_index=0, count=self.cfg.population,
                                               role="init")
        self.population.sort(key=fitness_of)
        _set_extinction(self.population, variant_allows=self.improved)  # released code: all stay 0
        self._record(generation=-1, fold=0)

    def _rescore_elites(self, generation: int, fold: int) -> None:
        """Improved variant: elites measured on another fold are re-evaluated on this one."""
        elites = self.population[: self.cfg.elites]
        stale = [(index, elite) for index, elite in enumerate(elites) if elite.fold != fold]
        fitness = self._score_many([{"genes": elite, "fold": fold, "generation": generation, "individual": index,
                                     "role": "rescore"} for index, elite in stale])
        for (_, elite), value in zip(stale, fitness):
            elite.fitness.values = (value,)
            elite.fold = fold
        self.population[: self.cfg.elites] = sorted(elites, key=fitness_of)

    def _exploit(self, generation: int, fold: int) -> None:
        """Each elite tries g_i +/- d on one trained gene and keeps the better only if it improves.

        Where the released code differs, ``reference`` follows it and ``improved`` does what §5
        step 2a says: an elite that trains no block is skipped (improved: it tries any block gene,
        so a population stuck at the worst fitness can still move); when +d and -d tie, the gene is
        restored (improved: +d is kept if it beats the elite); the kept gene is stored unclipped
        (improved: clipped, as it was evaluated).
        """
        moves = []  # (index, elite, gene, +d value, -d value), all drawn before any trial is scored
        for index, elite in enumerate(self.population[: self.cfg.elites]):
            candidates = trained_blocks(list(elite), self.num_blocks, self.cfg.encoding)
            if not candidates and not self.improved:
                continue
            gene = self.rng.choice(candidates or range(self.num_blocks))
            step = self.cfg.exploit_step * self.rng.uniform(-1, 1)
            moves.append((index, elite, gene, elite[gene] + step, elite[gene] - step))
        requests = []
        for index, elite, gene, plus_value, minus_value in moves:
            for value in (plus_value, minus_value):
                genes = list(elite)
                genes[gene] = value
                requests.append({"genes": genes, "fold": fold, "generation": generation, "individual": index,
                                 "role": "exploit"})
        fitness = self._score_many(requests)
        for (_, elite, gene, plus_value, minus_value), plus, minus in zip(moves, fitness[::2], fitness[1::2]):
            if self.improved:
                value, new_fitness = (plus_value, plus) if plus <= minus else (minus_value, minus)
            elif plus == minus:
                continue
            else:
                value, new_fitness = (plus_value, plus) if plus < minus else (minus_value, minus)
            if new_fitness < fitness_of(elite):
                elite[gene] = min(1.0, max(0.0, value)) if self.improved else value
                elite.fitness.values = (new_fitness,)
                elite.fold = fold

    def _breed(self, pool: list) -> tuple[list[float], list[float], object, object]:
        """A child's genes and momentum from two rank-selected parents and a prototype (§5b-c)."""
        n = len(pool)
        first = rank_select(n, self.rng)
        second = rank_select(n, self.rng)
        while second == first:
            second = rank_select(n, self.rng)
        p1, p2, prototype = pool[first], pool[second], pool[rank_select(n, self.rng)]
        genes, momentum = crossover(p1, p2, self.rng)
        after_crossover = list(genes)
        genes = mutate(genes, (p1.extinction + p2.extinction) / 2, self.rng)
        genes = adopt(genes, p1, p2, prototype, self.rng)
        momentum = [self.rng.random() * m + (g - c) for m, g, c in zip(momentum, genes, after_crossover)]
        if self.cfg.momentum:
            genes = clip([g + m for g, m in zip(genes, momentum)])
        return genes, momentum, p1, p2

    def _child(self, pool: list, generation: int, fold: int, index: int):
        """Steady breeding: the child is scored at once, and parents it beats leave the pool."""
        genes, momentum, p1, p2 = self._breed(pool)
        child = make_individual(genes, self._score(genes, fold=fold, generation=generation, individual=index,
                                                   role="child"), fold=fold, momentum=momentum)
        for parent in (p1, p2):
            if fitness_of(parent) > fitness_of(child):  # by identity: two members may share genes
                del pool[next(i for i, member in enumerate(pool) if member is parent)]
        return child

    def _generational_children(self, generation: int, fold: int) -> list:
        """``ga.breeding = generational``: the N - E children bred from one snapshot of the whole
        population (no parent leaves the pool), then scored as one batch."""
        pool, first = list(self.population), self.cfg.elites
        if len(pool) <= 2:
            return self._random_members(fold=fold, generation=generation, first_index=first,
                                        count=self.cfg.population - first, role="random")
        bred = [self._breed(pool)[:2] for _ in range(self.cfg.population - first)]
        fitness = self._score_many([{"genes": genes, "fold": fold, "generation": generation, "individual": first + i,
                                     "role": "child"} for i, (genes, _) in enumerate(bred)])
        return [make_individual(genes, value, fold=fold, momentum=momentum)
                for (genes, momentum), value in zip(bred, fitness)]

    def generation(self, t: int) -> None:
        fold = t % self.n_folds
        if self.improved:
            self._rescore_elites(t, fold)
        self._exploit(t, fold)
        new_population = [self.population[i] for i in range(self.cfg.elites)]
        if self.cfg.breeding == "generational":
            new_population += self._generational_children(t, fold)
        pool = list(self.population)
        while len(new_population) < self.cfg.population and len(pool) > 2:
            new_population.append(self._child(pool, t, fold, len(new_population)))
        if len(new_population) < self.cfg.population:  # two members left in the pool: random ones fill up
            new_population += self._random_members(fold=fold, generation=t, first_index=len(new_population),
                                                   count=self.cfg.population - len(new_population), role="random")
        new_population.sort(key=fitness_of)
        _set_extinction(new_population)
        self.population = new_population
        self._record(generation=t, fold=fold)

    def _record(self, generation: int, fold: int) -> None:
        self.hall_of_fame.update(self.population)
        self.logbook.record(generation=generation, fold=fold, evaluations=self.evaluations,
                            best_so_far=fitness_of(self.hall_of_fame[0]),
                            diversity=gene_diversity(self.population), **self.stats.compile(self.population))
        self.next_generation = generation + 1
        self._save_checkpoint()

    def run(self) -> GAResult:
        if self.next_generation == 0 and not self.population:
            self.initialise()
        generations = tqdm(range(self.next_generation, self.cfg.generations), desc="generations",
                           initial=self.next_generation, total=self.cfg.generations, disable=not self.progress)
        for t in generations:
            self.generation(t)
            generations.set_postfix(best=f"{fitness_of(self.hall_of_fame[0]):.4f}")
        best = self.hall_of_fame[0]
        # clipped as it was evaluated: the reference variant may store an unclipped exploitation gene
        return GAResult(best_genes=clip(list(best)), best_fitness=fitness_of(best), logbook=list(self.logbook),
                        evaluations=self.evaluations)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        def plain(ind):
            return {"genes": list(ind), "fitness": fitness_of(ind), "fold": ind.fold,
                    "extinction": ind.extinction, "momentum": list(ind.momentum)}

        return {
            "next_generation": self.next_generation,
            "evaluations": self.evaluations,
            "population": [plain(i) for i in self.population],
            "hall_of_fame": [plain(i) for i in self.hall_of_fame],
            "logbook": list(self.logbook),
            "rng": _rng_to_json(self.rng.getstate()),
            "global_rng": _rng_to_json(random.getstate()),
        }

    def _save_checkpoint(self) -> None:
        """Write the state atomically: a temporary file, flushed to disk, then renamed over the old one."""
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.checkpoint_path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            json.dump(self.state(), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.checkpoint_path)

    def restore(self) -> int:
        """Load the last checkpoint if there is one; return the evaluations made before it (0
        without one), where the evaluator resumes (``Evaluator.start_at``)."""
        if not self.checkpoint_path.is_file():
            return 0
        try:
            self._load_state(json.loads(self.checkpoint_path.read_text()))
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise CheckpointError(
                f"{self.checkpoint_path} is not a readable BioTune checkpoint ({type(error).__name__}: {error}). "
                f"Move it away (mv {self.checkpoint_path} {self.checkpoint_path}.bad) and resume again: the "
                "search then replays from its first evaluation, taking every finished one from the run store "
                "without training") from None
        log.info("resumed from %s at generation %d", self.checkpoint_path, self.next_generation)
        return self.evaluations

    def _load_state(self, state: dict) -> None:
        def individual(d):
            return make_individual(d["genes"], d["fitness"], fold=d["fold"], extinction=d["extinction"],
                                   momentum=d["momentum"])

        population = [individual(d) for d in state["population"]]
        best = [individual(d) for d in state["hall_of_fame"]]
        logbook = tools.Logbook()
        for record in state["logbook"]:
            logbook.record(**record)
        rng, global_rng = _rng_from_json(state["rng"]), _rng_from_json(state["global_rng"])
        self.rng.setstate(rng)  # raises on a malformed state before anything else changes
        random.setstate(global_rng)
        self.population, self.logbook = population, logbook
        self.hall_of_fame.clear()
        self.hall_of_fame.update(best)
        self.next_generation, self.evaluations = int(state["next_generation"]), int(state["evaluations"])


def _rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss
