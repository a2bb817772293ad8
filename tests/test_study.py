"""The multi-seed study: statistics against hand-computed values, matched cells, a smoke study
that writes its tables and continues without retraining."""
import json

import numpy as np
import pandas as pd
import pytest

from biotune import stats
from biotune.study import cell_overrides, run_study, study_cells


def test_a_student_t_interval_below_five_values():
    low, high, how = stats.interval([0.80, 0.82, 0.84])
    half = 4.302652729749462 * 0.02 / np.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert how == "Student t" and (low, high) == pytest.approx((0.82 - half, 0.82 + half))


def test_a_bootstrap_interval_from_five_values_and_degenerate_cases():
    low, high, how = stats.interval([0.70, 0.80, 0.81, 0.85, 0.90])
    assert how == "bootstrap percentile" and 0.70 <= low < 0.812 < high <= 0.90
    assert stats.interval([0.5]) [2] == "none (one value)" and np.isnan(stats.interval([0.5])[0])
    assert stats.interval([0.5, 0.5, 0.5]) == (0.5, 0.5, "none (equal values)")


def test_paired_comparison_counts_and_wilcoxon_by_hand():
    # six positive differences: every sign pattern has probability 2**-6, two-sided exact p = 2 / 64
    result = stats.compare(np.array([0.81, 0.82, 0.83, 0.84, 0.85, 0.86]), np.full(6, 0.80))
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (6, 0, 0, 6)
    assert result["p_value"] == pytest.approx(2 / 64) and result["mean_diff"] == pytest.approx(0.035)
    # ranks 1, 2, 3 with signs +, -, +: W+ = 4; P(W+ <= 2) = 3/8, so p = 0.75; a tie counts apart
    mixed = stats.compare(np.array([0.51, 0.48, 0.53, 0.60]), np.array([0.50, 0.50, 0.50, 0.60]))
    assert (mixed["wins"], mixed["ties"], mixed["losses"]) == (2, 1, 1) and mixed["p_value"] == pytest.approx(0.75)


def test_paired_table_matches_cells_per_dataset_and_over_all():
    cells = pd.DataFrame({"dataset": ["a"] * 4 + ["b"] * 4, "seed": [0, 0, 1, 1] * 2,
                          "method": ["biotune", "full"] * 4,
                          "acc": [0.9, 0.8, 0.7, 0.75, 0.6, 0.5, 0.65, 0.55]})
    table = stats.paired(cells, "acc", ["full"]).set_index("dataset")
    assert table.loc["a", "wins"] == 1 and table.loc["a", "losses"] == 1
    assert table.loc["all", "n"] == 4 and table.loc["all", "mean_diff"] == pytest.approx((0.1 - 0.05 + 0.1 + 0.1) / 4)
    summary = stats.summarize(cells, "acc").set_index(["dataset", "method"])
    assert summary.loc[("b", "full"), "mean"] == pytest.approx(0.525) and summary.loc[("b", "full"), "n"] == 2


