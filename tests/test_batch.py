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
    rows = [{"method": "full", "label": "ok"}, {"method": "no_such_method", "label": "bad"},
            {"method": "random", "label": "search"}]
    rows = [dict(row, preset="smoke", overrides=smoke["overrides"]) for row in rows]
    outcome = biotune.run_many(rows, jobs=2, store=smoke["store"])
    assert outcome["label"].tolist() == ["ok", "bad", "search"]
    assert outcome["status"].tolist() == ["ok", "failed", "ok"]
    assert "unknown method 'no_such_method'" in outcome.loc[1, "error"]
    table = biotune.compare(outcome["run_id"].dropna().tolist(), store=smoke["store"])
    assert table["method"].tolist() == ["full", "random"]


def test_run_many_rejects_a_malformed_row(smoke):
    with pytest.raises(ValueError, match="allowed keys"):
        biotune.run_many([{"method": "full", "datset": "digits"}], store=smoke["store"])
