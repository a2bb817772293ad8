"""BioTune's operators and loop, with a cheap deterministic fitness instead of training."""
import random

import pytest

from biotune import ga
from biotune.config import GAConfig


class FakeEvaluate:
    """Fitness = distance of the genes to a target; records every call like the real evaluator."""

    def __init__(self, target=(0.9, 0.1, 0.8, 0.3, 0.2), fail_every: int = 0):
        self.target, self.calls, self.seq, self.fail_every = target, [], 0, fail_every

    def __call__(self, genes, *, fold, generation, individual, role):
        self.seq += 1
        self.calls.append({"genes": list(genes), "fold": fold, "generation": generation, "role": role})
        if self.fail_every and self.seq % self.fail_every == 0:
            return 1.0  # a diverged run: worst fitness, the search goes on
        return sum((g - t) ** 2 for g, t in zip(genes, self.target))


def make_ga(tmp_path, evaluate=None, n_folds=1, **overrides):
    config = GAConfig(**{"population": 6, "generations": 3, "elites": 2, **overrides})
    return ga.BioTuneGA(evaluate or FakeEvaluate(), num_blocks=4, num_genes=5, config=config,
                        n_folds=n_folds, checkpoint_path=tmp_path / "checkpoint.json", progress=False)


def test_rank_weights_match_the_paper():
    assert ga.rank_weights(10) == [12, 10, 9, 8, 7, 6, 5, 4, 3, 1]
    for n in range(3, 30):
        assert sum(ga.rank_weights(n)) == n * (n + 3) // 2
        assert all(w > 0 for w in ga.rank_weights(n))


def test_rank_selection_frequencies_over_every_draw():
    class EveryDraw:  # yields each of the 65 equally likely draws once
        def __init__(self):
            self.values = iter(range(65))

        def randrange(self, stop):
            assert stop == 65
            return next(self.values)

    draws = EveryDraw()
    counts = [0] * 10
    for _ in range(65):
        counts[ga.rank_select(10, draws)] += 1
    assert counts == [12, 10, 9, 8, 7, 6, 5, 4, 3, 1]


def test_rank_selection_sampled_frequencies():
    rng = random.Random(0)
    counts = [0] * 10
    for _ in range(65000):
        counts[ga.rank_select(10, rng)] += 1
    for observed, expected in zip(counts, [12, 10, 9, 8, 7, 6, 5, 4, 3, 1]):
        assert observed == pytest.approx(expected * 1000, rel=0.08)


def test_extinction_formula():
    p = ga.extinction_probabilities([0.1, 0.2, 0.4, 0.5])
    expected = [(f + 0.1 * (i / 3 - 1)) / 0.5 for i, f in enumerate([0.1, 0.2, 0.4, 0.5])]
    assert p == pytest.approx(expected)
    assert p[0] == 0.0 and p[-1] == 1.0
    assert ga.extinction_probabilities([0.3, 0.3, 0.3]) is None


def test_mutation_rate_and_clipping():
    assert ga.mutation_rate(0.0, 5) == pytest.approx(0.2)  # 1/G
    assert ga.mutation_rate(1.0, 5) == pytest.approx(1.0)
    assert ga.mutation_rate(0.5, 11) == pytest.approx((0.5 * 10 + 1) / 11)
    assert ga.clip([-0.5, 0.3, 1.7]) == [0.0, 0.3, 1.0]
    rng = random.Random(1)
    assert ga.mutate([0.2, 0.4, 0.6], 0.0, rng) == [0.2, 0.4, 0.6]  # q = 0 mutates nothing
    mutated = ga.mutate([0.0, 1.0] * 50, 1.0, rng)  # q = 1: every gene moves, stays in [0, 1]
    assert all(0.0 <= g <= 1.0 for g in mutated) and mutated != [0.0, 1.0] * 50


def test_budget_is_n_plus_t_times_n_plus_e(tmp_path):
    evaluate = FakeEvaluate()
    result = make_ga(tmp_path, evaluate, population=10, generations=3, elites=3).run()
    assert len(evaluate.calls) == result.evaluations == 10 + 3 * (10 + 3)


def test_improved_rescoring_adds_e_evaluations_when_the_fold_rotates(tmp_path):
    evaluate = FakeEvaluate()
    make_ga(tmp_path, evaluate, n_folds=2, generations=3).run()
    rescores = [c for c in evaluate.calls if c["role"] == "rescore"]
    assert {c["generation"] for c in rescores} == {1, 2} and len(rescores) == 2 * 2
    assert [c["fold"] for c in evaluate.calls if c["role"] == "child"][:1] == [0]
    assert {c["fold"] for c in evaluate.calls if c["generation"] == 1} == {1}


def test_reference_variant_keeps_stale_elites_and_no_extinction_at_init(tmp_path):
    evaluate = FakeEvaluate()
    search = make_ga(tmp_path, evaluate, n_folds=2, ga_variant="reference")
    search.initialise()
    assert all(ind.extinction == 0.0 for ind in search.population)
    search.run()
    assert not [c for c in evaluate.calls if c["role"] == "rescore"]
    improved = make_ga(tmp_path / "improved")
    improved.initialise()
    assert improved.population[-1].extinction == pytest.approx(1.0)


