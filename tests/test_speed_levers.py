"""The speed levers of fitness evaluations: the frozen-prefix activation cache (exact) and
pruning (approximate), checked on their mechanism."""
import copy
import dataclasses
import importlib

import pytest
import torch

import biotune
from biotune import config as cfg
from biotune import pruning
from biotune.data import make_folds
from biotune.experiment import load_inputs
from biotune.genome import FineTunePlan
from biotune.prefix_cache import HIT, MISS, NOT_APPLICABLE, PrefixCache
from biotune.train import TrainResult, train


def plan_for(model, first_trained: int) -> FineTunePlan:
    names = tuple(b.name for b in model.blocks)
    return FineTunePlan(multipliers={name: 1.0 + i for i, name in enumerate(names[first_trained:])},
                        block_names=names)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """EfficientNet-Lite0 with its ImageNet weights on small synthetic images: a real timm network."""
    root = tmp_path_factory.mktemp("lite0")
    config = cfg.resolve("smoke", overrides={
        "model.name": "tf_efficientnet_lite0", "model.weights": "imagenet", "data.image_size": 32,
        "data.root": str(root), "train.max_epochs": 3, "train.patience": 3,
        "data.options": {"num_classes": 3, "num_train": 96, "num_val": 48, "num_test": 16, "size": 32}})
    model, dataset = load_inputs(config)
    return config, model, dataset, make_folds(dataset.train.labels, dataset.val.labels, 0.5)


@pytest.mark.parametrize("first_trained", [0, 5, 9])  # nothing frozen, a long prefix, all but the head
def test_the_prefix_cache_gives_the_same_epochs_as_the_whole_network(lite0, first_trained):
    config, model, dataset, folds = lite0
    plan = plan_for(model, first_trained)
    cache = PrefixCache(model, dataset, folds, config.train)
    prefix, status = cache.get(plan, 0)
    assert status == (NOT_APPLICABLE if first_trained == 0 else MISS)
    runs = [train(model, dataset, plan, config.train, 0, prefix=cached, train_idx=folds[0].train_idx,
                  val_idx=folds[0].val_idx, progress=False) for cached in (None, prefix)]
    whole, cut = (run.history for run in runs)
    assert len(whole) == len(cut) == 3
    for a, b in zip(whole, cut):
        assert b["val_macro_acc"] == pytest.approx(a["val_macro_acc"], abs=0.02)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3, abs=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3, abs=1e-4)
    assert cache.get(plan, 0)[1] == (NOT_APPLICABLE if first_trained == 0 else HIT)
    assert cache.get(plan, 1)[1] == (NOT_APPLICABLE if first_trained == 0 else MISS)  # another fold


def test_channels_last_gives_the_same_first_epoch_as_nchw(lite0):
    """One step, from the same weights: its training loss differs only by rounding. After it,
    Adam's normalised first step (about lr for every weight, whatever its gradient's size) lets
    rounding move a weight by a whole step, so the validation loss agrees more loosely, and later
    epochs part (the chaos that moves the bench's accuracies, docs/performance.md)."""
    config, model, dataset, folds = lite0
    names = tuple(b.name for b in model.blocks)
    plan = FineTunePlan(multipliers=dict.fromkeys(names, 1.0), block_names=names)  # every block trained
    one_step = dataclasses.replace(config.train, max_epochs=1, batch_size=len(folds[0].train_idx))
    nchw, nhwc = (train(model, dataset, plan, dataclasses.replace(one_step, channels_last=flag), 0,
                        train_idx=folds[0].train_idx, val_idx=folds[0].val_idx, progress=False).history[0]
                  for flag in (False, True))
    assert nhwc["train_loss"] == pytest.approx(nchw["train_loss"], rel=1e-4)
    assert nhwc["val_loss"] == pytest.approx(nchw["val_loss"], rel=5e-3)


def test_channels_last_off_reaches_every_forward_of_a_final_protocol(tmp_path, smoke_config, monkeypatch):
    """Training, validation, the test split and a method's test report (AdaFilter's gate usage)."""
    trainer = importlib.import_module("biotune.train")  # the module; ``biotune.train`` is the function
    requested, memory_format = [], trainer.memory_format
    monkeypatch.setattr(trainer, "memory_format", lambda flag: requested.append(flag) or memory_format(flag))
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results"),
                 "train.channels_last": False}
    run_id, finals = biotune.run_baseline("adafilter", preset="smoke", store=tmp_path / "runs.sqlite",
                                          overrides=overrides, grid=[{}], progress=False)
    assert (tmp_path / "results" / run_id / "gate_usage.csv").is_file()
    assert requested and not any(requested)


