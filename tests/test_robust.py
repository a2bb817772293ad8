"""Robust BioTune (ours, docs/algorithm.md): its switches reach the search, read back from the store."""
import pytest

from biotune import fitness
from biotune.batch import BIOTUNE_VARIANTS, run_method
from biotune.store import RunStore


@pytest.mark.slow
def test_robust_biotune_trains_the_head_rescores_and_scores_on_the_whole_validation(tmp_path, monkeypatch):
    validated, real_train = [], fitness.train

    def recording_train(*args, prefix=None, **kwargs):
        validated.append(len(prefix.val.order))
        return real_train(*args, prefix=prefix, **kwargs)

    monkeypatch.setattr(fitness, "train", recording_train)
    store = tmp_path / "robust.sqlite"
    run_id = run_method("biotune_robust", preset="smoke", store=store, progress=False,
                        overrides={"data.root": str(tmp_path / "data"), "results_dir": str(tmp_path / "results"),
                                   "ga.population": 4, "ga.generations": 2, "ga.elites": 1})
    with RunStore(store) as db:
        run, evaluations = db.run(run_id), db.evaluations(run_id)
    assert run["method"] == "biotune" and {k: run["config"]["ga"][k.split(".")[1]] for k in
                                           BIOTUNE_VARIANTS["biotune_robust"]} == BIOTUNE_VARIANTS["biotune_robust"]
    assert all(mask[-1] == 1 for mask in evaluations["trained"])  # the head is never frozen
    assert (evaluations["role"] == "final_select").any()  # rescore_top_k reached the evaluator
    assert set(validated) == {48}  # the smoke preset's whole validation split, on both folds
    again = run_method("biotune_robust", preset="smoke", store=store, progress=False,
                       overrides={"data.root": str(tmp_path / "data"), "results_dir": str(tmp_path / "results"),
                                  "ga.population": 4, "ga.generations": 2, "ga.elites": 1})
    assert again == run_id  # the named variant is found again in the store: a study reuses it
