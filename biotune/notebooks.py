"""Batches of notebooks through papermill: ``biotune notebooks run notebooks/cpu.yaml``.

A plan is a YAML file::

    name: cpu                  # executed notebooks go to <output_dir>/cpu/
    parameters: {preset: cpu}  # given to every notebook of the plan
    runs:
      - notebook: 02_ablations.ipynb      # relative to the plan's folder
        name: 02_ablations                # optional, default the notebook's stem
        parameters: {dataset: digits}     # this notebook only; wins over the plan's
        always: false                     # true: never skipped (e.g. figures of a growing store)

Every parameter name is checked against the notebook's ``parameters`` cell before anything runs
(an unknown name is an error listing the valid ones), and so is its type where the cell
annotates one. A failed notebook is reported and the batch goes on; the summary says which
failed. A notebook that finished with the same parameters and the same source is skipped
unless forced or marked ``always``, so a batch that was stopped continues where it stopped.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import papermill

from . import staging
from .config import Config, load_yaml, resolve

log = logging.getLogger(__name__)

PLAN_KEYS = {"name", "parameters", "runs"}
RUN_KEYS = {"notebook", "name", "parameters", "always"}
ANNOTATED_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "list": (list,),
                   "dict": (dict,)}


class PlanError(ValueError):
    """A plan that cannot run: unknown keys, missing notebooks, unknown or mistyped parameters."""


@dataclass
class NotebookRun:
    name: str
    notebook: Path
    parameters: dict
    always: bool = False  # rerun even when it finished with the same parameters


def notebook_parameters(notebook: str | Path) -> dict:
    """Name -> {default, type, help} from the notebook's cell tagged ``parameters``."""
    notebook = Path(notebook)
    if not notebook.is_file():
        raise PlanError(f"notebook {notebook} does not exist (a plan's notebook paths are relative to its folder)")
    try:
        found = papermill.inspect_notebook(str(notebook))
    except Exception as err:  # noqa: BLE001 - nbformat fails with JSON, schema or type errors on a non-notebook
        raise PlanError(f"{notebook} is not a readable Jupyter notebook ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}); expected an .ipynb file saved by Jupyter") from err
    if not found:
        raise PlanError(f"{notebook} has no cell tagged 'parameters'; papermill needs one to inject values")
    return {name: {"default": info["default"], "type": info["inferred_type_name"], "help": info["help"]}
            for name, info in found.items()}


