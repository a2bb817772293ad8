"""Stores and checkpoints written by older code still resume under today's code.

``fixtures/search_before_tidy`` is a smoke search written by commit 2456c32 (before the tidy-up
of issue 22; ``make_fixture.py`` is how) and stopped by Ctrl-C inside generation 1: a checkpoint
after generation 0, one evaluation stored past it. Resumed here, it must end exactly like an
uninterrupted search run by today's code.
"""
import shutil
import warnings
from pathlib import Path

import pytest

import biotune
from biotune import config as cfg
from biotune.store import RunStore

FIXTURE = Path(__file__).parent / "fixtures" / "search_before_tidy"
RUN_ID = "20261205-001354-biotune-synthetic-29ad"
OVERRIDES = {"results_dir": "results", "data.root": "data", "ga.generations": 3, "ga.population": 4}


def comparable(frame):
    return frame[["seq", "generation", "role", "fold", "genes", "fitness", "status"]].to_dict("records")


@pytest.mark.filterwarnings("error::biotune.config.DeprecatedKey")  # its stored `run` section is read silently
def test_a_search_stopped_by_older_code_resumes_to_what_todays_code_computes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the fixture's config names its folders relative to where it ran
    shutil.copytree(FIXTURE, tmp_path / "results", ignore=shutil.ignore_patterns("*.py"))
    with RunStore("results/runs.sqlite") as store:
        assert store.run(RUN_ID)["status"] == "interrupted"
        stored = len(store.evaluations(RUN_ID))

    resumed = biotune.search(resume=RUN_ID, store="results/runs.sqlite", progress=False)
    fresh = biotune.search(preset="smoke", store=tmp_path / "fresh.sqlite", overrides=OVERRIDES, progress=False)

    assert stored < len(fresh.evaluations)
    assert comparable(resumed.evaluations) == comparable(fresh.evaluations)
    assert resumed.best_genes == fresh.best_genes
    assert resumed.evaluations["train_runs"].sum() == fresh.evaluations["train_runs"].sum()


def test_a_stored_run_section_loads_silently_and_the_run_is_reused_by_todays_config(tmp_path):
    """Its config names the executor's settings `run` (before issue 22 named them `executor`):
    read without a warning, and the run keeps its identity, so today's same config reuses it."""
    shutil.copytree(FIXTURE, tmp_path / "results", ignore=shutil.ignore_patterns("*.py"))
    with RunStore(tmp_path / "results" / "runs.sqlite") as store:
        stored = store.run(RUN_ID)["config"]
        assert stored["run"]["executor"] == "serial" and "executor" not in stored
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            assert cfg.from_dict(stored).executor == cfg.ExecutorConfig()
        todays = cfg.resolve("smoke", overrides=OVERRIDES)
        assert store.matching_run("biotune", todays.to_dict())["run_id"] == RUN_ID
        elsewhere = cfg.resolve("smoke", overrides={**OVERRIDES, "executor.kind": "process", "executor.workers": 2})
        assert store.matching_run("biotune", elsewhere.to_dict())["run_id"] == RUN_ID  # the executor is no part of it