def test_the_prefix_cache_is_not_used_where_it_would_not_be_exact(lite0, smoke_config, smoke_inputs):
    config, model, dataset, folds = lite0
    plan = plan_for(model, 5)
    released_bn = dataclasses.replace(config.train, frozen_bn="train")  # frozen BatchNorm keeps learning
    assert PrefixCache(model, dataset, folds, released_bn).get(plan, 0) == (None, NOT_APPLICABLE)
    switched_off = dataclasses.replace(config.train, prefix_cache=False)
    assert PrefixCache(model, dataset, folds, switched_off).get(plan, 0) == (None, NOT_APPLICABLE)

    noisy = copy.deepcopy(model)  # dropout inside the prefix: training would not see the cached values
    noisy.net.blocks[0] = torch.nn.Sequential(noisy.net.blocks[0], torch.nn.Dropout(0.5))
    assert PrefixCache(noisy, dataset, folds, config.train).get(plan, 0) == (None, NOT_APPLICABLE)

    prefix, _ = PrefixCache(model, dataset, folds, config.train).get(plan, 0)
    with pytest.raises(ValueError, match="plain fitness runs only"):  # a method may wrap the prefix (LoRA)
        train(model, dataset, plan, config.train, 0, method=biotune.methods.get_method("lora"), prefix=prefix)


def test_eviction_keeps_the_cache_within_its_budget(lite0):
    config, model, dataset, folds = lite0
    one = PrefixCache(model, dataset, folds, config.train)
    sizes = {k: one.get(plan_for(model, k), 0)[0].nbytes for k in (2, 3, 4)}
    cache = PrefixCache(model, dataset, folds, config.train)
    cache.budget = sizes[2] + sizes[3]  # room for any two of the three, not for all
    for k in (2, 3, 4):
        cache.get(plan_for(model, k), 0)
        assert cache.nbytes <= cache.budget
    assert list(cache.entries) == [(0, 3), (0, 4)]  # the least recently used went first
    assert cache.get(plan_for(model, 2), 0)[1] == MISS and list(cache.entries) == [(0, 4), (0, 2)]
    cache.budget = 1024  # a prefix larger than the whole budget is not computed at all
    assert cache.get(plan_for(model, 5), 0) == (None, NOT_APPLICABLE)


def test_a_search_records_prefix_cache_use_per_evaluation(tmp_path, smoke_config):
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results"),
                 "ga.generations": 2, "ga.population": 4}
    result = biotune.search(preset="smoke", store=tmp_path / "runs.sqlite", overrides=overrides, progress=False)
    seen = result.evaluations["prefix_cache"]
    assert set(seen) <= {HIT, MISS, NOT_APPLICABLE} and (seen == MISS).any()
    trained = result.evaluations[result.evaluations["train_runs"] > 0]
    frozen_first = trained["trained"].map(lambda mask: mask[0] == 0)
    assert (trained.loc[frozen_first, "prefix_cache"] != NOT_APPLICABLE).all()
    assert (trained.loc[~frozen_first, "prefix_cache"] == NOT_APPLICABLE).all()


# -- pruning ------------------------------------------------------------------------------------


def fake_run(history: list[float]):
    """A training run whose validation macro accuracy per epoch is ``history``; it asks
    ``stop_early`` after every epoch but the last, as the trainer does."""
    def train_run(stop_early):
        result = TrainResult(status="ok", best_epoch=0, epochs=0, val={})
        for epoch, value in enumerate(history):
            result.history.append({"val_macro_acc": value})
            result.epochs = epoch + 1
            if epoch + 1 < len(history) and stop_early(epoch, max(history[:epoch + 1])):
                result.status = "pruned"
                break
        return result

    return train_run


def run_pruned(pruner, fold: int, history: list[float]) -> TrainResult:
    """A run compared with the fold's runs so far, then added to them, as a batch of one is."""
    result = fake_run(history)(pruner.snapshot(fold).stop_early())
    pruner.add(fold, [{"status": result.status, "history": [h["val_macro_acc"] for h in result.history]}])
    return result


def test_pruning_stops_a_clearly_worse_run_and_never_a_better_one():
    pruner = pruning.Pruner(cfg.GAConfig(prune=True, prune_warmup=3, prune_percentile=50.0))
    for history in ([0.70, 0.80, 0.85], [0.72, 0.82, 0.86], [0.68, 0.79, 0.84]):
        assert run_pruned(pruner, 0, history).status == "ok"  # the warm-up runs are never pruned
    worse = run_pruned(pruner, 0, [0.30, 0.40, 0.50])
    assert worse.status == "pruned" and worse.epochs == 1
    better = run_pruned(pruner, 0, [0.75, 0.85, 0.90])
    assert better.status == "ok" and better.epochs == 3
    assert run_pruned(pruner, 1, [0.30, 0.40, 0.50]).status == "ok"  # another fold: its own warm-up


