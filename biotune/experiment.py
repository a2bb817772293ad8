"""Runs end to end: a search, the final protocol (docs/algorithm.md §7), baselines, their outputs and comparisons.

Everything a run computes goes to the run store as it finishes; the run folder
``results/<run_id>/`` receives the resolved config, metadata, tidy CSV tables, the recipe,
the final results and a convergence figure (docs/algorithm.md §9).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from . import config as cfg
from .bookkeeping import (
    make_folder,
    new_run_id,
    refuse_changes_on_resume,
    resumed_config,
    run_dir,
    split_executor_settings,
    start_run,
    with_executor_settings,
)
from .data import check_batch_fits, load_dataset, make_folds
from .executors import TaskFailure, TrainingFailedError, make_executor
from .fitness import Evaluator
from .ga import BioTuneGA, GAResult, rescore_top_k
from .genome import decode, make_recipe, num_genes, recipe_table, save_recipe
from .gpus import training_device
from .methods import METHODS, PlanMethod
from .models import create_model, model_preprocess
from .plots import convergence
from .report import readable, summary
from .searchers import Searcher
from .store import RunStore
from .train import evaluate, resolve_amp

log = logging.getLogger(__name__)

def load_data(config: cfg.Config):
    """The dataset, stored for the model's input (data.store_at), without building the model."""
    preprocess = model_preprocess(config.model.name)
    if config.data.image_size:
        preprocess = preprocess.at_size(config.data.image_size)
    data = config.data
    check_batch_fits(preprocess, max(config.train.batch_size, config.train.eval_batch_size))
    return load_dataset(data.dataset, preprocess, root=data.root, download=data.download,
                        max_train=data.max_train, max_val=data.max_val, max_test=data.max_test,
                        val_fraction=data.val_fraction, seed=data.split_seed, store_at=data.store_at, cache=data.cache,
                        verify=data.verify, **data.options)


def load_inputs(config: cfg.Config):
    """The dataset (stored for the model's input) and the pretrained model with its new head.
    A preset that needs a GPU and finds none stops here, before the data loads."""
    training_device(config.executor, config.train)
    dataset = load_data(config)
    model = create_model(config.model.name, dataset.num_classes, weights=config.model.weights,
                         allow_download=config.model.allow_download)
    return model, dataset


def run_overrides(dataset, model, overrides, store) -> dict:
    """Dotted overrides plus the dataset, model and store given as their own arguments."""
    extra = cfg.parse_overrides(overrides or [])
    if dataset is not None:
        extra.setdefault("data", {})["dataset"] = dataset
    if model is not None:
        extra.setdefault("model", {})["name"] = model
    if store is not None:
        extra["store"] = str(store)
    return extra


# ---------------------------------------------------------------------------------------------
# Search


@dataclass
class SearchResult:
    run_id: str
    folder: Path
    best_genes: list
    best_fitness: float
    recipe: dict
    evaluations: pd.DataFrame
    generations: pd.DataFrame

    def __repr__(self) -> str:
        return (f"SearchResult(run_id={self.run_id!r}, best_fitness={self.best_fitness:.4f}, "
                f"recipe={recipe_table(self.recipe)})")


def search(dataset: str | None = None, model: str | None = None, preset: str | None = None, *,
           config_file: str | Path | None = None, overrides: list[str] | dict | None = None,
           resume: str | None = None, store: str | Path | None = None, progress: bool = True) -> SearchResult:
    """Run (or resume) a search and write its outputs; returns the best recipe.

    ``ga.searcher`` picks BioTune's GA (default) or a baseline at its budget (random, tpe, cmaes).
    ``preset`` defaults to ``cpu``; a resumed run keeps its stored config, so ``resume`` takes
    only the executor's overrides (``executor.*``: the results do not depend on them).
    ``biotune.search("digits", "tf_efficientnet_lite0", preset="cpu", overrides={"ga.population": 8})``
    """
    if resume is not None:
        return execute_search(prepare_resumed_search(resume, store, overrides, progress=progress, dataset=dataset,
                                                     model=model, preset=preset, config_file=config_file))
    config = cfg.resolve(preset or "cpu", config_file, run_overrides(dataset, model, overrides, store))
    make_folder(Path(config.results_dir), "the results folder", "--results-dir DIR")
    return execute_search(prepare_search(config, RunStore(config.store_path), progress=progress))