def load_plan(path: str | Path, extra_parameters: dict | None = None, only: list[str] | None = None
              ) -> tuple[str, list[NotebookRun]]:
    """Read and check a plan; ``extra_parameters`` (e.g. ``device``) go to every selected run;
    ``only`` selects entries by name or by notebook (``03_figures`` selects all its entries)."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan {path} does not exist; the shipped ones are notebooks/smoke.yaml, cpu.yaml, paper.yaml")
    plan = _read_yaml(path) or {}
    _check_keys(plan, PLAN_KEYS, f"plan {path}")
    if not plan.get("runs") or not isinstance(plan["runs"], list):
        raise PlanError(f"plan {path} lists no runs; add a 'runs:' list of {{notebook: ..., parameters: ...}}")
    runs = [_plan_run(path, plan, index, entry, extra_parameters) for index, entry in enumerate(plan["runs"])]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise PlanError(f"plan {path}: run names must be unique, got {names}; give repeated notebooks a 'name:'")
    runs = _selected(path, runs, only) if only else runs
    problems = [problem for run in runs for problem in _check_parameters(run)]
    if problems:
        raise PlanError(f"plan {path}:\n  " + "\n  ".join(problems))
    return plan.get("name") or path.stem, runs


def _plan_run(path: Path, plan: dict, index: int, entry, extra_parameters: dict | None) -> NotebookRun:
    """Entry ``index`` of the plan's runs, its parameters over the plan's, ``extra_parameters`` over both."""
    _check_keys(entry, RUN_KEYS, f"plan {path}, run {index + 1}")
    if not isinstance(entry.get("notebook"), str):
        raise PlanError(f"plan {path}, run {index + 1}: needs a 'notebook:' path")
    notebook = (path.parent / entry["notebook"]).resolve()
    shared, own = plan.get("parameters") or {}, entry.get("parameters") or {}
    if not isinstance(shared, dict) or not isinstance(own, dict):
        raise PlanError(f"plan {path}, run {index + 1}: 'parameters' must be a mapping of name: value")
    return NotebookRun(entry.get("name") or notebook.stem, notebook, {**shared, **own, **(extra_parameters or {})},
                       bool(entry.get("always", False)))


def _selected(path: Path, runs: list[NotebookRun], only: list[str]) -> list[NotebookRun]:
    """The runs ``only`` names: an entry's name, or a notebook's stem for all of its entries."""
    names = [run.name for run in runs]
    unknown = sorted(set(only) - set(names) - {run.notebook.stem for run in runs})
    if unknown:
        raise PlanError(f"plan {path} has no run named {', '.join(unknown)}; its runs: {', '.join(names)}")
    return [run for run in runs if run.name in only or run.notebook.stem in only]


def _read_yaml(path: Path):
    """The parsed plan; a syntax error names the file, line and column."""
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise PlanError(f"plan {path} is not a text file ({err.reason}); a plan is a YAML file") from err
    return load_yaml(text, f"plan {path}", PlanError)


def _check_keys(mapping, allowed: set, where: str) -> None:
    if not isinstance(mapping, dict):
        raise PlanError(f"{where} must be a mapping with keys {', '.join(sorted(allowed))}")
    unknown = set(mapping) - allowed
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(allowed))}")


def _check_parameters(run: NotebookRun) -> list[str]:
    """Unknown names and values of the wrong annotated type, as messages."""
    declared = notebook_parameters(run.notebook)
    problems = []
    for name, value in run.parameters.items():
        if name not in declared:
            problems.append(f"{run.name}: unknown parameter {name!r}; {run.notebook.name} takes "
                            f"{', '.join(declared)}")
        elif not _has_type(value, declared[name]["type"]):
            problems.append(f"{run.name}: parameter {name!r} must be {declared[name]['type']}, got {value!r}")
    return problems


def _has_type(value, annotation: str) -> bool:
    """Whether ``value`` fits a parameters-cell annotation such as ``int`` or ``Optional[str]``;
    papermill reports an unannotated parameter as ``None``, which accepts anything."""
    if annotation.startswith("Optional[") and annotation.endswith("]"):
        return value is None or _has_type(value, annotation[len("Optional["):-1])
    allowed = ANNOTATED_TYPES.get(annotation)
    if allowed is None:  # unannotated, or a type this check does not know
        return True
    if isinstance(value, bool):  # bool is an int to Python, not to a reader of the plan
        return bool in allowed
    return isinstance(value, allowed)


def training_configs(runs: list[NotebookRun]) -> list[Config]:
    """The resolved config of every (dataset, model) row the runs train, built as the notebooks
    build theirs: the run's overrides, then data_root, the dataset and the model. A notebook
    without a model parameter (03_figures) trains nothing."""
    configs = []
    for run in runs:
        declared = notebook_parameters(run.notebook)
        if not {"model", "models"} & declared.keys():
            continue
        values = {**{name: ast.literal_eval(info["default"]) for name, info in declared.items()}, **run.parameters}
        datasets = values["datasets"] if "datasets" in values else [values["dataset"]]
        models = values["models"] if "models" in values else [values["model"]]
        overrides = {**values.get("overrides", {}), "data.root": values.get("data_root", "data")}
        for dataset, model in itertools.product(datasets, models):
            configs.append(resolve(values.get("preset", "cpu"),
                                   overrides={**overrides, "data.dataset": dataset, "model.name": model}))
    return configs


def run_plan(path: str | Path, *, output_dir: str | Path = "results/notebooks", force: bool = False,
             only: list[str] | None = None, extra_parameters: dict | None = None,
             kernel_name: str = "python3") -> pd.DataFrame:
    """Execute a plan's notebooks in order; return one row per run with its status
    (``ok``, ``skipped`` or ``failed``), seconds, executed notebook and error."""
    plan_name, runs = load_plan(path, extra_parameters, only)
    missing = staging.missing_report(staging.check(staging.merge_needs(staging.config_needs(training_configs(runs)))))
    if missing:  # stop in seconds, not row by row after minutes each
        raise PlanError(f"plan {path} cannot run yet. {missing}\n`biotune data check {path}` lists what it needs.")
    folder = Path(output_dir) / plan_name
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in runs:
        output, marker = folder / f"{run.name}.ipynb", folder / f"{run.name}.done.json"
        signature = {"parameters": run.parameters, "notebook_sha256": _sha256(run.notebook)}
        row = {"name": run.name, "output": str(output), "error": None}
        if not force and not run.always and marker.is_file() and _same_signature(marker, signature):
            log.info("%s: finished before with the same parameters; skipped (force to rerun)", run.name)
            rows.append({**row, "status": "skipped", "seconds": 0.0})
            continue
        marker.unlink(missing_ok=True)
        log.info("%s: executing %s -> %s", run.name, run.notebook, output)
        started = time.time()
        try:
            papermill.execute_notebook(str(run.notebook), str(output), parameters=run.parameters,
                                       kernel_name=kernel_name, cwd=os.getcwd(), progress_bar=False)
        except Exception as error:  # noqa: BLE001 - a failed notebook is reported, the batch goes on
            log.error("%s failed; the executed notebook %s shows where", run.name, output)
            rows.append({**row, "status": "failed", "seconds": round(time.time() - started, 1),
                         "error": _short_error(error)})
            continue
        seconds = round(time.time() - started, 1)
        marker.write_text(json.dumps({**signature, "seconds": seconds, "finished_at": time.time()}, indent=2))
        rows.append({**row, "status": "ok", "seconds": seconds})
    return pd.DataFrame(rows, columns=["name", "status", "seconds", "output", "error"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_signature(marker: Path, signature: dict) -> bool:
    stored = json.loads(marker.read_text())
    return all(stored.get(key) == value for key, value in signature.items())


def _short_error(error: Exception) -> str:
    """The exception's name and first message line (papermill's carries the cell's traceback)."""
    name = getattr(error, "ename", type(error).__name__)
    value = getattr(error, "evalue", str(error))
    return f"{name}: {str(value).strip().splitlines()[0] if str(value).strip() else ''}"
