"""The run store: one SQLite file holding runs, every evaluation, the evaluation cache and results.

Each evaluation is committed the moment it finishes, so a crash, a kill -9 or Ctrl-C never loses
one; a resumed run replays its search and takes finished evaluations from here (by sequence
number) instead of training again. SQLite's WAL journal keeps readers (a notebook, ``biotune
runs``) from blocking the writer.
"""
from __future__ import annotations

import functools
import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .config import Config, ConfigError, from_dict

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id      TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,          -- search | baseline
    method      TEXT NOT NULL,          -- biotune | random | tpe | cmaes | full | linear_probe | ...
    dataset     TEXT NOT NULL,
    model       TEXT NOT NULL,
    preset      TEXT NOT NULL,
    status      TEXT NOT NULL,          -- running | finished | failed | interrupted
    config      TEXT NOT NULL,          -- resolved config (JSON)
    meta        TEXT NOT NULL,          -- git commit, versions, device (JSON)
    started_at  REAL NOT NULL,
    finished_at REAL,
    result      TEXT                    -- best genome, fitness, budget (JSON)
);
CREATE TABLE IF NOT EXISTS evaluations (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    seq         INTEGER NOT NULL,       -- order of the evaluation within the run
    generation  INTEGER NOT NULL,       -- -1: initial population
    individual  INTEGER NOT NULL,
    role        TEXT NOT NULL,          -- init | rescore | exploit | child | random | trial
    fold        INTEGER NOT NULL,
    genes       TEXT NOT NULL,          -- JSON list
    trained     TEXT NOT NULL,          -- JSON 0/1 mask per block
    multipliers TEXT NOT NULL,          -- JSON block -> lr multiplier (trained blocks)
    status      TEXT NOT NULL,          -- ok | diverged | pruned | no_trained_block
    fitness     REAL NOT NULL,
    val_macro_acc REAL, val_top1 REAL, val_loss REAL,  -- means over seeds
    per_seed    TEXT NOT NULL,          -- JSON list: seed, metrics, epochs, seconds, status
    train_runs  INTEGER NOT NULL,       -- training runs spent (0 for a cache hit)
    cache_hit   INTEGER NOT NULL,
    prefix_cache TEXT NOT NULL DEFAULT 'n/a',  -- frozen-prefix activations: hit | miss | n/a
    seconds     REAL NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS cache (
    run_id  TEXT NOT NULL,
    key     TEXT NOT NULL,              -- fold, seeds, training preset, decoded plan (4 decimals)
    value   TEXT NOT NULL,              -- JSON: fitness, status, metrics, per_seed
    PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS finals (
    run_id      TEXT NOT NULL REFERENCES runs(run_id),
    method      TEXT NOT NULL,
    setting     TEXT NOT NULL,          -- hyperparameters (JSON); one row per setting and seed
    seed        INTEGER NOT NULL,
    selected    INTEGER NOT NULL DEFAULT 0,  -- the setting with the best mean validation macro acc
    train_runs  INTEGER NOT NULL,       -- training runs this row cost (LP-FT: 2)
    status      TEXT NOT NULL,
    test_macro_acc REAL, test_top1 REAL, test_loss REAL,
    val_macro_acc REAL, best_epoch INTEGER, epochs INTEGER,
    trainable_share REAL NOT NULL,
    seconds     REAL NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (run_id, method, setting, seed)
);
"""

JSON_COLUMNS = ("genes", "trained", "multipliers", "per_seed")
# Bumped when the code computes other numbers for the same config; a run stored by another
# version is not reused (1: before it was recorded; 2: images resized in float32 on every device).
RESULTS_VERSION = 2
# Where a run is written or executed, not what it computes: a search made on a GPU box is reused
# on a laptop, whatever the data folder or thread count. data.store_at: the same float resize
# either way; executor: where training runs execute (stored before as run, which a study's
# overrides may still say: both are ignored, so old and new configs keep one identity).
REUSE_IGNORES = ("store", "results_dir", "data.root", "data.download", "data.verify", "data.store_at", "data.cache",
                 "model.allow_download", "train.device", "train.num_threads", "executor", "run")


class RunNotFoundError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class StoreError(ValueError):
    """A run store file that is not a readable SQLite database."""


class RunStore:
    def __init__(self, path: str | Path | None = None):
        """Open (or create) the store at ``path``; None: the default, results/runs.sqlite.

        A file that is not SQLite, or a damaged one (a truncated copy, say), is refused here with
        a message, not met later as a traceback half-way through a run.
        """
        self.path = Path(path) if path is not None else Config().store_path
        if self.path.is_dir():
            raise StoreError(f"run store {self.path} is a folder; pass a file, e.g. --store {self.path / 'runs.sqlite'}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30)
        except (OSError, sqlite3.OperationalError) as error:  # e.g. a folder under /proc, a read-only disk
            raise StoreError(f"cannot create the run store {self.path} in {self.path.parent} "
                             f"({getattr(error, 'strerror', None) or error}); pass --store with a file in a folder "
                             "you can write to, e.g. --store runs.sqlite") from None
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            _add_missing_columns(self.db)
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as error:
            problems = [str(error)]
        if problems != ["ok"]:
            self.db.close()
            raise StoreError(f"{self.path} is not a readable run store (SQLite says: {'; '.join(problems[:3])}). "
                             "Pass another file with --store, or move this one away to start a new store")

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextmanager
    def _write(self):
        with self.db:  # one transaction, committed on exit
            yield self.db

    # runs ------------------------------------------------------------------------------------
    def create_run(self, run_id: str, *, kind: str, method: str, config: dict, meta: dict) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (run_id, kind, method, dataset, model, preset, status, config, meta, started_at)"
                " VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                (run_id, kind, method, config["data"]["dataset"], config["model"]["name"], config["preset"],
                 json.dumps(config), json.dumps(meta), time.time()),
            )

    def run(self, run_id: str) -> dict:
        row = self.db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            known = [r[0] for r in self.db.execute("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 5")]
            raise RunNotFoundError(
                f"no run {run_id!r} in {self.path}; recent runs: {', '.join(known) or 'none'} "
                "(`biotune runs` lists them all; --store picks another store file)"
            )
        run = dict(row)
        for key in ("config", "meta", "result"):
            run[key] = json.loads(run[key]) if run[key] else None
        return run

    def set_status(self, run_id: str, status: str, result: dict | None = None) -> None:
        with self._write() as db:
            if result is None:
                db.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))
            else:
                db.execute("UPDATE runs SET status = ?, result = ?, finished_at = ? WHERE run_id = ?",
                           (status, json.dumps(result), time.time(), run_id))

    def matching_run(self, method: str, config: dict, meta_match: dict | None = None) -> dict | None:
        """The newest run of ``method`` with the same resolved config (``REUSE_IGNORES`` aside),
        made by code of the same ``RESULTS_VERSION``, and ``meta_match`` items in its metadata;
        finished runs first. Lets a batch that stopped part-way reuse what is done and continue
        what is not."""
        wanted = _comparable(config)
        meta_match = {"results_version": RESULTS_VERSION, **(meta_match or {})}
        rows = self.db.execute(
            "SELECT run_id FROM runs WHERE method = ? AND dataset = ? AND model = ? AND preset = ?"
            " ORDER BY status = 'finished' DESC, started_at DESC",
            (method, config["data"]["dataset"], config["model"]["name"], config["preset"])).fetchall()
        for (run_id,) in rows:
            run = self.run(run_id)
            meta = {"results_version": 1, **run["meta"]}  # runs stored before the version was recorded
            if _comparable(_with_defaults(run["config"])) == wanted and all(meta.get(k) == v for k, v in meta_match.items()):
                return run
        return None

    def runs(self) -> pd.DataFrame:
        frame = pd.read_sql_query(
            "SELECT r.run_id, r.kind, r.method, r.dataset, r.model, r.preset, r.status, r.started_at,"
            " r.finished_at, COUNT(e.seq) AS evaluations, COALESCE(SUM(e.train_runs), 0) AS train_runs,"
            " MIN(e.fitness) AS best_fitness FROM runs r LEFT JOIN evaluations e ON e.run_id = r.run_id"
            " GROUP BY r.run_id ORDER BY r.started_at", self.db)
        for column in ("started_at", "finished_at"):
            frame[column] = pd.to_datetime(frame[column], unit="s")
        return frame

    # evaluations -----------------------------------------------------------------------------
    def add_evaluation(self, run_id: str, row: dict, cached: tuple[str, dict] | None = None) -> None:
        """Record an evaluation and, if given, its ``(key, value)`` cache entry in one transaction:
        a kill between the two would leave a cache entry whose training the resumed run does not
        count."""
        values = {k: (json.dumps(v) if k in JSON_COLUMNS else v) for k, v in row.items()}
        values.update(run_id=run_id, finished_at=time.time())
        columns = ", ".join(values)
        with self._write() as db:
            db.execute(f"INSERT INTO evaluations ({columns}) VALUES ({', '.join('?' * len(values))})",
                       list(values.values()))
            if cached is not None:
                key, value = cached
                db.execute("INSERT OR REPLACE INTO cache (run_id, key, value) VALUES (?, ?, ?)",
                           (run_id, key, json.dumps(value)))

    def evaluation(self, run_id: str, seq: int) -> dict | None:
        row = self.db.execute("SELECT * FROM evaluations WHERE run_id = ? AND seq = ?", (run_id, seq)).fetchone()
        return _decode(dict(row)) if row else None

    def drop_trailing_failures(self, run_id: str) -> int:
        """Delete the failed evaluations after the run's last evaluation that did not fail (those
        that stopped a search, ``fitness.MAX_FAILED_IN_A_ROW``), so a resume trains them again;
        nothing stored after them depends on them. Returns how many were deleted."""
        with self._write() as db:
            cursor = db.execute(
                "DELETE FROM evaluations WHERE run_id = ? AND status = 'failed' AND seq > COALESCE("
                "(SELECT MAX(seq) FROM evaluations WHERE run_id = ? AND status != 'failed'), -1)", (run_id, run_id))
        return cursor.rowcount

    def evaluations(self, run_id: str | None = None) -> pd.DataFrame:
        """One row per evaluation (tidy); JSON columns decoded to Python objects."""
        query, args = "SELECT * FROM evaluations", ()
        if run_id is not None:
            self.run(run_id)
            query, args = query + " WHERE run_id = ?", (run_id,)
        frame = pd.read_sql_query(query + " ORDER BY run_id, seq", self.db, params=args)
        for column in JSON_COLUMNS:
            frame[column] = frame[column].map(json.loads)
        frame["cache_hit"] = frame["cache_hit"].astype(bool)
        return frame

    def generations(self, run_id: str) -> pd.DataFrame:
        """The GA logbook of a finished search: best, mean, std, worst, diversity per generation."""
        result = self.run(run_id)["result"] or {}
        return pd.DataFrame(result.get("generations", []))

    # cache -----------------------------------------------------------------------------------
    def cached(self, run_id: str, key: str) -> dict | None:
        row = self.db.execute("SELECT value FROM cache WHERE run_id = ? AND key = ?", (run_id, key)).fetchone()
        return json.loads(row[0]) if row else None

    # final protocol --------------------------------------------------------------------------
    def add_final(self, run_id: str, row: dict) -> None:
        values = dict(row, run_id=run_id, finished_at=time.time())
        with self._write() as db:
            db.execute(f"INSERT OR REPLACE INTO finals ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                       list(values.values()))

    def select_final_setting(self, run_id: str, method: str) -> pd.DataFrame:
        """Mark the setting with the best mean validation macro accuracy; return its rows. A seed
        that diverged counts as 0, so a setting is not chosen on the seeds that survived it."""
        finals = self.finals(run_id)
        finals = finals[finals["method"] == method]
        scores = finals["val_macro_acc"].where(finals["status"] == "ok", 0.0)
        best = scores.groupby(finals["setting"]).mean().fillna(-1.0).idxmax()
        with self._write() as db:
            db.execute("UPDATE finals SET selected = (setting = ?) WHERE run_id = ? AND method = ?",
                       (best, run_id, method))
        chosen = self.finals(run_id)
        return chosen[(chosen["method"] == method) & (chosen["selected"] == 1)]

    def finals(self, run_id: str | None = None) -> pd.DataFrame:
        query, args = "SELECT * FROM finals", ()
        if run_id is not None:
            query, args = query + " WHERE run_id = ?", (run_id,)
        return pd.read_sql_query(query + " ORDER BY run_id, method, seed", self.db, params=args)

    def export_csv(self, run_id: str, folder: str | Path) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, frame in (("evaluations", self.evaluations(run_id)), ("final", self.finals(run_id))):
            if len(frame):
                path = folder / f"{name}.csv"
                frame.to_csv(path, index=False)
                written.append(path)
        return written


def _add_missing_columns(db: sqlite3.Connection) -> None:
    """Columns added since a store was created (CREATE TABLE IF NOT EXISTS keeps old tables as they were)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(evaluations)")}
    if "prefix_cache" not in columns:
        with db:
            db.execute("ALTER TABLE evaluations ADD COLUMN prefix_cache TEXT NOT NULL DEFAULT 'n/a'")


def _with_defaults(stored: dict) -> dict:
    """A stored config with the keys added since it was stored, at their defaults (which keep
    the earlier behaviour), so a run made before a new option existed is still reused."""
    try:
        return from_dict(stored).to_dict()
    except ConfigError:  # a value no longer valid: this run cannot match a valid config
        return stored


def _comparable(config: dict) -> dict:
    """``config`` without the ``REUSE_IGNORES`` settings (sections are one level deep), and with
    ``train.amp`` "auto" as the precision it stands for: a run stored with ``amp: true`` (the
    default before "auto") is the same run as an "auto" one of a model registered with bf16."""
    kept = {}
    for key, value in config.items():
        if key in REUSE_IGNORES:
            continue
        if isinstance(value, dict):
            kept[key] = {k: v for k, v in value.items() if f"{key}.{k}" not in REUSE_IGNORES}
        else:
            kept[key] = value
    if kept.get("train", {}).get("amp") == "auto":
        kept["train"] = {**kept["train"], "amp": _registered_amp(config["model"]["name"])}
    return kept


@functools.cache
def _registered_amp(model: str) -> bool | str:
    from .models import (
        meta_arch,  # models import torch and timm: only when a stored run is compared
    )

    try:
        return meta_arch(model).amp
    except Exception:  # noqa: BLE001 - a model this install cannot build: compare "auto" as written
        return "auto"


def _decode(row: dict) -> dict:
    for column in JSON_COLUMNS:
        row[column] = json.loads(row[column])
    return row