@dataclass
class PreparedSearch:
    """A search ready to execute: everything that can fail on bad input has run, and the store
    holds nothing new yet. ``resumed_from`` is the stored run's status when it is taken up again."""

    config: cfg.Config
    store: RunStore
    run_id: str
    folder: Path
    model: object
    evaluator: Evaluator
    loop: object  # BioTuneGA or Searcher: ``run() -> GAResult``
    n_folds: int
    resumed_from: str | None = None


def prepare_search(config: cfg.Config, store: RunStore, run_id: str | None = None, *,
                   progress: bool = True) -> PreparedSearch:
    """Inputs, folds, executor, evaluator and search loop of a run; with ``run_id``, the stored
    run taken up again: its loop restored from its checkpoint, and its evaluator told where to
    resume (the one explicit resume step)."""
    model, dataset = load_inputs(config)
    folds = make_folds(dataset.train.labels, dataset.val.labels, config.ga.train_split,
                       seed=config.data.split_seed, whole_val=config.ga.fitness_val == "whole")
    executor = make_executor(config.executor, config.train)
    try:
        evaluator = Evaluator(model=model, dataset=dataset, folds=folds, config=config, store=store,
                              run_id=run_id or new_run_id(config.ga.searcher, config.data.dataset),
                              progress=progress, executor=executor)
        folder = run_dir(config, run_id) if run_id is not None else Path(config.results_dir) / evaluator.run_id
        loop = _search_loop(config, evaluator, len(model.blocks), len(folds), folder, progress=progress)
        evaluator.start_at(loop.restore() if run_id is not None else 0)
    except BaseException:
        executor.close()
        raise
    resumed_from = store.run(run_id)["status"] if run_id is not None else None
    return PreparedSearch(config, store, evaluator.run_id, folder, model, evaluator, loop, len(folds), resumed_from)


def prepare_resumed_search(run_id: str, store: str | Path | None, overrides=None, *, progress: bool = True,
                           **given) -> PreparedSearch:
    """A stored search taken up again with its stored config: only ``executor.*`` overrides,
    anything else ``given`` (dataset, model, preset, config_file) is refused. The failed
    evaluations it stopped on are dropped, to be trained again."""
    config, store_obj = resumed_config(run_id, store)
    settings, other = split_executor_settings(overrides)
    refuse_changes_on_resume(f"--resume {run_id}", config, other, **given)
    config = with_executor_settings(config, settings)
    retrained = store_obj.drop_trailing_failures(run_id)
    if retrained:
        log.info("run %s: the %d failed evaluations it stopped on are trained again", run_id, retrained)
    return prepare_search(config, store_obj, run_id, progress=progress)


def execute_search(prepared: PreparedSearch) -> SearchResult:
    """Run the loop to its end (the final selection included) and write the outputs. A stopped
    search keeps its finished evaluations and is marked interrupted or failed (a finished run
    that is taken up again stays finished)."""
    config, store, run_id = prepared.config, prepared.store, prepared.run_id
    log.info("run %s: results in %s, store %s", run_id, prepared.folder, config.store_path)
    try:
        if prepared.resumed_from is None:
            start_run(config, store, kind="search", method=config.ga.searcher, run_id=run_id)
        store.set_status(run_id, "running")
        outcome = prepared.loop.run()
        if config.ga.final_selection == "rescore_top_k":
            outcome = _rescore_top_k(config, prepared.evaluator, store, run_id, prepared.n_folds, outcome)
        return _finish_search(config, store, run_id, prepared.folder, prepared.model, outcome)
    except KeyboardInterrupt:
        store.set_status(run_id, "finished" if prepared.resumed_from == "finished" else "interrupted")
        log.warning("run %s interrupted; finished evaluations are kept: biotune search --resume %s", run_id, run_id)
        raise
    except Exception:
        store.set_status(run_id, "finished" if prepared.resumed_from == "finished" else "failed")
        raise
    finally:
        prepared.evaluator.executor.close()


