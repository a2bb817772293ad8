"""Experiment rows: one method on one dataset and model under a preset, run once and reused.

A row is a searcher (search, then the final protocol), a BioTune variant or a baseline.
``run_method`` returns a finished row from the run store and resumes an unfinished one, so a
killed notebook or batch continues where it stopped. ``run_many`` runs a list of rows, several
at once in processes or Ray tasks where asked, and goes on past a failed row.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from . import config as cfg
from .executors import SerialExecutor, TaskFailure, make_executor
from .experiment import final, run_baseline, run_overrides, search
from .ga import evaluation_schedule
from .gpus import here, runs_per_gpu_for, training_device
from .methods import METHODS
from .report import variant
from .store import RunStore

log = logging.getLogger(__name__)

SEARCHERS = cfg.CHOICES["ga.searcher"]
# BioTune with our changes (docs/algorithm.md, "Robust BioTune"), each a switch of its own: rows
# of a study by name. Each runs as a BioTune search with these overrides.
BIOTUNE_VARIANTS = {
    "biotune_robust": {"ga.encoding": "head_trained", "ga.final_selection": "rescore_top_k", "ga.fitness_val": "whole"},
    "biotune_head": {"ga.encoding": "head_trained"},
    "biotune_rescore": {"ga.final_selection": "rescore_top_k"},
    "biotune_wholeval": {"ga.fitness_val": "whole"},
    "biotune_bits": {"ga.encoding": "freeze_bits"},
}
ROW_KEYS = ("method", "dataset", "model", "preset", "overrides", "config_file", "label")
ROW_EXECUTORS = tuple(name for name in cfg.CHOICES["executor.kind"] if name != "serial")  # rows at once


def row_methods() -> list[str]:
    """What a row's ``method`` may be: a searcher, a BioTune variant or a registered method."""
    return [*SEARCHERS, *BIOTUNE_VARIANTS, *METHODS.names()]


def run_method(method: str, dataset: str | None = None, model: str | None = None, preset: str = "cpu", *,
               config_file: str | Path | None = None, overrides: list[str] | dict | None = None,
               store: str | Path | None = None, reuse: bool = True, progress: bool = True) -> str:
    """Run one row (search + final protocol, or a baseline with its grid) and return its run id.

    ``biotune.run_method("tpe", "digits", preset="cpu", overrides={"ga.population": 8})``
    """
    method, overrides = runs_as(method, overrides)
    if method not in SEARCHERS:
        return run_baseline(method, dataset, model, preset, config_file=config_file, overrides=overrides,
                            store=store, reuse=reuse, progress=progress)[0]
    overrides = _with_searcher(overrides, method)
    config = cfg.resolve(preset, config_file, run_overrides(dataset, model, overrides, store))
    executor_settings = {"executor": dataclasses.asdict(config.executor)}  # this row's executor, also for a stored search
    previous = None
    if reuse:
        with RunStore(config.store_path) as db:
            previous = db.matching_run(method, config.to_dict())
    if previous is None:
        run_id = search(dataset, model, preset, config_file=config_file, overrides=overrides, store=store,
                        progress=progress).run_id
    else:
        run_id = previous["run_id"]
        if previous["status"] != "finished":
            log.info("run %s: resuming the unfinished search", run_id)
            search(resume=run_id, store=config.store_path, progress=progress, overrides=executor_settings)
        else:
            log.info("run %s: the same search is already in the store; reusing it", run_id)
    final(run_id, store=config.store_path, progress=progress, overrides=executor_settings)  # finished seeds are skipped
    return run_id


def runs_as(method: str, overrides: list[str] | dict | None) -> tuple[str, list[str] | dict | None]:
    """The method and overrides a row runs as: a BioTune variant is BioTune with its switches."""
    if method in BIOTUNE_VARIANTS:
        return "biotune", {**cfg.flat_overrides(overrides), **BIOTUNE_VARIANTS[method]}
    return method, overrides


def _with_searcher(overrides: list[str] | dict | None, searcher: str) -> list[str] | dict:
    if isinstance(overrides, dict):
        return {**overrides, "ga.searcher": searcher}
    return [*(overrides or []), f"ga.searcher={searcher}"]