def test_exploitation_keeps_only_improvements(tmp_path):
    search = make_ga(tmp_path)
    search.initialise()
    before = [(list(i), i.fitness.values[0]) for i in search.population[:2]]
    search._exploit(0, 0)
    for (genes, fitness), elite in zip(before, search.population[:2]):
        assert elite.fitness.values[0] <= fitness
        changed = [k for k in range(5) if genes[k] != elite[k]]
        assert len(changed) <= 1
        if not changed:
            assert elite.fitness.values[0] == fitness
        else:
            assert elite.fitness.values[0] < fitness and 0 <= elite[changed[0]] <= 1


def test_exploitation_never_worsens_an_elite_that_cannot_improve(tmp_path):
    evaluate = FakeEvaluate()
    search = make_ga(tmp_path, evaluate)
    search.initialise()
    elite = search.population[0]
    elite.fitness.values = (-1.0,)  # nothing can beat this
    genes = list(elite)
    search._exploit(0, 0)
    assert list(elite) == genes and elite.fitness.values == (-1.0,)


def test_a_pool_of_two_or_fewer_gives_fresh_random_children(tmp_path):
    class Improving(FakeEvaluate):  # every child beats its parents, so both leave the pool
        def __call__(self, genes, **kw):
            super().__call__(genes, **kw)
            return 1.0 / (self.seq + 1)

    evaluate = Improving()
    make_ga(tmp_path, evaluate, population=6, elites=1, generations=1).run()
    roles = [c["role"] for c in evaluate.calls if c["generation"] == 0]
    assert roles == ["exploit", "exploit", "child", "child", "random", "random", "random"]


def test_every_genome_evaluated_trains_at_least_one_block(tmp_path):
    evaluate = FakeEvaluate()
    make_ga(tmp_path, evaluate).run()
    for call in evaluate.calls:
        if call["role"] in ("init", "random"):
            assert any(g > call["genes"][-1] for g in call["genes"][:-1])


def test_momentum_option_changes_the_children(tmp_path):
    plain, moving = FakeEvaluate(), FakeEvaluate()
    make_ga(tmp_path / "a", plain, generations=2).run()
    make_ga(tmp_path / "b", moving, generations=2, momentum=True).run()
    assert plain.calls[:6] == moving.calls[:6]  # same initial population
    assert plain.calls != moving.calls


def test_failed_evaluations_do_not_stop_the_search(tmp_path):
    evaluate = FakeEvaluate(fail_every=3)
    result = make_ga(tmp_path, evaluate).run()
    assert result.evaluations == 6 + 3 * 8 and result.best_fitness < 1.0


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    full = FakeEvaluate()
    expected = make_ga(tmp_path / "full", full, n_folds=2, generations=4).run()

    first = FakeEvaluate()
    interrupted = make_ga(tmp_path / "cut", first, n_folds=2, generations=4)
    interrupted.initialise()
    interrupted.generation(0)
    interrupted.generation(1)  # then "killed"; the checkpoint holds generation 1

    second = FakeEvaluate()
    resumed = make_ga(tmp_path / "cut", second, n_folds=2, generations=4)
    second.seq = resumed.restore()  # what the evaluator is told on resume (Evaluator.start_at)
    assert second.seq == len(first.calls)
    result = resumed.run()
    assert first.calls + second.calls == full.calls
    assert result.best_genes == expected.best_genes and result.best_fitness == expected.best_fitness
    assert result.logbook == expected.logbook


def test_elites_must_be_fewer_than_population(tmp_path):
    with pytest.raises(ValueError, match="elites"):
        make_ga(tmp_path, population=3, elites=3)


class FoldDependent(FakeEvaluate):
    """Fitness that depends on the fold, so a re-scored elite can come back better or worse."""

    def __init__(self, seed: int):
        super().__init__()
        self.offsets = random.Random(seed)
        self.fold_offset = {}

    def __call__(self, genes, *, fold, **kw):
        distance = super().__call__(genes, fold=fold, **kw)
        key = (tuple(round(g, 6) for g in genes), fold)
        self.fold_offset.setdefault(key, self.offsets.uniform(-0.3, 0.3))
        return max(0.0, distance + self.fold_offset[key])