def _search_loop(config: cfg.Config, evaluator: Evaluator, num_blocks: int, n_folds: int, folder: Path, *,
                 progress: bool):
    """BioTune's GA, which resumes from its checkpoint, or a baseline searcher, which resumes by
    replaying its stored evaluations (searchers.py); either has ``restore()`` and ``run()``."""
    sizes = {"num_blocks": num_blocks, "num_genes": num_genes(num_blocks, config.ga.encoding),
             "config": config.ga, "n_folds": n_folds, "progress": progress}
    if config.ga.searcher != "biotune":
        return Searcher(config.ga.searcher, evaluator, **sizes)
    return BioTuneGA(evaluator, checkpoint_path=folder / "checkpoint.json", **sizes)


def _rescore_top_k(config: cfg.Config, evaluator: Evaluator, store: RunStore, run_id: str, n_folds: int,
                   outcome: GAResult) -> GAResult:
    """``ga.final_selection = rescore_top_k``: the k best distinct recipes the search trained
    (distinct decoded plans, each at the best fitness it reached) are evaluated on every fold,
    and the best mean wins. These evaluations are the run's last ones (generation T, role
    ``final_select``), so they count in its budget and replay on resume like any other."""
    evaluations = store.evaluations(run_id)
    trained = evaluations[(evaluations["status"] == "ok") & (evaluations["role"] != "final_select")]
    candidates, plans = [], set()
    for genes, fitness in trained.sort_values(["fitness", "seq"], kind="stable")[["genes", "fitness"]].itertuples(index=False):
        plan = decode(genes, evaluator.block_names, config.ga.encoding).key()
        if plan not in plans:
            plans.add(plan)
            candidates.append((genes, fitness))
    if not candidates:
        log.warning("run %s: no evaluation trained successfully; keeping the best-so-far genome", run_id)
        return outcome
    best, table = rescore_top_k(evaluator, candidates[: config.ga.rescore_k], n_folds=n_folds,
                                generation=config.ga.generations)
    log.info("run %s: re-scored %d genomes on %d folds; the best mean fitness is %.4f (search fitness %.4f)",
             run_id, len(table), n_folds, best["mean_fitness"], best["search_fitness"])
    return dataclasses.replace(outcome, best_genes=best["genes"], best_fitness=best["mean_fitness"],
                               evaluations=outcome.evaluations + len(table) * n_folds, selection=table)


def _finish_search(config, store: RunStore, run_id: str, folder: Path, model, outcome: GAResult) -> SearchResult:
    plan = decode(outcome.best_genes, [b.name for b in model.blocks], config.ga.encoding)
    recipe = make_recipe(plan, model, config.train.base_lr, run_id=run_id, genes=outcome.best_genes,
                         fitness=outcome.best_fitness, encoding=config.ga.encoding)
    save_recipe(recipe, folder / "recipe.json")
    evaluations = store.evaluations(run_id)
    generations = pd.DataFrame(outcome.logbook)
    store.export_csv(run_id, folder)
    generations.to_csv(folder / "generations.csv", index=False)
    figure = convergence(evaluations, generations, title=f"{run_id}: fitness = 1 - validation macro accuracy"
                         if config.ga.fitness == "acc" else f"{run_id}: fitness {config.ga.fitness}")
    figure.savefig(folder / "convergence.png", dpi=120)
    plt.close(figure)  # a batch of searches in one process would otherwise keep every figure open
    summary = {"best_genes": outcome.best_genes, "best_fitness": outcome.best_fitness,
               "recipe": recipe_table(recipe), "trainable_share": recipe["trainable_share"],
               "evaluations": len(evaluations), "train_runs": int(evaluations["train_runs"].sum()),
               "cache_hits": int(evaluations["cache_hit"].sum()),
               "failed": int(evaluations["status"].isin(["diverged", "failed"]).sum()),
               "pruned": int((evaluations["status"] == "pruned").sum()),
               "prefix_cache_hits": int((evaluations["prefix_cache"] == "hit").sum()),
               "seconds": float(evaluations["seconds"].sum()), "generations": outcome.logbook,
               "final_selection": config.ga.final_selection, "rescored": outcome.selection}
    store.set_status(run_id, "finished", summary)
    log.info("run %s finished: best fitness %.4f", run_id, outcome.best_fitness)
    return SearchResult(run_id, folder, outcome.best_genes, outcome.best_fitness, recipe, evaluations, generations)


# ---------------------------------------------------------------------------------------------
# Final protocol and baselines