def test_a_seed_is_one_matched_cell_for_every_method():
    cell = cell_overrides(2, "cpu", {"train.max_epochs": 1})
    assert cell == {"train.max_epochs": 1, "ga.seed": 2, "data.split_seed": 2, "train.seeds": [686]}
    assert cell_overrides(0, "paper")["train.seeds"] == [684, 559, 629]  # cell 0 is the preset's own run
    cells = study_cells(["a", "b"], ["biotune", "full"], 2)
    assert cells["seed"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # seed-major: a stopped study has whole cells


@pytest.mark.slow
def test_a_smoke_study_writes_its_tables_and_continues_without_retraining(tmp_path):
    from biotune.store import RunStore

    options = {"preset": "smoke", "overrides": {"data.root": str(tmp_path / "data"), "results_dir": str(tmp_path)}}
    tables, folder = run_study("smoke", ["synthetic", "digits"], ["biotune", "random", "full"], seeds=2, **options)
    assert folder == tmp_path / "study" / "smoke"
    assert {f.name for f in folder.glob("*.png")} == {"means.png", "paired_vs_full.png", "paired_vs_random.png"}
    for name, columns in (("rows", ["dataset", "method", "seed", "test_macro_acc", "val_macro_acc",
                                    "trainable_share", "seconds", "train_runs"]),
                          ("summary", ["dataset", "method", "n", "mean", "std", "ci_low", "ci_high"]),
                          ("paired", ["method", "reference", "n", "mean_diff", "ci_low", "ci_high", "wins", "ties",
                                      "losses", "p_value"])):
        written = pd.read_csv(folder / f"{name}.csv")
        assert set(columns) <= set(written.columns) and len(written) == len(tables[name])
    rows = tables["rows"]
    assert len(rows) == 12 and (rows["status"] == "ok").all() and rows["test_macro_acc"].between(0, 1).all()
    made = json.loads((folder / "provenance.json").read_text())  # what the published tables are stamped with
    assert made["command"].startswith("biotune study --name smoke --preset smoke --datasets synthetic digits")
    assert (made["commit"] is None or len(made["commit"]) == 40) and made["date"] and "torch threads" in made["machine"] and made["rows"] == 12
    with RunStore(tmp_path / "runs.sqlite") as store:
        trained = store.runs()["train_runs"].sum()
        # every method of a cell saw the same data subsample and folds
        configs = [store.run(run_id)["config"] for run_id in rows[rows["seed"] == 1]["run_id"]]
        assert {c["data"]["split_seed"] for c in configs} == {1} and {c["ga"]["seed"] for c in configs} == {1}
    (folder / "provenance.json").write_text(json.dumps({**made, "date": "a day before"}))
    again, _ = run_study("smoke", ["synthetic", "digits"], ["biotune", "random", "full"], seeds=2, **options)
    assert again["rows"]["run_id"].tolist() == rows["run_id"].tolist()
    assert json.loads((folder / "provenance.json").read_text())["date"] == "a day before"  # the rows did not change
    with RunStore(tmp_path / "runs.sqlite") as store:
        assert store.runs()["train_runs"].sum() == trained
    # a fresh machine: no run store, only the committed rows.csv; nothing trains, the tables are the same
    (tmp_path / "runs.sqlite").unlink()
    fresh, _ = run_study("smoke", ["synthetic", "digits"], ["biotune", "random", "full"], seeds=2, **options)
    assert not (tmp_path / "runs.sqlite").exists() or RunStore(tmp_path / "runs.sqlite").runs().empty
    pd.testing.assert_frame_equal(fresh["summary"], tables["summary"])
    # another setup (a changed recipe) does not reuse those rows
    changed = {**options, "overrides": {**options["overrides"], "train.base_lr": 0.01}}
    other, _ = run_study("smoke", ["synthetic"], ["full"], seeds=1, **changed)
    assert other["rows"]["run_id"].tolist() != rows.query("dataset == 'synthetic' and method == 'full'")["run_id"][:1].tolist()


@pytest.mark.slow
def test_a_study_of_a_users_own_npz_from_the_command_line(tmp_path, capsys):
    from biotune.cli import main

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (90, 12, 12), dtype=np.uint8), np.arange(90) % 3
    images[labels == 1, :6] = 255  # learnable: a bright top half for class 1
    np.savez(tmp_path / "mine.npz", train_images=images, train_labels=labels)
    code = main(["--results-dir", str(tmp_path / "results"), "study", "--datasets", str(tmp_path / "mine.npz"),
                 "--methods", "biotune", "full", "--references", "full", "--seeds", "2", "--preset", "smoke",
                 "--data.root", str(tmp_path / "data")])
    assert code == 0
    out = capsys.readouterr().out
    assert "mean_diff" in out and "tables and figures:" in out
    rows = pd.read_csv(tmp_path / "results" / "study" / "smoke" / "rows.csv")
    assert len(rows) == 4 and set(rows["dataset"]) == {str(tmp_path / "mine.npz")} and (rows["status"] == "ok").all()


def test_differences_equal_in_exact_arithmetic_are_ties():
    result = stats.compare(np.array([0.9, 0.8, 0.7]), np.array([0.85, 0.75, 0.6]))  # 0.05, 0.05, 0.1 exactly
    assert result["ties"] == 0 and result["p_value"] == pytest.approx(stats.compare(
        np.array([0.05, 0.05, 0.1]), np.zeros(3))["p_value"])


def test_a_setup_key_that_looks_like_a_number_is_read_back_as_text(tmp_path):
    from biotune.study import ROW_COLUMNS, _rows

    file = tmp_path / "rows.csv"
    pd.DataFrame([{"dataset": "digits", "method": "full", "seed": 0, "status": "ok", "setup": "120e45678901",
                   "run_id": "1"}], columns=ROW_COLUMNS).to_csv(file, index=False)
    assert len(_rows(file, "120e45678901")) == 1


def test_the_setup_key_ignores_the_executor_in_either_spelling_and_is_what_it_was_before_the_rename():
    from biotune.study import setup_key

    results = {"ga.population": 4, "train.max_epochs": 2}
    # computed by the code before the executor's settings moved from `run` to `executor` (issue 22);
    # a bump of store.RESULTS_VERSION changes it on purpose
    before = "ae1d043a3da8"
    assert setup_key("cpu", "tiny_cnn", results) == before
    with_old = {**results, "run.executor": "process", "run.workers": 2}
    with_new = {**results, "executor.kind": "process", "executor.workers": 2}
    assert setup_key("cpu", "tiny_cnn", with_old) == setup_key("cpu", "tiny_cnn", with_new) == before
    assert setup_key("cpu", "tiny_cnn", {**results, "ga.population": 5}) != before  # what changes results counts
