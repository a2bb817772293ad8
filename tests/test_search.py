"""End to end on the smoke preset: search, outputs, resume after kill -9, cache, failures, final."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

import biotune
from biotune import fitness
from biotune.store import RunNotFoundError, RunStore


@pytest.fixture()
def smoke(tmp_path, smoke_config):
    """Keyword arguments for a smoke run writing into this test's own folder."""
    return {"preset": "smoke", "store": tmp_path / "runs.sqlite",
            "overrides": {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}}


def comparable(frame):
    return frame[["seq", "generation", "role", "fold", "genes", "fitness", "status"]].to_dict("records")


def test_smoke_search_leaves_every_output(smoke):
    result = biotune.search(**smoke, progress=False)
    folder = result.folder
    for name in ("config.json", "meta.json", "evaluations.csv", "generations.csv", "recipe.json",
                 "convergence.png", "checkpoint.json"):
        assert (folder / name).is_file(), name
    n, t, e = 3, 1, 1
    assert len(result.evaluations) == n + t * (n + e)
    assert result.evaluations["fitness"].min() == pytest.approx(result.best_fitness)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0] or meta["versions"]["torch"]
    assert "git_commit" in meta and "device" in meta
    recipe = json.loads((folder / "recipe.json").read_text())
    assert [b["name"] for b in recipe["blocks"]] == ["stem", "stage1", "stage2", "head"]
    with RunStore(smoke["store"]) as store:
        assert store.run(result.run_id)["status"] == "finished"
        assert store.runs()["run_id"].tolist() == [result.run_id]
        logbook = store.generations(result.run_id)
        assert logbook["generation"].tolist() == [-1, 0]
        assert {"best", "mean", "std", "worst", "diversity", "best_so_far"} <= set(logbook.columns)
        assert logbook["best_so_far"].iloc[-1] == pytest.approx(result.best_fitness)


def test_recipe_reaches_a_fresh_model_s_optimizer(smoke):
    result = biotune.search(**smoke, progress=False)
    net = biotune.create_model("tiny_cnn", 3, weights=None).net
    groups = biotune.apply_recipe(net, result.folder / "recipe.json", base_lr=1e-3)
    trained = {b["name"]: b["lr_multiplier"] for b in result.recipe["blocks"] if b["lr_multiplier"] is not None}
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx({k: 1e-3 * v for k, v in trained.items()})
    optimizer = torch.optim.SGD(groups)
    assert len(optimizer.param_groups) == len(trained)
    frozen = [b for b in result.recipe["blocks"] if b["lr_multiplier"] is None]
    for block in frozen:
        for module in block["modules"]:
            assert not any(p.requires_grad for p in net.get_submodule(module).parameters())


def test_resume_after_kill_minus_9_ends_like_an_uninterrupted_run(smoke, tmp_path):
    # enough images that one evaluation takes about 0.1 s, so the kill lands mid-search
    overrides = {**smoke["overrides"], "ga.generations": 3, "ga.population": 4, "train.max_epochs": 3,
                 "train.patience": 3, "data.options": {"num_classes": 3, "num_train": 1200, "num_val": 96,
                                                       "num_test": 48, "size": 16}}
    reference = biotune.search(preset="smoke", store=tmp_path / "reference.sqlite", overrides=overrides,
                               progress=False)
    store_path = tmp_path / "killed.sqlite"
    command = [sys.executable, "-m", "biotune", "--store", str(store_path), "--results-dir",
               overrides["results_dir"], "search", "--preset", "smoke", "--quiet",
               *[f"--{k}={json.dumps(v)}" for k, v in overrides.items() if "." in k]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed_at = 0
    while time.time() < deadline and process.poll() is None:
        if store_path.exists():
            try:
                with sqlite3.connect(store_path) as db:
                    killed_at = db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0]
            except sqlite3.OperationalError:
                killed_at = 0
            if killed_at >= 7:  # past initialisation, inside generation 0
                os.kill(process.pid, signal.SIGKILL)
                break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run should have been killed mid-search"
    with RunStore(store_path) as store:
        run_id = store.runs()["run_id"].iloc[0]
        assert store.run(run_id)["status"] == "running"
        before = len(store.evaluations(run_id))
    assert 7 <= before < len(reference.evaluations)

    resumed = biotune.search(resume=run_id, store=store_path, progress=False)
    assert comparable(resumed.evaluations) == comparable(reference.evaluations)
    assert resumed.best_genes == reference.best_genes
    assert resumed.evaluations["train_runs"].sum() == reference.evaluations["train_runs"].sum()


