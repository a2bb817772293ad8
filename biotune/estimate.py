"""Plan before you spend: the GPU hours a notebook plan takes, from measured throughput.

``biotune notebooks cost notebooks/paper.yaml --gpus 1 4 8``: each notebook becomes the rows it
runs; each row counts the images it trains and evaluates (its split sizes and resolved config) and
turns them into hours at the throughput measured on one H100 (results/reference/throughput_h100.json).
The bounds are patience + 1 epochs (early stopping's earliest) and max_epochs; docs/gpu.md lists every
assumption (a frozen block costs as much as a trained one, an evaluated image a third of a trained
one, unmeasured models FLOP-scaled from ResNet-50, rows spread over the GPUs longest first).
"""
from __future__ import annotations

import ast
import functools
import heapq
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from . import config as cfg
from .batch import SEARCHERS, ablation_rows, runs_as
from .data import TEST_FRACTION
from .experiment import run_overrides
from .ga import evaluation_schedule
from .methods import METHODS
from .models import meta_arch
from .study import study_cells, study_rows
from .train import resolve_amp

_arch = functools.cache(meta_arch)  # a plan's hundreds of rows share a few models
THROUGHPUT = Path(__file__).resolve().parents[1] / "results" / "reference" / "throughput_h100.json"

# Labelled images per official split (train, val, test; None: carved from train as data/splits.py
# does), as the paper states them for its nine datasets, and Fashion-MNIST's (the quickstart's);
# carved, they give the sizes data/README.md lists.
SPLITS = {"flowers102": (1020, 1020, 6149), "fgvc_aircraft": (3334, 3333, 3333), "isic2020": (33126, None, None),
          "dtd": (1880, 1880, 1880), "cifar10": (50000, None, 10000), "stl10": (5000, None, 8000),
          "mnist": (60000, None, 10000), "usps": (7291, None, 2007), "svhn": (73257, None, 26032),
          "fashion_mnist": (60000, None, 10000)}
EVAL_COST = 1 / 3  # an evaluated image against a trained one (forward only; see the module docstring)
RUNS_PER_FIT = {"lp_ft": 2}  # a linear probe, then full fine-tuning (methods/lp_ft.py)
TIME_PER_IMAGE = {"adafilter": 2.05}  # against full fine-tuning, measured on the CPU (docs/performance.md)


@dataclass(frozen=True)
class Runs:
    """``count`` training runs, each per epoch training ``train`` and validating on ``val``
    images, and evaluating ``test`` images once at the end."""

    count: int
    train: float
    val: float
    test: float = 0

    def images(self, epochs: int) -> tuple[float, float]:
        """(trained, evaluated) images of all the runs at ``epochs`` epochs each."""
        return self.count * epochs * self.train, self.count * (epochs * self.val + self.test)


def split_sizes(data: cfg.DataConfig) -> tuple[int, int, int]:
    """(train, val, test) images of ``data.dataset`` after data/splits.py's carving and the max_* caps."""
    if data.dataset not in SPLITS:
        raise ValueError(f"the estimate has no size for dataset {data.dataset!r}; it knows {', '.join(SPLITS)}")
    train, val, test = SPLITS[data.dataset]
    if test is None:
        test = round(TEST_FRACTION * train)
        train -= test
    if val is None:
        val = round(data.val_fraction * train)
        train -= val
    caps = (data.max_train, data.max_val, data.max_test)
    return tuple(n if cap is None else min(n, cap) for n, cap in zip((train, val, test), caps))


