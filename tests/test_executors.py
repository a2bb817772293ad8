"""Executors (biotune/executors.py): serial, a process pool and a local Ray give the same search,
stored under the same sequence numbers; failures are retried once; Ray is imported only when asked."""
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import biotune
from biotune import config as cfg
from biotune import fitness, ga
from biotune.executors import (
    ProcessExecutor,
    RayExecutor,
    SerialExecutor,
    TaskFailure,
    TrainingFailedError,
    make_executor,
)
from biotune.store import RunStore

COLUMNS = ["seq", "generation", "individual", "role", "fold", "genes", "status", "fitness", "train_runs", "cache_hit"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on this machine's two cores, shared by the tests of this module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test file
    yield ray
    ray.shutdown()


def search_overrides(smoke_config, tmp_path, **extra) -> dict:
    """A smoke search with two seeds per evaluation, pruning, the evaluation cache and a final
    re-score: every kind of batch the executors see."""
    return {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results"),
            "ga.population": 4, "ga.generations": 3, "ga.elites": 1, "train.seeds": [0, 1], "train.max_epochs": 2,
            "train.patience": 2, "ga.prune": True, "ga.prune_warmup": 2, "ga.final_selection": "rescore_top_k",
            "ga.rescore_k": 2, "train.num_threads": 1, **extra}


def run_search(tmp_path, name: str, overrides: dict):
    return biotune.search(preset="smoke", store=tmp_path / f"{name}.sqlite", overrides=overrides, progress=False)


# -- the seam -------------------------------------------------------------------------------------


def flaky(shared, counter: str, failures: int) -> str:
    """Raises on its first ``failures`` calls (counted in a file, so across processes)."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls <= failures:
        raise RuntimeError(f"call {calls} fails")
    return f"{shared} after {calls} calls"


@dataclass
class Tokened:
    """A shared input with a token, like a search's FitnessInputs."""

    token: str
    calls: int = 0


def count_on_shared(shared: Tokened, _: int) -> tuple[str, int]:
    shared.calls += 1  # what a call builds on the shared input (a search's prefix cache)
    return shared.token, shared.calls


def test_a_worker_keeps_the_shared_input_of_the_latest_token_between_calls():
    with ProcessExecutor(workers=1, threads=1) as executor:
        first = sorted(result for _, result in executor.map(count_on_shared, [(i,) for i in range(3)], Tokened("a")))
        other = [result for _, result in executor.map(count_on_shared, [(0,)], Tokened("b"))]
        again = [result for _, result in executor.map(count_on_shared, [(0,)], Tokened("a"))]
    assert first == [("a", 1), ("a", 2), ("a", 3)]  # each call arrived as a new copy; the worker kept the first
    assert other == [("b", 1)] and again == [("a", 1)]  # a new search's input replaces the previous one's


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["serial", "process", "ray"])
def test_a_call_that_raises_is_retried_once_then_reported_and_the_others_go_on(kind, tmp_path, request):
    if kind == "ray":
        request.getfixturevalue("local_ray")
        executor = RayExecutor(workers=2, threads=1)
    else:
        executor = SerialExecutor() if kind == "serial" else ProcessExecutor(workers=2, threads=1)
    calls = [(str(tmp_path / "once"), 1), (str(tmp_path / "always"), 5), (str(tmp_path / "never"), 0)]
    with executor:
        results = dict(executor.map(flaky, calls, executor.share("shared")))
    assert results[0] == "shared after 2 calls"  # the retry succeeded
    assert isinstance(results[1], TaskFailure) and "RuntimeError: call 2 fails" in results[1].error
    assert (tmp_path / "always").read_text() == "2"  # one retry, not more
    assert results[2] == "shared after 1 calls"