def test_a_cache_hit_trains_nothing(smoke_config, smoke_inputs, tmp_path, monkeypatch):
    model, dataset = smoke_inputs
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.create_run("r", kind="search", method="biotune", config=smoke_config.to_dict(), meta={})
        folds = biotune.make_folds(dataset.train.labels, dataset.val.labels, 0.5)
        evaluate = fitness.Evaluator(model=model, dataset=dataset, folds=folds, config=smoke_config,
                                     store=store, run_id="r", progress=False)
        trainings = []
        real_train = fitness.train
        monkeypatch.setattr(fitness, "train", lambda *a, **k: trainings.append(1) or real_train(*a, **k))
        genes = [0.9, 0.8, 0.7, 0.6, 0.1]
        first = evaluate(genes, fold=0, generation=0, individual=0, role="init")
        assert len(trainings) == 1
        again = evaluate(genes, fold=0, generation=0, individual=1, role="init")
        assert len(trainings) == 1 and again == first
        other_fold = evaluate(genes, fold=1, generation=1, individual=0, role="init")
        assert len(trainings) == 2 and other_fold <= 1.0
        rows = store.evaluations("r")
        assert rows["cache_hit"].tolist() == [False, True, False]
        assert rows["train_runs"].tolist() == [1, 0, 1]
        nothing = evaluate([0.1, 0.1, 0.1, 0.1, 0.9], fold=0, generation=0, individual=2, role="init")
        assert nothing == 1.0 and len(trainings) == 2
        assert store.evaluations("r")["status"].iloc[-1] == "no_trained_block"


def test_diverging_runs_are_recorded_as_failed_and_the_search_goes_on(smoke):
    overrides = {**smoke["overrides"], "train.base_lr": 1e20}
    result = biotune.search(preset="smoke", store=smoke["store"], overrides=overrides, progress=False)
    statuses = set(result.evaluations["status"])
    assert "diverged" in statuses
    assert (result.evaluations.query("status == 'diverged'")["fitness"] == 1.0).all()
    assert len(result.evaluations) == 3 + 1 * (3 + 1)


def test_final_protocol_and_baselines_and_compare(smoke):
    result = biotune.search(**smoke, progress=False)
    finals = biotune.final(result.run_id, store=smoke["store"], progress=False)
    assert len(finals) == 1 and finals["status"].iloc[0] == "ok"
    assert 0 <= finals["test_macro_acc"].iloc[0] <= 1
    assert finals["trainable_share"].iloc[0] == pytest.approx(result.recipe["trainable_share"])
    full_id, full = biotune.run_baseline("full", **smoke, progress=False)
    probe_id, probe = biotune.run_baseline("linear_probe", **smoke, progress=False)
    assert full["trainable_share"].iloc[0] == pytest.approx(1.0)
    assert 0 < probe["trainable_share"].iloc[0] < 0.2
    table = biotune.compare([result.run_id, full_id, probe_id], store=smoke["store"])
    assert table["method"].tolist() == ["biotune", "full", "linear_probe"]
    assert table["train_runs"].tolist() == [len(result.evaluations) + 1, 1, 1]
    assert all("±" in v for v in table["test_macro_acc"])


def test_bad_input_fails_early_with_clear_messages(smoke, tmp_path):
    with pytest.raises(RunNotFoundError, match="no run 'nope'.*biotune runs"):
        biotune.final("nope", store=tmp_path / "empty.sqlite")
    with pytest.raises(KeyError, match="unknown dataset 'fashion_mnsit'.*fashion_mnist"):
        biotune.search(**{**smoke, "overrides": {**smoke["overrides"], "data.dataset": "fashion_mnsit"}})
    with RunStore(smoke["store"]) as store:
        assert store.runs().empty, "a run that could not start must leave no run behind"
    with pytest.raises(biotune.ConfigError, match="ga.elites must be"):
        biotune.search(**{**smoke, "overrides": {**smoke["overrides"], "ga.elites": 3}})
    with pytest.raises(biotune.ConfigError, match="unknown config key ga.populaton"):
        biotune.search(**{**smoke, "overrides": {**smoke["overrides"], "ga.populaton": 3}})
    with pytest.raises(KeyError, match="unknown method 'loraa'.*full, l1_sp, l2_sp, linear_probe, lora"):
        biotune.run_baseline("loraa", **smoke)


