"""Search baselines at BioTune's budget: schedule, folds, genomes, outputs, resume, bad names."""
import importlib.util
from pathlib import Path

import pytest
from test_ga import FakeEvaluate, make_ga

import biotune
from biotune import config as cfg
from biotune import ga, searchers
from biotune.cli import main
from biotune.store import RunStore

needs_cmaes = pytest.mark.skipif(importlib.util.find_spec("cmaes") is None,
                                 reason="optuna's CmaEsSampler needs the cmaes package")
SEARCHERS = ["random", "tpe", pytest.param("cmaes", marks=needs_cmaes)]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, smoke_config):
    """Keyword arguments of smoke runs in this module's folder: two generations, so the improved
    variant re-scores its elites on the second fold."""
    root = tmp_path_factory.mktemp("searchers")
    return {"preset": "smoke", "store": root / "runs.sqlite",
            "overrides": {"data.root": smoke_config.data.root, "results_dir": str(root / "results"),
                          "ga.generations": 2}}


@pytest.fixture(scope="module")
def biotune_evaluations(smoke_run):
    return biotune.search(**smoke_run, progress=False).evaluations


@pytest.mark.parametrize("variant", ["improved", "reference"])
@pytest.mark.parametrize("n_folds", [1, 2])
def test_the_schedule_is_what_biotune_evaluates(tmp_path, variant, n_folds):
    evaluate = FakeEvaluate()
    search = make_ga(tmp_path, evaluate, n_folds=n_folds, ga_variant=variant, generations=4)
    search.run()
    assert [(c["generation"], c["fold"]) for c in evaluate.calls] == ga.evaluation_schedule(search.cfg, n_folds)
    n, t, e = 6, 4, 2
    rescores = e * (t - 1) if variant == "improved" and n_folds == 2 else 0
    assert len(evaluate.calls) == n + t * (n + e) + rescores


@pytest.mark.parametrize("name", SEARCHERS)
def test_a_seeded_searcher_proposes_the_same_genomes_on_the_schedule_s_folds(name):
    config = cfg.GAConfig(population=6, generations=3, elites=2, seed=3)  # 34 trials: TPE past its 10 random ones
    runs = []
    for _ in range(2):
        evaluate = FakeEvaluate()
        result = searchers.Searcher(name, evaluate, num_blocks=4, num_genes=5, config=config, n_folds=2,
                                    progress=False).run()
        runs.append(evaluate.calls)
    calls = runs[0]
    assert runs[1] == calls  # what a resumed run relies on: same seed and history, same proposals
    assert [(c["generation"], c["fold"]) for c in calls] == ga.evaluation_schedule(config, 2)
    assert all(len(c["genes"]) == 5 and all(0.0 <= g <= 1.0 for g in c["genes"]) for c in calls)
    assert result.evaluations == len(calls)
    assert result.best_fitness == min(r["best"] for r in result.logbook) == result.logbook[-1]["best_so_far"]
    assert [r["generation"] for r in result.logbook] == [-1, 0, 1, 2]
    assert [r["evaluations"] for r in result.logbook] == [6, 14, 24, 34]


@pytest.mark.parametrize("name", SEARCHERS)
def test_each_searcher_spends_biotune_s_budget_on_its_folds(name, smoke_run, biotune_evaluations):
    overrides = [f"--{k}={v}" for k, v in smoke_run["overrides"].items() if "." in k]
    assert main(["--store", str(smoke_run["store"]), "--results-dir", smoke_run["overrides"]["results_dir"],
                 "search", "--preset", "smoke", "--searcher", name, "--quiet", *overrides]) == 0
    with RunStore(smoke_run["store"]) as store:
        run = store.runs().query("method == @name").iloc[-1]
        evaluations = store.evaluations(run["run_id"])
        logbook = store.generations(run["run_id"])
    assert run["status"] == "finished"
    assert len(evaluations) == len(biotune_evaluations) == 3 + 4 + 5  # N + T(N + E) + one re-score
    assert evaluations["fold"].tolist() == biotune_evaluations["fold"].tolist()
    assert evaluations["generation"].tolist() == biotune_evaluations["generation"].tolist()
    assert all(len(genes) == 5 and all(0.0 <= g <= 1.0 for g in genes) for genes in evaluations["genes"])
    if name == "random":
        assert all(any(mask[:-1]) for mask in evaluations["trained"])  # every genome trains a block
    assert logbook["generation"].tolist() == [-1, 0, 1]
    assert logbook["best_so_far"].iloc[-1] == pytest.approx(evaluations["fitness"].min())
    folder = Path(smoke_run["overrides"]["results_dir"]) / run["run_id"]
    for output in ("config.json", "meta.json", "evaluations.csv", "generations.csv", "recipe.json",
                   "convergence.png"):
        assert (folder / output).is_file(), output


@pytest.mark.parametrize("name", ["tpe", pytest.param("cmaes", marks=needs_cmaes)])
def test_an_interrupted_search_resumes_like_an_uninterrupted_run(name, tmp_path, smoke_config, interrupted_search):
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results"),
                 "ga.searcher": name, "ga.population": 4, "ga.generations": 3, "ga.elites": 1}  # 21 trials
    reference = biotune.search(preset="smoke", store=tmp_path / "reference.sqlite", overrides=overrides,
                               progress=False)
    # past TPE's 10 random trials: the resumed run must replay its model
    store_path, run_id = interrupted_search(overrides, after_runs=14)
    with RunStore(store_path) as store:
        assert store.run(run_id)["status"] == "interrupted"
        assert 14 <= len(store.evaluations(run_id)) < len(reference.evaluations)

    resumed = biotune.search(resume=run_id, store=store_path, progress=False)

    def comparable(frame):
        return frame[["seq", "generation", "fold", "genes", "fitness", "status"]].to_dict("records")

    assert comparable(resumed.evaluations) == comparable(reference.evaluations)
    assert resumed.best_genes == reference.best_genes
    assert resumed.generations.equals(reference.generations)


def test_an_unknown_searcher_fails_early_listing_the_choices(smoke_run, capsys):
    assert cfg.CHOICES["ga.searcher"] == ("biotune", *searchers.SEARCHERS)
    with pytest.raises(cfg.ConfigError, match="ga.searcher='annealing'.*biotune, random, tpe, cmaes"):
        biotune.search(**{**smoke_run, "overrides": {**smoke_run["overrides"], "ga.searcher": "annealing"}})
    with pytest.raises(SystemExit):
        main(["search", "--preset", "smoke", "--searcher", "annealing"])
    error = capsys.readouterr().err
    assert "invalid choice: 'annealing'" in error and all(name in error for name in cfg.CHOICES["ga.searcher"])