def final_protocol(config: cfg.Config, inputs: tuple, store: RunStore, run_id: str, method_name: str, make_method,
                   grid=None, *, progress: bool = True) -> pd.DataFrame:
    """Retrain on the full train part once per seed, early-stop on full validation, score on test.

    ``make_method(**setting)`` builds the method for each hyperparameter setting of ``grid``
    (default: the method's own grid). Every setting is trained with every seed; the setting with
    the best mean validation macro accuracy is marked ``selected`` and the others stay in the
    table, so the grid's cost is counted. Rows already in the store are kept, so an interrupted
    final protocol resumes too. ``inputs`` is ``load_inputs(config)``, loaded by the caller
    before the run exists, so bad data leaves no run behind. The settings and seeds go through
    the run's executor (``executor.kind``); each row is stored as it finishes. A setting and seed
    whose training raised twice is not stored: the protocol raises ``TrainingFailedError`` after
    the others (a baseline run is then not marked finished), and the next call trains only what
    is missing.
    """
    model, dataset = inputs
    grid = grid if grid is not None else make_method().grid
    folder = run_dir(config, run_id)
    done = set(store.finals(run_id).query("method == @method_name")[["setting", "seed"]].itertuples(index=False))
    todo = [(key, setting, seed) for setting in grid for seed in config.train.seeds
            if (key := json.dumps(setting, sort_keys=True), seed) not in done]
    failures = []
    with make_executor(config.executor, config.train) as executor:
        calls = [(make_method, setting, seed, progress and executor.in_process) for _, setting, seed in todo]
        shared = executor.share((model, dataset, config.train))
        with contextlib.closing(executor.map(final_run, calls, shared)) as finished:
            for index, outcome in finished:  # stored as each finishes
                key, _, seed = todo[index]
                if isinstance(outcome, TaskFailure):
                    failures.append(f"setting {key} seed {seed}: {outcome.error}")
                    continue
                row = {"method": method_name, "setting": key, "seed": seed, **outcome["row"]}
                if outcome["report"] is not None:  # appended before the row is stored: a kill loses none (a rerun repeats it)
                    name, table = outcome["report"]
                    table.assign(setting=key, seed=seed).to_csv(folder / name, mode="a", index=False,
                                                                 header=not (folder / name).is_file())
                store.add_final(run_id, row)
    if failures:
        raise TrainingFailedError(
            f"run {run_id}: {len(failures)} of {len(todo)} training runs of the final protocol raised twice "
            f"({'; '.join(failures)}); the others are stored. Continue with `biotune final {run_id}` for a search, "
            "or the same row again (biotune.run_method / run_many / run_baseline(reuse=True)) for a baseline: "
            "they train only what is missing")
    finals = store.select_final_setting(run_id, method_name)
    finals.to_csv(folder / "final.csv", index=False)
    return finals


def final_run(shared: tuple, make_method, setting: dict, seed: int, progress: bool = False) -> dict:
    """One setting and seed of the final protocol, in whichever process the executor picked: the
    finals row (without method, setting and seed) and the method's test report, as plain data."""
    model, dataset, train_config = shared
    train_config = dataclasses.replace(train_config, amp=resolve_amp(train_config.amp, model))  # the test pass too
    method = make_method(**setting)
    result = method.fit(model, dataset, train_config, seed, keep_net=True, progress=progress)
    row = {"status": result.status, "trainable_share": result.trainable_params / model.num_params,
           "seconds": result.seconds, "train_runs": result.train_runs, "best_epoch": result.best_epoch,
           "epochs": result.epochs, "val_macro_acc": result.val.get("macro_acc")}
    report = None
    if result.ok:
        test = evaluate(result.net, dataset, "test", batch_size=train_config.eval_batch_size, amp=train_config.amp,
                        channels_last=train_config.channels_last)
        row.update(test_macro_acc=test["macro_acc"], test_top1=test["top1"], test_loss=test["loss"])
        report = method.test_report(result.net, dataset, train_config)
    return {"row": row, "report": report}