def test_cli_describe_prints_the_paper_blocks(capsys):
    from biotune.cli import main

    assert main(["describe", "resnet50", "--num-classes", "102"]) == 0
    out = capsys.readouterr().out
    for block, count in [("conv1+bn1", "9,536"), ("layer1", "215,808"), ("layer2", "1,219,584"),
                         ("layer3", "7,098,368"), ("layer4", "14,964,736"), ("fc", "208,998")]:
        assert block in out and count in out
    assert "23,717,030" in out


def test_cli_reports_bad_input_without_a_traceback(capsys, tmp_path):
    from biotune.cli import main

    assert main(["--store", str(tmp_path / "s.sqlite"), "final", "missing"]) == 2
    assert "no run 'missing'" in capsys.readouterr().err
    assert main(["search", "--preset", "smoke", "--ga.population", "2", "--ga.elites", "2"]) == 2
    assert "ga.elites" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--preset", "smoke", "--bogus"])


def test_rescore_top_k_re_evaluates_the_best_distinct_recipes_on_every_fold(smoke):
    overrides = {**smoke["overrides"], "ga.final_selection": "rescore_top_k", "ga.rescore_k": 2}
    result = biotune.search(preset="smoke", store=smoke["store"], overrides=overrides, progress=False)
    rescored = result.evaluations[result.evaluations["role"] == "final_select"]
    assert len(result.evaluations) == 3 + 1 * (3 + 1) + 2 * 2  # the search, then k genomes x 2 folds
    assert rescored["generation"].unique().tolist() == [1] and sorted(rescored["fold"]) == [0, 0, 1, 1]
    means = rescored.groupby(rescored["genes"].map(tuple), sort=False)["fitness"].mean()
    assert result.best_fitness == pytest.approx(means.min())
    assert tuple(result.best_genes) == means.idxmin()  # on a tie, the candidate that searched better
    with RunStore(smoke["store"]) as store:
        run = store.run(result.run_id)
    assert run["result"]["final_selection"] == "rescore_top_k" and len(run["result"]["rescored"]) == 2
    assert run["result"]["evaluations"] == len(result.evaluations)
    again = biotune.search(resume=result.run_id, store=smoke["store"], progress=False)  # replays, trains nothing
    assert again.best_genes == result.best_genes
    assert comparable(again.evaluations) == comparable(result.evaluations)


def test_a_failed_resume_keeps_a_finished_run_finished_and_says_the_way_out(smoke):
    result = biotune.search(**smoke, progress=False)
    checkpoint = result.folder / "checkpoint.json"
    checkpoint.write_text("{not json")
    with pytest.raises(ValueError, match="checkpoint.json is not a readable BioTune checkpoint.*mv "):
        biotune.search(resume=result.run_id, store=smoke["store"], progress=False)
    with RunStore(smoke["store"]) as store:
        assert store.run(result.run_id)["status"] == "finished"
    checkpoint.rename(checkpoint.with_suffix(".bad"))  # the way out the message gives: replay from the start
    replayed = biotune.search(resume=result.run_id, store=smoke["store"], progress=False)
    assert comparable(replayed.evaluations) == comparable(result.evaluations)
    assert replayed.best_genes == result.best_genes


def test_resume_refuses_settings_it_would_ignore(smoke):
    result = biotune.search(**smoke, progress=False)
    with pytest.raises(biotune.ConfigError, match=f"--resume {result.run_id} .* takes no --ga.population 8"):
        biotune.search(resume=result.run_id, store=smoke["store"], overrides={"ga.population": 8})
    with pytest.raises(biotune.ConfigError, match="takes no --dataset digits, --preset cpu"):
        biotune.search("digits", preset="cpu", resume=result.run_id, store=smoke["store"])