@pytest.mark.parametrize("variant", ["improved", "reference"])
def test_the_returned_best_is_the_spec_s_best_so_far(tmp_path, variant):
    """§5d: after each generation the best of the population replaces the best-so-far if it is
    better, whatever its genes; DEAP's default hall of fame skipped a re-scored genome equal to
    the stored one and let a worse genome replace its stale fitness."""
    for seed in range(40):  # the paper's sizes; the old hall of fame failed some of these seeds
        search = make_ga(tmp_path / f"{variant}{seed}", FoldDependent(seed), n_folds=2, population=10, elites=3,
                         generations=10, ga_variant=variant, seed=seed)
        expected = [float("inf"), None]
        record = search._record

        def checked_record(generation, fold, record=record, search=search, expected=expected):
            best = min(search.population, key=ga.fitness_of)
            if ga.fitness_of(best) < expected[0]:
                expected[:] = [ga.fitness_of(best), ga.clip(list(best))]
            record(generation=generation, fold=fold)

        search._record = checked_record
        result = search.run()
        assert result.best_fitness == expected[0] and result.best_genes == expected[1]
        assert all(result.best_fitness <= ga.fitness_of(member) for member in search.population)
        assert all(0.0 <= g <= 1.0 for g in result.best_genes)


def test_a_rescored_best_with_the_same_genes_updates_the_hall_of_fame(tmp_path):
    search = make_ga(tmp_path)
    search.initialise()
    best = search.population[0]
    best.fitness.values = (ga.fitness_of(best) / 10,)  # re-scored much better on a new fold
    other = ga.make_individual([0.5] * 5, ga.fitness_of(best) * 5, fold=1)  # worse than the re-score
    search.population = [best, other]
    search._record(generation=0, fold=1)
    assert ga.fitness_of(search.hall_of_fame[0]) == ga.fitness_of(best)
    assert list(search.hall_of_fame[0]) == list(best)


def test_reference_best_genes_are_clipped_before_the_recipe(tmp_path):
    """Reference exploitation stores g_i +/- d unclipped; the returned genome is the one evaluated."""
    search = make_ga(tmp_path, ga_variant="reference")
    search.initialise()
    search.population[0][0] = 1.7  # what an unclipped exploitation step leaves behind
    search.population[0].fitness.values = (-1.0,)
    search._record(generation=0, fold=0)
    search.next_generation = search.cfg.generations
    assert search.run().best_genes[0] == 1.0


def test_a_parent_leaves_the_pool_by_identity_not_by_equal_genes(tmp_path):
    class Improving(FakeEvaluate):  # every child beats both parents
        def __call__(self, genes, **kw):
            super().__call__(genes, **kw)
            return 1.0 / (self.seq + 10)

    search = make_ga(tmp_path, Improving(), population=4, elites=1)
    search.initialise()
    twin = ga.make_individual(list(search.population[0]), 0.9, fold=0)  # same genes as the best, worse
    pool = [search.population[0], search.population[1], twin, search.population[2]]
    search._child(pool, 0, 0, 1)
    assert len(pool) == 2
    assert all(sum(member is kept for kept in pool) == 1 for member in pool)


def test_reference_exploitation_reverts_a_tie_and_skips_an_elite_that_trains_nothing(tmp_path):
    class Constant(FakeEvaluate):
        def __call__(self, genes, **kw):
            super().__call__(genes, **kw)
            return 0.1  # +d and -d tie, both better than the elite

    evaluate = Constant()
    search = make_ga(tmp_path, evaluate, ga_variant="reference", elites=2)
    search.initialise()
    tie, empty = search.population[0], search.population[1]
    tie.fitness.values, empty.fitness.values = (0.5,), (0.6,)
    empty[:] = [0.1, 0.1, 0.1, 0.1, 0.9]  # threshold above every block gene: trains nothing
    genes = list(tie)
    calls = len(evaluate.calls)
    search._exploit(0, 0)
    assert list(tie) == genes and ga.fitness_of(tie) == 0.5  # released code reverts on a tie
    assert len(evaluate.calls) - calls == 2  # the empty elite was skipped: no evaluations
    improved = make_ga(tmp_path / "improved", Constant(), elites=2)
    improved.initialise()
    improved.population[0].fitness.values = (0.5,)
    improved._exploit(0, 0)
    assert ga.fitness_of(improved.population[0]) == 0.1  # improved keeps +d


def test_rescore_top_k_returns_the_best_mean_over_every_fold():
    per_fold = {(0, 0): 0.1, (0, 1): 0.5, (1, 0): 0.2, (1, 1): 0.25}  # candidate 0 met an easy fold

    def evaluate(genes, *, fold, generation, individual, role):
        assert role == "final_select" and generation == 3
        return per_fold[(int(genes[0]), fold)]

    best, table = ga.rescore_top_k(evaluate, [([0.0], 0.1), ([1.0], 0.2)], n_folds=2, generation=3)
    assert best["genes"] == [1.0] and best["mean_fitness"] == pytest.approx(0.225)
    assert [row["fold_fitness"] for row in table] == [[0.1, 0.5], [0.2, 0.25]]


def test_a_corrupt_checkpoint_is_refused_with_the_way_out(tmp_path):
    search = make_ga(tmp_path)
    search.initialise()
    search.checkpoint_path.write_text('{"population": [')
    resumed = make_ga(tmp_path)
    with pytest.raises(ga.CheckpointError, match="checkpoint.json is not a readable BioTune checkpoint.*mv "):
        resumed.restore()