def dies_once(shared, counter: str, die: bool) -> int:
    """Kills its worker process on its first call when ``die``; returns how often it was called."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if die and calls == 1:
        os._exit(1)
    time.sleep(0.2)
    return calls


@pytest.mark.slow
def test_a_dead_pool_worker_costs_only_the_runs_that_were_going(tmp_path):
    calls = [(str(tmp_path / "dies"), True), *((str(tmp_path / f"run{i}"), False) for i in range(4))]
    with ProcessExecutor(workers=2, threads=1) as executor:
        results = dict(executor.map(dies_once, calls))
    assert results[0] == 2  # the run that killed its worker, retried
    assert all(results[i] in (1, 2) for i in range(1, 5)) and sum(results[i] == 1 for i in range(1, 5)) >= 3
    # at most the one run that shared the pool with it then spends an attempt; the queued ones do not


def test_make_executor_follows_the_run_section():
    train = cfg.TrainConfig(num_threads=1)
    assert isinstance(make_executor(cfg.ExecutorConfig(), train), SerialExecutor)
    pool = make_executor(cfg.ExecutorConfig(kind="process", workers=2), train)
    assert isinstance(pool, ProcessExecutor) and pool.workers == 2 and pool.threads == 1


def test_ray_missing_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(cfg.ConfigError, match=r"executor.kind=ray needs Ray .*pip install"):
        make_executor(cfg.ExecutorConfig(kind="ray", workers=2), cfg.TrainConfig())


def test_import_biotune_and_a_serial_search_do_not_import_ray(tmp_path, smoke_config):
    code = ("import sys, biotune\n"
            f"biotune.search(preset='smoke', store={str(tmp_path / 's.sqlite')!r}, progress=False, overrides="
            f"{{'data.root': {smoke_config.data.root!r}, 'results_dir': {str(tmp_path / 'results')!r}}})\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# -- the same search, whichever executor ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("executor, searcher", [("process", "biotune"), ("ray", "biotune"), ("ray", "tpe")])
def test_a_search_gives_the_serial_evaluations_with_every_executor(executor, searcher, tmp_path, smoke_config,
                                                                   request):
    if executor == "ray":
        request.getfixturevalue("local_ray")
    overrides = search_overrides(smoke_config, tmp_path, **{"ga.searcher": searcher})
    serial = run_search(tmp_path, "serial", overrides)
    parallel = run_search(tmp_path, executor, {**overrides, "executor.kind": executor, "executor.workers": 2})
    assert parallel.evaluations[COLUMNS].to_dict("records") == serial.evaluations[COLUMNS].to_dict("records")
    assert parallel.best_genes == serial.best_genes and parallel.best_fitness == serial.best_fitness
    here = f"{socket.gethostname()}:{os.getpid()}"
    workers = {run["worker"] for per_seed in parallel.evaluations["per_seed"] for run in per_seed}
    assert workers and here not in workers  # the runs really went to other processes
    assert {run["worker"] for per_seed in serial.evaluations["per_seed"] for run in per_seed} == {here}
    if searcher == "biotune":  # the batches really held several runs, some pruned, some from the cache
        assert (serial.evaluations["status"] == "pruned").any()
        assert (serial.evaluations["role"] == "final_select").sum() == 2 * 2


@pytest.mark.slow
def test_a_search_killed_while_ray_tasks_run_resumes_to_the_serial_result(tmp_path, smoke_config):
    pytest.importorskip("ray")
    overrides = search_overrides(smoke_config, tmp_path, **{
        "data.options": {"num_classes": 3, "num_train": 600, "num_val": 96, "num_test": 48, "size": 16},
        "ga.generations": 4})
    reference = run_search(tmp_path, "reference", overrides)
    store = tmp_path / "killed.sqlite"
    flags = [f"--{key}={json.dumps(value)}" for key, value in overrides.items() if key != "results_dir"]
    command = [sys.executable, "-m", "biotune", "--store", str(store), "--results-dir", overrides["results_dir"],
               "search", "--preset", "smoke", "--quiet", "--executor", "ray", "--workers", "2", *flags]
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "driver.log", "w"))
    try:
        stored = _wait_for_evaluations(store, driver, at_least=6)
    finally:  # the driver and the local Ray it started, at once
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert 6 <= stored < len(reference.evaluations), "the search was not killed part-way"
    with RunStore(store) as db:
        run_id = db.runs()["run_id"].iloc[0]
        assert db.run(run_id)["status"] == "running"  # killed: nothing marked it
    resumed = biotune.search(resume=run_id, store=store, overrides={"executor.kind": "serial"}, progress=False)
    assert resumed.evaluations[COLUMNS].to_dict("records") == reference.evaluations[COLUMNS].to_dict("records")
    assert resumed.best_genes == reference.best_genes


def _wait_for_evaluations(store: Path, driver: subprocess.Popen, at_least: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and driver.poll() is None:
        if store.exists():
            with RunStore(store) as db:
                count = int(db.db.execute("SELECT COUNT(*) FROM evaluations").fetchone()[0])
            if count >= at_least:
                return count
        time.sleep(0.05)
    log = Path(store).parent / "driver.log"
    raise AssertionError(f"the driver ended (status {driver.poll()}) or took over {timeout} s before "
                         f"{at_least} evaluations were stored:\n{log.read_text()[-3000:]}")


def test_a_training_run_that_raises_twice_is_recorded_failed_and_the_search_goes_on(tmp_path, smoke_config,
                                                                                     monkeypatch):
    real_train, attempts = fitness.train, []

    def train_failing_on_the_third_run(*args, **kwargs):
        attempts.append(1)
        if len(attempts) in (3, 4):  # the third run and its retry
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(fitness, "train", train_failing_on_the_third_run)
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}
    result = run_search(tmp_path, "failing", overrides)
    failed = result.evaluations[result.evaluations["status"] == "failed"]
    assert failed["seq"].tolist() == [2]
    assert failed["fitness"].iloc[0] == fitness.WORST["acc"]
    assert "illegal memory access" in failed["per_seed"].iloc[0][0]["error"]
    assert len(result.evaluations) == len(ga.evaluation_schedule(cfg.resolve("smoke").ga, 2))
    trained = int((result.evaluations["train_runs"] > 0).sum())
    assert len(attempts) == trained + 1  # every trained evaluation once, the failing one twice
    with RunStore(tmp_path / "failing.sqlite") as db:  # a failure is not cached: the plan trains again if asked
        assert db.cached(result.run_id, "anything") is None
        keys = db.db.execute("SELECT value FROM cache WHERE run_id = ?", (result.run_id,)).fetchall()
        assert all(json.loads(value)["status"] != "failed" for (value,) in keys)


def test_a_search_whose_runs_fail_every_time_stops_with_the_error(tmp_path, smoke_config, monkeypatch):
    def broken_train(*args, **kwargs):
        raise ImportError("cannot import name 'fused_adam' from 'apex'")

    monkeypatch.setattr(fitness, "train", broken_train)
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}
    with pytest.raises(TrainingFailedError, match=r"3 evaluations in a row failed.*fused_adam.*--resume"):
        run_search(tmp_path, "broken", overrides)
    with RunStore(tmp_path / "broken.sqlite") as db:
        run = db.runs().iloc[0]
        assert run["status"] == "failed" and run["evaluations"] == fitness.MAX_FAILED_IN_A_ROW
    # the cause fixed, a resume trains the failed evaluations it stopped on: the search an
    # uninterrupted run makes
    monkeypatch.undo()
    resumed = biotune.search(resume=run["run_id"], store=tmp_path / "broken.sqlite", progress=False)
    reference = run_search(tmp_path, "reference", overrides)
    assert resumed.evaluations[COLUMNS].to_dict("records") == reference.evaluations[COLUMNS].to_dict("records")


def test_a_repeat_of_a_failed_plan_in_one_batch_is_trained_as_one_after_another_would(tmp_path, smoke_config,
                                                                                       smoke_inputs, monkeypatch):
    real_train, attempts = fitness.train, []

    def fail_twice(*args, **kwargs):  # the first run and its retry
        attempts.append(1)
        if len(attempts) <= 2:
            raise RuntimeError("transient")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(fitness, "train", fail_twice)
    model, dataset = smoke_inputs
    from biotune.data import make_folds

    folds = make_folds(dataset.train.labels, dataset.val.labels, 0.5, seed=0)
    store = RunStore(tmp_path / "repeat.sqlite")
    store.create_run("repeat", kind="search", method="biotune", config=smoke_config.to_dict(), meta={})
    evaluator = fitness.Evaluator(model=model, dataset=dataset, folds=folds, config=smoke_config, store=store,
                                  run_id="repeat", progress=False)
    genes = [0.9] * (len(model.blocks) + 1)
    genes[-1] = 0.1
    request = {"genes": genes, "fold": 0, "generation": 0, "role": "exploit"}
    evaluator.evaluate_many([{**request, "individual": i} for i in range(3)])
    rows = store.evaluations("repeat")[["seq", "status", "train_runs", "cache_hit"]].to_dict("records")
    assert rows == [{"seq": 0, "status": "failed", "train_runs": 1, "cache_hit": 0},
                    {"seq": 1, "status": "ok", "train_runs": 1, "cache_hit": 0},
                    {"seq": 2, "status": "ok", "train_runs": 0, "cache_hit": 1}]


def test_a_final_protocol_run_that_fails_is_not_stored_and_the_next_call_trains_only_it(tmp_path, smoke_config,
                                                                                          monkeypatch):
    trainer = importlib.import_module("biotune.methods.base")  # where Method.fit looks the trainer up
    real_train, attempts = trainer.train, []

    def train_failing_seed_1(model, dataset, plan, config, seed, **kwargs):
        attempts.append(seed)
        if seed == 1:
            raise RuntimeError("a transient failure")
        return real_train(model, dataset, plan, config, seed, **kwargs)

    monkeypatch.setattr(trainer, "train", train_failing_seed_1)
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results"), "train.seeds": [0, 1]}
    store = tmp_path / "final.sqlite"
    with pytest.raises(TrainingFailedError, match="1 of 2 training runs of the final protocol raised twice"):
        biotune.run_baseline("full", preset="smoke", overrides=overrides, grid=[{}], store=store, progress=False)
    assert attempts == [0, 1, 1]
    with RunStore(store) as db:
        run_id = db.runs()["run_id"].iloc[0]
        assert db.run(run_id)["status"] == "failed" and db.finals(run_id)["seed"].tolist() == [0]
    monkeypatch.setattr(trainer, "train", real_train)
    again, finals = biotune.run_baseline("full", preset="smoke", overrides=overrides, grid=[{}], store=store,
                                         reuse=True, progress=False)
    assert again == run_id and finals["seed"].tolist() == [0, 1]


# -- batches and breeding ----------------------------------------------------------------------


class BatchRecorder:
    """A deterministic fitness with ``evaluate_many``: records every batch it is given."""

    def __init__(self):
        self.batches, self.seq = [], 0

    def evaluate_many(self, requests):
        self.batches.append([(r["generation"], r["fold"], r["role"]) for r in requests])
        return [self(**r) for r in requests]

    def __call__(self, genes, *, fold, generation, individual, role):
        return round(abs(sum(genes) / len(genes) - 0.3 - 0.1 * fold), 6)


def run_ga(evaluate, tmp_path, **changes):
    config = cfg.GAConfig(**changes)
    search = ga.BioTuneGA(evaluate, num_blocks=6, num_genes=7, config=config, n_folds=2,
                          checkpoint_path=tmp_path / f"{len(list(tmp_path.iterdir()))}.json", progress=False)
    return search, search.run()


@pytest.mark.parametrize("breeding", ["steady", "generational"])
def test_batched_evaluation_gives_the_one_at_a_time_result(breeding, tmp_path):
    batched, one_at_a_time = BatchRecorder(), BatchRecorder()
    calls = []

    def plain(genes, **where):
        calls.append((where["generation"], where["fold"], where["role"]))
        return one_at_a_time(genes, **where)

    _, with_batches = run_ga(batched, tmp_path, breeding=breeding)
    _, singly = run_ga(plain, tmp_path, breeding=breeding)
    assert with_batches.best_genes == singly.best_genes and with_batches.logbook == singly.logbook
    assert [c for batch in batched.batches for c in batch] == calls


def test_generational_breeding_spends_the_steady_budget_in_the_scheduled_batches(tmp_path):
    steady_recorder, generational_recorder = BatchRecorder(), BatchRecorder()
    steady, steady_result = run_ga(steady_recorder, tmp_path)
    generational, generational_result = run_ga(generational_recorder, tmp_path, breeding="generational")
    assert generational.evaluations == steady.evaluations == len(ga.evaluation_schedule(steady.cfg, 2))
    sizes = [(generation, fold, len(batch)) for batch in generational_recorder.batches
             for (generation, fold, _) in batch[:1]]
    assert sizes == ga.evaluation_batches(generational.cfg, 2)
    children = [len(batch) for batch in generational_recorder.batches if batch[0][2] == "child"]
    assert children == [10 - 3] * 10  # N - E children at once, every generation
    assert max(len(b) for b in steady_recorder.batches if b[0][2] == "child") == 1  # steady: one child at a time
    assert generational_result.logbook != steady_result.logbook  # another algorithm


# -- configuration and the command line --------------------------------------------------------


def test_the_executor_section_is_typed_and_checked():
    with pytest.raises(cfg.ConfigError, match=r"executor.workers=0: expected .*greater than or equal to 1"):
        cfg.resolve("smoke", overrides={"executor.workers": 0})
    with pytest.raises(cfg.ConfigError, match="executor.workers=4 with executor.kind=serial .* --executor process"):
        cfg.resolve("smoke", overrides={"executor.workers": 4})
    with pytest.raises(cfg.ConfigError, match="executor.kind='dask': choose one of: serial, process, ray"):
        cfg.resolve("smoke", overrides={"executor.kind": "dask"})
    with pytest.raises(cfg.ConfigError, match="executor.gpus_per_run=0.25 needs executor.kind=ray"):
        cfg.resolve("cpu", overrides={"executor.gpus_per_run": 0.25})
    with pytest.raises(cfg.ConfigError, match="train.device=cpu"):
        cfg.resolve("smoke", overrides={"executor.kind": "ray", "executor.gpus_per_run": 0.25})
    assert cfg.resolve("cpu", overrides={"executor.kind": "ray", "executor.gpus_per_run": 0.25}).executor.gpus_per_run == 0.25


def test_another_executor_drops_the_stored_settings_it_cannot_use():
    from biotune.bookkeeping import with_executor_settings

    on_ray = cfg.resolve("cpu", overrides={"executor.kind": "ray", "executor.workers": 4, "executor.gpus_per_run": 0.25})
    on_pool = with_executor_settings(on_ray, {"kind": "process"})
    assert (on_pool.executor.kind, on_pool.executor.workers, on_pool.executor.gpus_per_run) == ("process", 4, 0.0)
    serial = with_executor_settings(on_ray, {"kind": "serial"})
    assert (serial.executor.workers, serial.executor.gpus_per_run) == (1, 0.0)


def test_the_executor_is_not_part_of_a_row_s_identity(tmp_path, smoke_config):
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}
    first = biotune.run_method("full", preset="smoke", overrides=overrides, store=tmp_path / "s.sqlite",
                               progress=False)
    again = biotune.run_method("full", preset="smoke", overrides={**overrides, "executor.kind": "process",
                                                                  "executor.workers": 2},
                               store=tmp_path / "s.sqlite", progress=False)
    assert again == first


def test_resume_takes_executor_settings_and_refuses_others(tmp_path, smoke_config):
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}
    run = run_search(tmp_path, "resume", overrides)
    store = tmp_path / "resume.sqlite"
    resumed = biotune.search(resume=run.run_id, store=store, overrides=["executor.kind=process", "executor.workers=2"],
                             progress=False)
    assert resumed.best_genes == run.best_genes
    assert biotune.search(resume=run.run_id, store=store, overrides=["executor.kind=serial"], progress=False).best_genes \
        == run.best_genes  # the stored 2 workers are dropped with the serial executor
    with pytest.raises(cfg.ConfigError, match=r"takes no --ga.population 5 \(only the executor's .*--executor\.\* settings"):
        biotune.search(resume=run.run_id, store=store, overrides=["ga.population=5"], progress=False)


def test_the_cli_takes_executor_and_workers_and_names_a_bad_value(tmp_path, smoke_config):
    base = [sys.executable, "-m", "biotune", "--store", str(tmp_path / "cli.sqlite"), "--results-dir",
            str(tmp_path / "results"), "search", "--preset", "smoke", "--quiet", "--data.root", smoke_config.data.root]
    bad = subprocess.run([*base, "--workers", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "executor.workers=0" in bad.stderr and "Traceback" not in bad.stderr
    typo = subprocess.run([*base, "--executor", "rey"], capture_output=True, text=True, timeout=120)
    assert typo.returncode == 2 and "invalid choice: 'rey'" in typo.stderr
    good = subprocess.run([*base, "--executor", "process", "--workers", "2"], capture_output=True, text=True,
                          timeout=300)
    assert good.returncode == 0, good.stderr
    run_id = good.stdout.split()[1].rstrip(":")
    final = subprocess.run([sys.executable, "-m", "biotune", "--store", str(tmp_path / "cli.sqlite"), "final", run_id,
                            "--quiet", "--executor", "process", "--executor.workers", "2"],
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0 and run_id in final.stdout, final.stderr


@pytest.mark.slow
def test_run_many_runs_rows_as_ray_tasks_and_reports_a_failed_row(tmp_path, smoke_config, local_ray):
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}
    rows = [{"method": "full", "label": "ok"}, {"method": "full", "dataset": "no_such_dataset", "label": "bad"},
            {"method": "random", "label": "search"}]
    rows = [dict(row, preset="smoke", overrides=overrides) for row in rows]
    outcome = biotune.run_many(rows, jobs=2, executor="ray", store=tmp_path / "rows.sqlite")
    assert outcome["status"].tolist() == ["ok", "failed", "ok"]
    assert "no_such_dataset" in outcome.loc[1, "error"]
    with RunStore(tmp_path / "rows.sqlite") as db:  # written by the rows' tasks, finished
        assert set(db.runs()["status"]) == {"finished"}


# -- the measurements -------------------------------------------------------------------------


def test_the_schedule_bound_counts_the_paper_search_s_runs_per_batch():
    from biotune.bench import schedule_speedups

    table = schedule_speedups("paper", workers=(1, 3, 30, 64)).set_index(["breeding", "runs_at_once"])
    assert set(table["training_runs"]) == {167 * 3}
    assert table.loc[("steady", 1), "rounds"] == 501
    # beyond 3 runs at once the 70 children (3 seeds each) stay 70 rounds: 30 for init, 9 re-score
    # batches and 10 exploitation batches at k >= 30 make 90 rounds in all
    assert table.loc[("steady", 30), "rounds"] == 70 + 1 + 9 + 10 == table.loc[("steady", 64), "rounds"]
    assert table.loc[("generational", 30), "rounds"] == 10 + 1 + 9 + 10
    assert table.loc[("steady", 3), "speedup_bound"] == 3.0


@pytest.mark.slow
def test_the_parallel_bench_times_each_executor_and_checks_equal_evaluations(tmp_path, smoke_config):
    from biotune.bench import parallel_bench

    table, summary = parallel_bench("smoke", overrides=[f"data.root={smoke_config.data.root}"],
                                    json_file=tmp_path / "parallel.json",
                                    runs=(("serial", 1, None), ("serial", 1, "per worker"), ("process", 2, None)))
    assert table["executor"].tolist() == ["serial", "serial", "process"]
    assert table["threads_per_run"].iloc[1] == table["threads_per_run"].iloc[2]  # cores / 2 workers
    assert table["equals_serial_same_threads"].tolist()[1:] == [True, True]
    assert summary["all_equal_serial_same_threads"] is True
    assert json.loads((tmp_path / "parallel.json").read_text())["summary"] == summary


def test_executor_settings_come_apart_from_other_overrides_in_either_spelling():
    from biotune.bookkeeping import split_executor_settings

    assert split_executor_settings(["executor.kind=process", "ga.population=5"]) == \
        ({"kind": "process"}, {"ga": {"population": 5}})
    with pytest.warns(FutureWarning, match="override: config key run.executor is deprecated; use executor.kind"):
        assert split_executor_settings({"run": {"executor": "process"}}) == ({"kind": "process"}, {})