def test_a_dataset_path_gives_its_stem_to_the_run_id():
    from biotune.bookkeeping import new_run_id

    assert "-biotune-my_scans-" in new_run_id("biotune", "/data/x/my scans.npz")
    assert "-biotune-images-" in new_run_id("biotune", "data/images/")
    assert "-full-digits-" in new_run_id("full", "digits")


def test_an_evaluation_and_its_cache_entry_are_committed_together(tmp_path, smoke_config):
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.create_run("r", kind="search", method="biotune", config=smoke_config.to_dict(), meta={})
        with pytest.raises(sqlite3.Error):  # the evaluation row fails: its cache entry must not stay
            store.add_evaluation("r", {"seq": 0, "no_such_column": 1}, cached=("key", {"fitness": 0.5}))
        assert store.cached("r", "key") is None


@pytest.mark.parametrize("content", [b"this is not a database\n" * 10, None])
def test_a_store_that_is_not_sqlite_or_is_truncated_is_refused(tmp_path, smoke_config, content):
    from biotune.store import StoreError

    path = tmp_path / "runs.sqlite"
    if content is None:  # a real store cut short, as a copy interrupted half-way leaves it
        with RunStore(path) as store:
            store.create_run("r", kind="search", method="biotune", config=smoke_config.to_dict(), meta={})
            for seq in range(200):
                store.add_evaluation("r", {"seq": seq, "generation": 0, "individual": 0, "role": "init",
                                           "fold": 0, "genes": [0.5] * 50, "trained": [1], "multipliers": {},
                                           "status": "ok", "fitness": 0.5, "per_seed": [], "train_runs": 1,
                                           "cache_hit": 0, "seconds": 1.0})
        content = path.read_bytes()[: len(path.read_bytes()) // 2]
        for leftover in tmp_path.glob("runs.sqlite-*"):
            leftover.unlink()
    path.write_bytes(content)
    with pytest.raises(StoreError, match="runs.sqlite is not a readable run store.*--store"):
        RunStore(path)


def test_resuming_a_finished_run_whose_folder_was_removed_rewrites_it(smoke):
    import shutil

    result = biotune.search(**smoke, progress=False)
    shutil.rmtree(result.folder)
    again = biotune.search(resume=result.run_id, store=smoke["store"], progress=False)
    assert (again.folder / "recipe.json").is_file() and again.best_genes == result.best_genes
    with RunStore(smoke["store"]) as store:
        assert store.run(result.run_id)["status"] == "finished"


def test_a_run_stored_with_amp_true_is_reused_by_an_auto_config_of_a_bf16_model(tmp_path):
    """train.amp was a bool before "auto": such a run is the same run where the model's registered
    precision is bf16 (ResNet-50), another one where it is not (Lite0)."""
    from biotune import config as cfg
    from biotune.store import RESULTS_VERSION, RunStore

    with RunStore(tmp_path / "s.sqlite") as store:
        for model in ("resnet50", "tf_efficientnet_lite0"):
            old = cfg.resolve("smoke", overrides={"model.name": model, "train.amp": True}).to_dict()
            store.create_run(f"old-{model}", kind="baseline", method="full", config=old,
                             meta={"results_version": RESULTS_VERSION})
        for model, reused in (("resnet50", True), ("tf_efficientnet_lite0", False)):
            new = cfg.resolve("smoke", overrides={"model.name": model}).to_dict()
            assert new["train"]["amp"] == "auto"
            assert (store.matching_run("full", new) is not None) == reused, model


def test_a_run_of_another_results_version_is_not_reused(tmp_path):
    """Code that computes other numbers for the same config (the float32 resize) bumps the version:
    a run stored before is trained again, not reused."""
    from biotune import config as cfg
    from biotune.store import RESULTS_VERSION, RunStore

    config = cfg.resolve("smoke").to_dict()
    with RunStore(tmp_path / "s.sqlite") as store:
        store.create_run("before", kind="baseline", method="full", config=config, meta={})  # no version: 1
        assert store.matching_run("full", config) is None
        store.create_run("now", kind="baseline", method="full", config=config, meta={"results_version": RESULTS_VERSION})
        assert store.matching_run("full", config)["run_id"] == "now"