def row_runs(config: cfg.Config, method: str) -> list[Runs]:
    """The training runs of one row: a search's evaluations on its folds and the final protocol's
    retrains of its pick, or a baseline's grid of settings, each with every seed."""
    train, val, test = split_sizes(config.data)
    seeds = len(config.train.seeds)
    if method in SEARCHERS:
        ga = config.ga
        n_folds = cfg.num_folds(ga.train_split)
        evaluations = len(evaluation_schedule(ga, n_folds))
        if ga.final_selection == "rescore_top_k":
            evaluations += ga.rescore_k * n_folds
        fitness_val = val if ga.fitness_val == "whole" else val / n_folds
        return [Runs(evaluations * seeds, train / n_folds, fitness_val), Runs(seeds, train, val, test)]
    fits = len(METHODS.get(method).grid) * seeds
    return [Runs(fits, train, val, test), Runs(fits * (RUNS_PER_FIT.get(method, 1) - 1), train, val)]


@functools.cache
def forward_flops(model: str, image_size: int) -> float:
    """FLOPs of one image's forward pass, counted on PyTorch's meta device (no memory, no weights)."""
    net = _arch(model).net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.empty(1, 3, image_size, image_size, device="meta"))
    return counter.get_total_flops()


@functools.cache
def measured() -> tuple[dict, int]:
    """(model, precision) -> (low, high) cost units per second on the measured GPU, and the image
    size measured at. A trained image is a unit and an evaluated one EVAL_COST, mixed as in the
    benchmark's evaluations (whose images/s count the trained images only)."""
    reference = json.loads(THROUGHPUT.read_text())
    bench = cfg.resolve(reference["preset"], overrides={"data.dataset": reference["dataset"]})
    train, val, _ = split_sizes(bench.data)  # a fold holds the same share of each
    units_per_image = 1 + EVAL_COST * val / train
    rates = {(row["model"], row["precision"]): tuple(r * units_per_image for r in row["images_per_s"])
             for row in reference["rows"]}
    return rates, reference["image_size"]


def units_per_second(model: str, image_size: int, amp: bool) -> tuple[tuple[float, float], str]:
    """(low, high) cost units per second of ``model`` at ``image_size`` px and where they come from:
    its own measurement, else ResNet-50's, scaled by forward FLOPs."""
    (rates, measured_size), precision = measured(), "bf16" if amp else "fp32"
    reference = model if (model, precision) in rates else "resnet50"
    scale = forward_flops(reference, measured_size) / forward_flops(model, image_size)
    source = (f"measured ({precision})" if (reference, image_size) == (model, measured_size) else
              f"estimate: {reference} ({precision}) at {measured_size} px x FLOPs ratio at {image_size} px")
    return tuple(rate * scale for rate in rates[(reference, precision)]), source


def row_cost(row: dict) -> dict:
    """One row's images (low, high) and GPU hours (low, high) on one GPU, and the run it is: its
    method and resolved config, as batch.run_method resolves them (a BioTune variant is BioTune)."""
    method, overrides = runs_as(row["method"], row.get("overrides"))
    config = cfg.resolve(row.get("preset", "cpu"), row.get("config_file"),
                         run_overrides(row.get("dataset"), row.get("model"), overrides, None))
    arch = _arch(config.model.name)
    image_size = config.data.image_size or arch.preprocess.image_size
    (slow, fast), source = units_per_second(config.model.name, image_size, resolve_amp(config.train.amp, arch))
    runs = row_runs(config, method)
    cost = {"method": row["method"], "dataset": config.data.dataset, "model": config.model.name,
            "preset": config.preset, "label": row.get("label"), "throughput": source,
            "run": json.dumps({"method": method, "config": config.to_dict()}, sort_keys=True)}
    for bound, epochs, rate in (("low", min(config.train.patience + 1, config.train.max_epochs), fast),
                                ("high", config.train.max_epochs, slow)):
        trained, evaluated = (sum(part) for part in zip(*(r.images(epochs) for r in runs)))
        units = (trained + EVAL_COST * evaluated) * TIME_PER_IMAGE.get(row["method"], 1)
        cost |= {f"train_images_{bound}": trained, f"eval_images_{bound}": evaluated,
                 f"gpu_hours_{bound}": units / rate / 3600}
    return cost