def run_many(rows: list[dict], *, jobs: int = 1, executor: str = "process", gpus: list[int] | None = None,
             runs_per_gpu: int | None = None, gpus_per_row: float = 0.0, store: str | Path | None = None,
             progress: bool = False, on_finished: Callable[[int, dict], None] | None = None) -> pd.DataFrame:
    """Run experiment rows (dicts of ``ROW_KEYS``, ``method`` required); return one line per row
    with its run id, or its error when it failed.

    ``jobs > 1`` runs that many rows at once as calls of the executor (executors.py): spawned
    processes, or Ray tasks of ``gpus_per_row`` GPUs each. Rows go to ``gpus`` (None: every
    visible GPU), ``runs_per_gpu`` on each (None: as many as ``jobs`` needs); the outcome's
    ``gpu`` says where a row ran. A row that raises is retried once (resuming where it stopped),
    then reported failed while the others go on; out of GPU memory twice stops them all. Each
    row writes the run store itself, so every worker must reach the file. ``on_finished(index,
    outcome)`` is called here as each row ends (a study writes its table row by row).
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    problems = [problem for row in rows for problem in _row_problems(row)]
    if problems:  # a typo fails now, not after hours of good rows
        raise ValueError("experiment rows that cannot run:\n  " + "\n  ".join(problems))
    one_at_a_time = jobs == 1 and executor == "process"
    if one_at_a_time:  # rows in this process, unplaced: each row's own runs go to the GPUs asked for
        rows, gpus = _with_gpus(rows, gpus), None
    settings = _rows_executor_config(jobs, executor, one_at_a_time, gpus, runs_per_gpu, gpus_per_row)
    if settings.kind != "ray":  # rows train on this machine: a device they cannot use fails now, once
        _check_row_devices(rows)
    store = str(Path(store).resolve()) if store is not None else None
    with SerialExecutor() if one_at_a_time else make_executor(settings, cfg.TrainConfig()) as pool:
        outcomes = _run_rows(pool, rows, (store, progress and pool.in_process, str(Path.cwd())), on_finished)
    return pd.DataFrame([{"label": row.get("label"), "method": row["method"], "dataset": row.get("dataset"),
                          "model": row.get("model"), **outcome} for row, outcome in zip(rows, outcomes)])


def _with_gpus(rows: list[dict], gpus: list[int] | None) -> list[dict]:
    """Rows run one after another in this process, each training on ``gpus`` (where given)."""
    if not gpus:
        return rows
    return [{**row, "overrides": {**cfg.flat_overrides(row.get("overrides")), "executor.gpus": gpus}} for row in rows]


def _rows_executor_config(jobs: int, executor: str, one_at_a_time: bool, gpus: list[int] | None,
                          runs_per_gpu: int | None, gpus_per_row: float) -> cfg.ExecutorConfig:
    """The executor settings of the rows themselves (each row's own training runs have their own)."""
    if runs_per_gpu is None:
        runs_per_gpu = 1 if gpus_per_row or one_at_a_time else runs_per_gpu_for(jobs, gpus)
    return cfg.validate(cfg.Config(executor=cfg.ExecutorConfig(kind="serial" if one_at_a_time else executor,
                                                               workers=jobs, gpus_per_run=gpus_per_row, gpus=gpus,
                                                               runs_per_gpu=runs_per_gpu))).executor


def _check_row_devices(rows: list[dict]) -> None:
    for config in map(_row_config, rows):
        if training_device(config.executor, config.train).type == "cuda" and config.train.device.startswith("cuda:"):
            raise cfg.ConfigError(f"a row has train.device={config.train.device}, but run_many places rows on "
                                  "GPUs itself: set the rows' train.device to cuda or auto, and pass gpus=[...]")


def _run_rows(pool, rows: list[dict], shared: tuple, on_finished) -> list[dict]:
    """Each row's outcome, in the rows' order; a row that failed every attempt gets its error."""
    outcomes = [None] * len(rows)
    with contextlib.closing(pool.map(_run_row, [(row,) for row in rows], shared)) as finished:
        for index, outcome in finished:
            if isinstance(outcome, TaskFailure):
                outcome = {"run_id": None, "status": "failed", "error": outcome.error, "seconds": None, "gpu": None}
            outcomes[index] = outcome
            if on_finished is not None:
                on_finished(index, outcome)
    return outcomes


def _row_problems(row: dict) -> list[str]:
    """What makes a row unable to run: unknown keys, an unknown method, a config that does not
    resolve (unknown key or bad value). Dataset and model names are checked when the row runs."""
    unknown = set(row) - set(ROW_KEYS)
    if unknown or "method" not in row:
        return [f"{row!r}: needs 'method'; allowed keys are {', '.join(ROW_KEYS)}"]
    if row["method"] not in row_methods():
        return [f"{row!r}: {METHODS.unknown_message(row['method'])} (or a searcher: "
                f"{', '.join((*SEARCHERS, *BIOTUNE_VARIANTS))})"]
    try:
        _row_config(row)
    except (cfg.ConfigError, FileNotFoundError) as error:
        return [f"{row!r}: {error}"]
    return []


def _row_config(row: dict) -> cfg.Config:
    return cfg.resolve(row.get("preset", "cpu"), row.get("config_file"),
                       run_overrides(row.get("dataset"), row.get("model"), row.get("overrides"), None))


def _run_row(shared: tuple, row: dict) -> dict:
    """One row, in the driver's working folder (relative data and results paths mean the same
    there); an exception goes to the executor, which retries the row once."""
    store, progress, folder = shared
    os.chdir(folder)
    started = time.time()
    arguments = {k: v for k, v in row.items() if k not in ("method", "label")}
    try:
        run_id = run_method(row["method"], store=store, progress=progress, **arguments)
    except Exception as error:
        log.error("row %s failed: %s: %s", row, type(error).__name__, error)
        raise
    place = here()
    return {"run_id": run_id, "status": "ok", "error": None, "seconds": round(time.time() - started, 1),
            "gpu": place.gpu if place is not None else None}


def ablation_rows(preset: str, dataset: str | None = None, model: str | None = None, *,
                  populations: list[int] = (4, 6, 10, 20), encodings: list[str] = ("no_lr_genes", "no_freezing"),
                  reference: bool = True, rescore: bool = True, prune: bool = True, generational: bool = True,
                  searchers: list[str] = tuple(name for name in SEARCHERS if name != "biotune"),
                  overrides: dict | None = None) -> list[dict]:
    """The ablation study's rows for ``run_many``, labelled by ``report.variant`` as the figures
    name them: BioTune as the preset has it, each of ``encodings``, each population at the
    preset's generations and at its budget of evaluations, the switched-on changes (reference GA,
    re-scored final pick, pruning, generational breeding), then ``searchers`` at BioTune's budget.
    A row whose config equals another's is left out: it would be the same run."""
    overrides = dict(overrides or {})
    base = cfg.resolve(preset, overrides=run_overrides(dataset, model, overrides, None)).ga
    n_folds = cfg.num_folds(base.train_split)
    budget = len(evaluation_schedule(base, n_folds))
    changes = [{}, *({"ga.encoding": encoding} for encoding in encodings)]
    if reference:
        changes.append({"ga.ga_variant": "reference"})
    if rescore:
        changes.append({"ga.final_selection": "rescore_top_k"})
    if prune:
        changes.append({"ga.prune": True})
    if generational:
        changes.append({"ga.breeding": "generational"})
    for population in populations:
        sizes = {"ga.population": population, "ga.elites": min(base.elites, population - 1)}
        same_budget = generations_for_budget(base, population, sizes["ga.elites"], budget, n_folds)
        changes += [sizes, {**sizes, "ga.generations": same_budget}]
    changes += [{"ga.searcher": searcher} for searcher in searchers]
    rows, seen = [], set()
    for change in changes:
        merged = {**overrides, **change}
        config = cfg.resolve(preset, overrides=run_overrides(dataset, model, merged, None)).to_dict()
        key = json.dumps(config, sort_keys=True)
        if key not in seen:
            seen.add(key)
            method = merged.pop("ga.searcher", "biotune")
            rows.append({"method": method, "dataset": dataset, "model": model, "preset": preset,
                         "overrides": merged, "label": variant(config)})
    return rows


def generations_for_budget(base: cfg.GAConfig, population: int, elites: int, budget: int, n_folds: int) -> int:
    """The number of generations whose evaluation count comes closest to ``budget`` for this
    population (ties go to the smaller count); whole generations can overshoot or undershoot by
    up to half a generation. It is 0 (the initial population alone) when that population already
    spends about the budget."""
    spent = {t: len(evaluation_schedule(dataclasses.replace(base, population=population, elites=elites,
                                                            generations=t), n_folds))
             for t in range(budget + 1)}
    return min(spent, key=lambda t: (abs(spent[t] - budget), spent[t]))