def final(run_id: str, *, store: str | Path | None = None, progress: bool = True,
          overrides: list[str] | dict | None = None) -> pd.DataFrame:
    """Final protocol for a finished search: retrain its best genome per seed, test it.
    ``overrides`` may set the executor only (``executor.kind``, ``executor.workers``, ...)."""
    settings, other = split_executor_settings(overrides)
    store_obj = RunStore(store)
    run = store_obj.run(run_id)
    refuse_changes_on_resume(f"final {run_id}", cfg.from_dict(run["config"]), other)
    if run["kind"] != "search":
        raise ValueError(f"run {run_id} is a {run['kind']} run; `biotune final` takes a search run")
    if run["status"] != "finished":
        raise ValueError(f"run {run_id} is {run['status']}, not finished; resume it first: "
                         f"biotune search --resume {run_id}")
    config = with_executor_settings(cfg.from_dict(run["config"]), settings)
    genes = run["result"]["best_genes"]

    best_genome = functools.partial(PlanMethod, genes, config.ga.encoding)
    return final_protocol(config, load_inputs(config), store_obj, run_id, run["method"], best_genome,
                          progress=progress)


def run_baseline(method: str, dataset: str | None = None, model: str | None = None, preset: str = "cpu", *,
                 config_file: str | Path | None = None, overrides: list[str] | dict | None = None,
                 grid: list[dict] | None = None, store: str | Path | None = None, reuse: bool = False,
                 progress: bool = True) -> tuple[str, pd.DataFrame]:
    """A baseline through the same data, trainer, seeds and final protocol as BioTune.

    ``grid``: hyperparameter settings to choose from on validation (default: the method's grid,
    docs/methods.md); ``[{}]`` runs the method's defaults only. With ``reuse``, a run of the same
    method, resolved config and grid already in the store is returned if finished and continued
    if not, instead of starting a new one.
    """
    method_class = METHODS.get(method)
    config = cfg.resolve(preset, config_file, run_overrides(dataset, model, overrides, store))
    make_folder(Path(config.results_dir), "the results folder", "--results-dir DIR")
    grid = grid if grid is not None else method_class.grid
    store_obj = RunStore(config.store_path)
    previous = store_obj.matching_run(method, config.to_dict(), {"grid": grid}) if reuse else None
    if previous is not None and previous["status"] == "finished":
        log.info("run %s: the same baseline is already in the store; reusing it", previous["run_id"])
        return previous["run_id"], store_obj.select_final_setting(previous["run_id"], method)
    inputs = load_inputs(config)
    run_id = previous["run_id"] if previous is not None else new_run_id(method, config.data.dataset)
    try:
        if previous is not None:
            log.info("run %s: continuing its unfinished final protocol", run_id)
            store_obj.set_status(run_id, "running")
        else:
            start_run(config, store_obj, kind="baseline", method=method, run_id=run_id, grid=grid)
        finals = final_protocol(config, inputs, store_obj, run_id, method, method_class, grid, progress=progress)
    except KeyboardInterrupt:
        store_obj.set_status(run_id, "interrupted")
        raise
    except Exception:
        store_obj.set_status(run_id, "failed")
        raise
    store_obj.set_status(run_id, "finished", {"method": method, "setting": finals["setting"].iloc[0]})
    return run_id, finals


def compare(run_ids: list[str], *, store: str | Path | None = None) -> pd.DataFrame:
    """One row per run: test macro accuracy and top-1 (mean±std over seeds, of the setting chosen
    on validation), trainable share, seconds and training runs (search + grid + final)."""
    columns = ["run_id", "method", "dataset", "model", "setting", "test_macro_acc", "test_top1", "trainable_share",
               "seconds", "train_runs"]
    return readable(summary(store, run_ids))[columns]


def demo(preset: str = "demo", *, store: str | Path | None = None, progress: bool = True,
         overrides: list[str] | dict | None = None) -> tuple[pd.DataFrame, Path]:
    """A small search on the embedded default, then BioTune, full fine-tuning and linear probing
    through the final protocol; returns the comparison table and the search's run folder.
    ``overrides`` apply to every run (e.g. ``{"executor.kind": "ray", "executor.workers": 2}``)."""
    result = search(preset=preset, store=store, progress=progress, overrides=overrides)
    final(result.run_id, store=store, progress=progress, overrides={"executor": split_executor_settings(overrides)[0]})
    baselines = [run_baseline(method, preset=preset, store=store, progress=progress, overrides=overrides)[0]
                 for method in ("full", "linear_probe")]
    table = compare([result.run_id, *baselines], store=store)
    table.to_csv(result.folder / "comparison.csv", index=False)
    return table, result.folder
