"""A multi-seed study: datasets x methods x seeds through the run store, and its statistics.

A seed s is one matched cell: it sets the search seed (``ga.seed``), the training seeds
(``train.seeds``, the preset's shifted by s) and the data subsample and folds (``data.split_seed``)
together, the same for every method, so that methods are compared on the same cells (paired).
Cell 0 is the preset's own run. Rows go through ``batch.run_many`` (a row in the store is reused,
an unfinished one resumed) and each is appended to ``rows.csv`` as it ends: a study continues
from that file too, on a machine without the run store (rows of another setup are not reused).

Outputs in ``<results_dir>/study/<name>/``: ``rows.csv`` (one line per dataset, method and seed),
``summary.csv`` (per dataset and method: n, mean and its 95% interval) and ``paired.csv`` (each
method against each reference method, per dataset and over all cells), for the test and the
validation macro accuracy (``metric`` column), and their figures; statistics in stats.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd

from . import config as cfg
from . import plots, stats
from .batch import run_many
from .bookkeeping import make_folder, provenance
from .experiment import run_overrides
from .report import summary
from .store import RESULTS_VERSION, REUSE_IGNORES, RunStore

log = logging.getLogger(__name__)

REFERENCES = ("full", "random")  # does searching beat full fine-tuning; does evolution beat random search
METRICS = {"test_macro_acc": "test", "val_macro_acc": "validation"}
NUMBERS = ["test_macro_acc", "val_macro_acc", "trainable_share", "seconds", "train_runs"]
ROW_COLUMNS = ["dataset", "method", "seed", "status", *NUMBERS, "run_id", "setup", "error"]
CELL = ["dataset", "method", "seed"]


def cell_overrides(seed: int, preset: str, overrides: dict | None = None) -> dict:
    """The overrides of cell ``seed``: search seed, training seeds and data split, shifted together."""
    base = cfg.resolve(preset, overrides=run_overrides(None, None, overrides, None))
    return {**(overrides or {}), "ga.seed": base.ga.seed + seed, "data.split_seed": base.data.split_seed + seed,
            "train.seeds": [s + seed for s in base.train.seeds]}


def study_cells(datasets: list[str], methods: list[str], seeds: int) -> pd.DataFrame:
    """dataset, method, seed of every row: seed-major, so a study stopped early has whole cells."""
    if seeds < 1:
        raise ValueError(f"a study needs at least one seed, got {seeds}")
    if not datasets or not methods:
        raise ValueError("a study needs at least one dataset and one method")
    return pd.DataFrame([{"dataset": dataset, "method": method, "seed": seed}
                         for seed in range(seeds) for dataset in datasets for method in methods])


def study_rows(cells: pd.DataFrame, *, preset: str = "cpu", model: str | None = None,
               overrides: dict | None = None) -> list[dict]:
    """The rows of ``run_many`` for ``cells``."""
    return [{"method": cell.method, "dataset": cell.dataset, "model": model, "preset": preset,
             "overrides": cell_overrides(cell.seed, preset, overrides),
             "label": f"{cell.dataset} | {cell.method} | seed {cell.seed}"} for cell in cells.itertuples()]


def run_study(name: str, datasets: list[str], methods: list[str], seeds: int = 3, *, preset: str = "cpu",
              model: str | None = None, overrides: list[str] | dict | None = None,
              references: tuple[str, ...] = REFERENCES, jobs: int = 1, executor: str = "process",
              gpus: list[int] | None = None, store: str | Path | None = None,
              output_dir: str | Path | None = None, progress: bool = False) -> tuple[dict[str, pd.DataFrame], Path]:
    """Run (or continue) the study; write its tables and figures to ``output_dir`` (default
    ``<results_dir>/study/<name>/``) and return the tables by name and the folder. ``jobs``,
    ``executor`` and ``gpus`` say where rows run, as in ``batch.run_many``."""
    overrides = cfg.flat_overrides(overrides)
    config = cfg.resolve(preset, overrides=run_overrides(None, model, overrides, store))
    folder = make_folder(Path(output_dir) if output_dir is not None else Path(config.results_dir) / "study" / name,
                         f"study {name}'s folder", "--results-dir DIR")
    setup = setup_key(preset, config.model.name, overrides)  # the model resolved: None and the preset's are one
    cells = study_cells(datasets, methods, seeds)
    todo = cells[~_in(cells, _rows(folder / "rows.csv", setup).query("status == 'ok'"))].reset_index(drop=True)
    log.info("study %s: %d of %d rows to run (the others are in %s)", name, len(todo), len(cells), folder / "rows.csv")

    def record(index: int, outcome: dict) -> None:
        numbers = summary(config.store_path, [outcome["run_id"]]).iloc[0][NUMBERS].to_dict() \
            if outcome["status"] == "ok" else {}
        line = {**todo.iloc[index].to_dict(), "status": outcome["status"], **numbers, "run_id": outcome["run_id"],
                "setup": setup, "error": outcome["error"]}
        file = folder / "rows.csv"
        pd.DataFrame([line], columns=ROW_COLUMNS).to_csv(file, mode="a", index=False, header=not file.is_file())

    if len(todo):
        run_many(study_rows(todo, preset=preset, model=model, overrides=overrides), jobs=jobs, executor=executor,
                 gpus=gpus, store=config.store_path, progress=progress, on_finished=record)
    rows = _rows(folder / "rows.csv", setup)
    tables = study_tables(rows[_in(rows, cells)].reset_index(drop=True), references)
    command = " ".join(["biotune study --name", name, "--preset", preset, "--datasets", *datasets, "--methods",
                        *methods, "--seeds", str(seeds), *(["--model", model] if model else []),
                        *(f"--{key} {json.dumps(value)}" for key, value in overrides.items()), "--jobs", str(jobs)])
    write_outputs(folder, tables, references, command, config.store_path)
    log.info("study %s: %d of %d rows finished; tables and figures in %s", name,
             int((tables["rows"]["status"] == "ok").sum()), len(cells), folder)
    return tables, folder


def write_outputs(folder: Path, tables: dict[str, pd.DataFrame], references, command: str, store: Path) -> None:
    """summary.csv, paired.csv, provenance.json (what made them, for the published tables) and the
    figures; rows.csv is written row by row as rows finish."""
    for table_name in ("summary", "paired"):
        tables[table_name].to_csv(folder / f"{table_name}.csv", index=False)
    ok = tables["rows"][tables["rows"]["status"] == "ok"]
    previous = json.loads((folder / "provenance.json").read_text()) if (folder / "provenance.json").is_file() else {}
    rows_key = hashlib.sha256(" ".join(sorted(ok["run_id"].astype(str))).encode()).hexdigest()[:12]
    if previous.get("rows_key") != rows_key:  # kept while the rows are the same: when and how they were made
        made = provenance(command, rows=len(ok), rows_key=rows_key, row_seconds=round(float(ok["seconds"].sum()), 1),
                          rows_trained_at=_trained_at(store, ok["run_id"].tolist(), previous))
        (folder / "provenance.json").write_text(json.dumps(made, indent=2) + "\n")
    if len(ok):
        plots.save(plots.study_means(tables["summary"]), folder, "means")
        for reference in references:
            if (tables["paired"]["reference"] == reference).any():
                plots.save(plots.paired_differences(tables["paired"], reference), folder, f"paired_vs_{reference}")


def _trained_at(store: Path, run_ids: list[str], previous: dict) -> list[str]:
    """The commits whose code started the rows' runs (each run's metadata; a run resumed later
    keeps the commit it started at), merged with what the previous provenance said for rows
    whose runs this store does not hold."""
    commits = []
    if Path(store).is_file():
        with RunStore(store) as db:
            known = set(db.runs()["run_id"])
            commits = [db.run(run_id)["meta"].get("git_commit") for run_id in run_ids if run_id in known]
    return list(dict.fromkeys([*previous.get("rows_trained_at", []), *(c for c in commits if c)]))


def setup_key(preset: str, model: str, overrides: dict) -> str:
    """What makes a study's rows comparable: preset, model, the overrides that change results
    (not where runs execute: data.root, results_dir, threads, device, the executor) and the
    results version of the code (store.RESULTS_VERSION)."""
    kept = {key: value for key, value in overrides.items()
            if key not in REUSE_IGNORES and key.split(".")[0] not in REUSE_IGNORES}
    text = json.dumps({"preset": preset, "model": model, "overrides": kept, "results_version": RESULTS_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _rows(file: Path, setup: str) -> pd.DataFrame:
    """The rows of this setup written so far, the latest line per cell (a failed row run again)."""
    if not file.is_file():
        return pd.DataFrame(columns=ROW_COLUMNS)
    rows = pd.read_csv(file, dtype={"dataset": str, "method": str, "setup": str, "run_id": str})
    return rows[rows["setup"] == setup].drop_duplicates(CELL, keep="last")


def _in(frame: pd.DataFrame, cells: pd.DataFrame) -> pd.Series:
    """Whether each row of ``frame`` is one of ``cells`` (dataset, method, seed)."""
    keys = set(cells[CELL].itertuples(index=False, name=None))
    return pd.Series([key in keys for key in frame[CELL].itertuples(index=False, name=None)], index=frame.index,
                     dtype=bool)


def study_tables(rows: pd.DataFrame, references: tuple[str, ...] = REFERENCES) -> dict[str, pd.DataFrame]:
    """The rows, and the summary and paired tables of their finished ones."""
    ok = rows[rows["status"] == "ok"]
    return {
        "rows": rows,
        "summary": pd.concat([stats.summarize(ok, metric).assign(metric=name) for metric, name in METRICS.items()],
                             ignore_index=True),
        "paired": pd.concat([stats.paired(ok, metric, list(references)).assign(metric=name)
                             for metric, name in METRICS.items()], ignore_index=True),
    }