def _quickstart_rows(p: dict) -> list[dict]:
    return [{"method": "biotune", "dataset": p["dataset"], "model": p["model"], "preset": p["preset"],
             "overrides": p["overrides"]}]


def _main_rows(p: dict) -> list[dict]:
    return [{"method": method, "dataset": dataset, "model": model, "preset": p["preset"], "overrides": p["overrides"]}
            for dataset in p["datasets"] for model in p["models"] for method in p["methods"]]


def _ablation_rows(p: dict) -> list[dict]:
    return ablation_rows(p["preset"], p["dataset"], p["model"], populations=p["populations"],
                         encodings=p["encodings"], reference=p["reference"], rescore=p["rescore"], prune=p["prune"],
                         generational=p["generational"], searchers=p["searchers"], overrides=p["overrides"])


def _study_rows(p: dict) -> list[dict]:
    return study_rows(study_cells(p["datasets"], p["methods"], p["seeds"]), preset=p["preset"], model=p["model"],
                      overrides=p["overrides"])


# The rows each notebook's cells run, from its parameters (03_figures trains nothing)
NOTEBOOK_ROWS = {"00_quickstart": _quickstart_rows, "01_main_experiments": _main_rows,
                 "02_ablations": _ablation_rows, "03_figures": lambda p: [], "04_study": _study_rows}
COSTS = ("train_images_low", "eval_images_low", "gpu_hours_low", "train_images_high", "eval_images_high",
         "gpu_hours_high")


def plan_costs(plan: str | Path, extra_parameters: dict | None = None) -> pd.DataFrame:
    """One line per row of every notebook of ``plan``: its images and GPU hours (``row_cost``); a
    row whose run an earlier row already made is reused (batch.run_method) and costs nothing."""
    from .notebooks import PlanError, load_plan

    _, runs = load_plan(plan, extra_parameters)
    lines = []
    for run in runs:
        rows_of = NOTEBOOK_ROWS.get(run.notebook.stem)
        if rows_of is None:
            raise PlanError(f"{run.notebook.name}: the estimate knows the rows of {', '.join(NOTEBOOK_ROWS)} only")
        lines += [{"notebook": run.name, **row_cost(row)} for row in rows_of({**defaults(run.notebook), **run.parameters})]
    costs = pd.DataFrame(lines)
    costs["reused"] = costs.duplicated("run")
    costs.loc[costs["reused"], list(COSTS)] = 0
    return costs


def defaults(notebook: Path) -> dict:
    """The values of the notebook's parameters cell, as papermill reads them (a test checks that it
    sees every one)."""
    from .notebooks import notebook_parameters

    return {name: ast.literal_eval(info["default"]) for name, info in notebook_parameters(notebook).items()}


def wall_hours(hours: list[float], gpus: int) -> float:
    """Hours until the last row ends with rows given to whichever GPU frees first, longest first."""
    ends = [0.0] * gpus
    for row in sorted(hours, reverse=True):
        heapq.heapreplace(ends, ends[0] + row)
    return max(ends)


def summary(costs: pd.DataFrame, gpus: list[int]) -> pd.DataFrame:
    """Per notebook and in total: rows, images, GPU hours and wall hours on each number of GPUs
    (notebooks run one after another, so the total's wall hours are the notebooks' sum)."""
    lines = []
    for notebook, rows in costs.groupby("notebook", sort=False):
        line = {"notebook": notebook, "rows": len(rows), "reused": rows["reused"].sum()}
        for bound in ("low", "high"):
            line |= {f"train_images_{bound}": rows[f"train_images_{bound}"].sum(),
                     f"gpu_hours_{bound}": rows[f"gpu_hours_{bound}"].sum()}
            line |= {f"wall_hours_{bound}_{n}": wall_hours(rows[f"gpu_hours_{bound}"].tolist(), n) for n in gpus}
        lines.append(line)
    table = pd.DataFrame(lines)
    return pd.concat([table, table.drop(columns="notebook").sum().to_frame().T.assign(notebook="total")],
                     ignore_index=True)