def test_runs_of_one_batch_are_compared_with_the_runs_before_it_only():
    pruner = pruning.Pruner(cfg.GAConfig(prune=True, prune_warmup=3, prune_percentile=50.0))
    snapshot = pruner.snapshot(0)  # a batch starts: nothing finished on the fold yet
    for history in ([0.70, 0.80, 0.85], [0.72, 0.82, 0.86], [0.68, 0.79, 0.84]):
        pruner.add(0, [{"status": "ok", "history": history}])
    # the batch's fourth run still sees no finished run, whatever order its runs finish in
    assert fake_run([0.30, 0.40, 0.50])(snapshot.stop_early()).status == "ok"
    assert fake_run([0.30, 0.40, 0.50])(pruner.snapshot(0).stop_early()).status == "pruned"


def test_a_pruned_evaluation_is_stored_as_pruned_and_resumes_to_the_same_search(tmp_path, smoke_config,
                                                                              interrupted_search):
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results"), "ga.prune": True,
                 "ga.prune_warmup": 4, "ga.prune_percentile": 90.0, "ga.generations": 3, "ga.population": 4,
                 "train.max_epochs": 3, "train.patience": 3, "ga.cache": False}
    reference = biotune.search(preset="smoke", store=tmp_path / "reference.sqlite", overrides=overrides, progress=False)
    assert (reference.evaluations["status"] == "pruned").any()
    pruned = reference.evaluations[reference.evaluations["status"] == "pruned"].iloc[0]
    assert pruned["fitness"] == pytest.approx(1 - pruned["val_macro_acc"])  # the fitness it had reached
    assert min(s["epochs"] for s in pruned["per_seed"]) < 3

    # past generation 0's checkpoint: the resumed pruner must also see the runs before it
    store, run_id = interrupted_search(overrides, after_runs=11)
    resumed = biotune.search(resume=run_id, store=store, progress=False)
    columns = ["seq", "genes", "fold", "status", "fitness", "train_runs"]
    assert resumed.evaluations[columns].to_dict("records") == reference.evaluations[columns].to_dict("records")


@pytest.mark.parametrize("searcher", ["random", "tpe"])
def test_the_searchers_prune_by_the_same_rule(tmp_path, smoke_config, searcher):
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results"), "ga.prune": True,
                 "ga.prune_warmup": 4, "ga.prune_percentile": 90.0, "ga.generations": 3, "ga.population": 4,
                 "train.max_epochs": 3, "train.patience": 3, "ga.searcher": searcher}
    result = biotune.search(preset="smoke", store=tmp_path / "runs.sqlite", overrides=overrides, progress=False)
    pruned = result.evaluations[result.evaluations["status"] == "pruned"]
    assert len(pruned) and (pruned["fitness"] == 1 - pruned["val_macro_acc"]).all()


def test_the_bench_measures_every_path_on_the_same_genomes_and_writes_the_summary(tmp_path, smoke_config):
    import json

    from biotune.bench import PATHS, run_bench

    table, summary = run_bench("smoke", evaluations=1, json_file=tmp_path / "bench.json",
                               overrides=[f"data.root={smoke_config.data.root}", "train.max_epochs=2"])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["summary"] == summary
    assert {"speedup_vs_plain_loop", "speedup_vs_levers_off", "max_abs_val_macro_acc_diff"} <= set(summary)
    assert {(row["path"], row["genome"]) for row in saved["rows"]} == {
        (path, genome) for path in PATHS for genome in ("full fine-tuning", "random genome 1")}
    assert all(row["seconds"] > 0 and row["train_images"] > 0 for row in saved["rows"])
    assert all(row["images_per_s"] == pytest.approx(row["train_images"] / row["seconds"]) for row in saved["rows"])
    # the plain loop trains the same recipe: the same epochs and images as the levers-off evaluator
    by_path = table.set_index(["genome", "path"])
    for genome in ("full fine-tuning", "random genome 1"):
        assert by_path.loc[(genome, "plain loop"), "train_images"] == by_path.loc[(genome, "levers off"), "train_images"]
    assert summary["max_abs_val_macro_acc_diff"] <= 0.05


def test_the_train_step_probe_times_every_variant(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_step.py"
    subprocess.run([sys.executable, str(script), "--preset", "smoke", "--steps", "2", "--no-compile",
                    "--json", str(tmp_path / "step.json")], check=True, capture_output=True, timeout=300)
    saved = json.loads((tmp_path / "step.json").read_text())
    assert [row["variant"] for row in saved["rows"]] == ["NCHW", "channels_last", "channels_last + fused Adam"]
    assert all(row["ms_per_step"] > 0 for row in saved["rows"]) and saved["rows"][0]["speedup_vs_nchw"] == 1
    assert saved["channels_last_profile"] and sum(e["share"] for e in saved["channels_last_profile"]) <= 1.001
