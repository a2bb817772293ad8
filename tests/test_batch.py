"""Experiment rows: reuse of finished runs, resume of unfinished ones, parallel rows, failures."""
import pytest

import biotune
from biotune.store import RunStore


@pytest.fixture()
def smoke(tmp_path, smoke_config):
    return {"preset": "smoke", "store": tmp_path / "runs.sqlite",
            "overrides": {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}}


def train_runs(store) -> int:
    with RunStore(store) as db:
        return int(db.evaluations()["train_runs"].sum() + db.finals()["train_runs"].sum())


def test_a_finished_row_is_reused_and_trains_nothing(smoke):
    search_id = biotune.run_method("random", **smoke, progress=False)
    baseline_id = biotune.run_method("l2_sp", **smoke, progress=False)
    spent = train_runs(smoke["store"])
    assert biotune.run_method("random", **smoke, progress=False) == search_id
    assert biotune.run_method("l2_sp", **smoke, progress=False) == baseline_id
    assert train_runs(smoke["store"]) == spent
    # where it runs is not what it computes: other threads or device reuse the same row
    elsewhere = dict(smoke, overrides={**smoke["overrides"], "train.num_threads": 1, "train.device": "auto"})
    assert biotune.run_method("random", **elsewhere, progress=False) == search_id
    # another config is another row
    other = dict(smoke, overrides={**smoke["overrides"], "ga.seed": 1})
    assert biotune.run_method("random", **other, progress=False) != search_id
    with RunStore(smoke["store"]) as db:
        assert db.run(baseline_id)["meta"]["grid"] == [{"alpha": a} for a in (0.001, 0.01, 0.1)]


def test_an_unfinished_search_is_resumed_not_restarted(smoke):
    """A search killed after 3 evaluations (simulated by dropping the later ones) continues."""
    run_id = biotune.run_method("tpe", **smoke, progress=False)
    with RunStore(smoke["store"]) as db:
        full = db.evaluations(run_id)
        db.db.execute("DELETE FROM evaluations WHERE run_id = ? AND seq >= 3", (run_id,))
        db.db.execute("DELETE FROM finals WHERE run_id = ?", (run_id,))
        db.db.commit()
        db.set_status(run_id, "interrupted")
    assert biotune.run_method("tpe", **smoke, progress=False) == run_id
    with RunStore(smoke["store"]) as db:
        again = db.evaluations(run_id)
        assert db.run(run_id)["status"] == "finished"
        assert len(db.finals(run_id)) == 1
    assert again["genes"].tolist() == full["genes"].tolist()


def test_run_many_goes_on_past_a_failed_row_in_parallel(smoke):
    rows = [{"method": "full", "label": "ok"}, {"method": "full", "dataset": "no_such_dataset", "label": "bad"},
            {"method": "random", "label": "search"}]
    rows = [dict(row, preset="smoke", overrides=smoke["overrides"]) for row in rows]
    outcome = biotune.run_many(rows, jobs=2, store=smoke["store"])
    assert outcome["label"].tolist() == ["ok", "bad", "search"]
    assert outcome["status"].tolist() == ["ok", "failed", "ok"]
    assert "no_such_dataset" in outcome.loc[1, "error"]
    table = biotune.compare(outcome["run_id"].dropna().tolist(), store=smoke["store"])
    assert table["method"].tolist() == ["full", "random"]


def test_run_many_rejects_bad_rows_before_training_anything(smoke):
    rows = [{"method": "full", "preset": "smoke"}, {"method": "no_such_method"},
            {"method": "tpe", "overrides": {"ga.popsize": 3}}, {"method": "full", "datset": "digits"}]
    with pytest.raises(ValueError) as error:
        biotune.run_many(rows, store=smoke["store"])
    message = str(error.value)
    assert "unknown method 'no_such_method'" in message
    assert "unknown config key ga.popsize" in message
    assert "allowed keys" in message
    assert not smoke["store"].exists()


def test_ablation_rows_cover_each_variant_once_at_the_stated_budgets():
    from biotune import config as cfg
    from biotune.batch import ablation_rows
    from biotune.ga import evaluation_schedule

    rows = ablation_rows("cpu", "digits", populations=[4, 6, 20])

    def spent(row):
        config = cfg.resolve("cpu", overrides={**row["overrides"], "ga.searcher": row["method"]})
        return len(evaluation_schedule(config.ga, cfg.num_folds(config.ga.train_split)))

    labels = [row["label"] for row in rows]
    assert len(set(labels)) == len(labels)
    assert labels[:7] == ["BioTune", "BioTune (no LR genes)", "BioTune (no freezing)", "BioTune (reference GA)",
                          "BioTune (re-scored top 3)", "BioTune (pruned)", "BioTune (generational breeding)"]
    assert spent(rows[6]) == spent(rows[0])  # generational breeding: the same budget
    assert labels[-3:] == ["random search", "TPE", "CMA-ES"]
    budget = spent(rows[0])
    assert all(spent(row) == budget for row in rows if row["method"] != "biotune")
    by_label = {row["label"]: row for row in rows}
    # population 6 is the preset's own: its same-generations row is BioTune itself, not repeated
    assert "BioTune (N=6, T=4)" not in by_label
    assert by_label["BioTune (N=4, T=4)"]["overrides"]["ga.population"] == 4
    for population in (4, 20):
        same_budget = [row for label, row in by_label.items()
                       if label.startswith(f"BioTune (N={population}, T=") and label != f"BioTune (N={population}, T=4)"]
        assert len(same_budget) == 1
        generations = same_budget[0]["overrides"]["ga.generations"]
        closest = min(abs(spent(dict(same_budget[0], overrides={**same_budget[0]["overrides"], "ga.generations": t}))
                          - budget) for t in range(0, 40))
        assert abs(spent(same_budget[0]) - budget) == closest, generations
    demo = {row["label"]: row for row in ablation_rows("demo", populations=[20])}
    assert demo["BioTune (N=20, T=0)"]["overrides"]["ga.generations"] == 0  # 20 initial members vs 21


def test_the_comparison_script_runs_every_searcher_and_registered_method():
    import runpy
    from pathlib import Path

    from biotune.batch import SEARCHERS, row_methods
    from biotune.methods import list_methods

    script = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "compare_methods.py"))
    assert sorted(script["BASELINES"]) == list_methods()
    assert set(row_methods()) == {*SEARCHERS, *biotune.batch.BIOTUNE_VARIANTS, *list_methods()}
