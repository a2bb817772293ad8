"""GPU placement (biotune/gpus.py): runs and rows go to the GPUs asked for, shares get a memory
ceiling; a CUDA out-of-memory is retried once, then stops the search or row without storing a
fitness; the wrong torch build warns, and the paper preset refuses the CPU unless asked. CUDA is
mocked in the driver; spawned workers report the CUDA_VISIBLE_DEVICES they were pinned to."""
import importlib
import os
import time
from pathlib import Path

import pytest
import torch

import biotune
from biotune import batch, cli, fitness, gpus
from biotune import config as cfg
from biotune.executors import OutOfGPUMemoryError, ProcessExecutor, make_executor
from biotune.store import RunStore

GB = 2**30


@pytest.fixture()
def fake_cuda(monkeypatch):
    """Four CUDA GPUs as far as the driver process can tell; records the memory fractions set."""
    fractions = []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: fractions.append((fraction, str(device))))
    return fractions


@pytest.fixture()
def smoke(tmp_path, smoke_config):
    return {"preset": "smoke", "store": tmp_path / "runs.sqlite",
            "overrides": {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}}


def where(shared, barrier: str, count: int) -> dict:
    """A worker's GPU as it sees it, once ``count`` calls are running at once (each in its own worker)."""
    Path(barrier, str(os.getpid())).touch()
    deadline = time.time() + 120
    while len(os.listdir(barrier)) < count and time.time() < deadline:
        time.sleep(0.05)
    place = gpus.here()
    return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "index": place.index, "share": place.share}


def out_of_memory_first(shared, counter: str, failures: int) -> str:
    """Runs out of GPU memory on its first ``failures`` calls (counted in a file, across processes)."""
    path = Path(counter)
    calls = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(calls))
    if calls <= failures:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return f"done after {calls} calls"


# -- placement ------------------------------------------------------------------------------------


def test_places_spread_runs_round_robin_over_the_gpus_asked_for(fake_cuda, monkeypatch):
    train = cfg.TrainConfig()
    slots = gpus.places(cfg.ExecutorConfig(kind="process", workers=4, gpus=[1, 3], runs_per_gpu=2), train)
    assert [(s.gpu, s.index, s.share) for s in slots] == [("1", 1, 0.5), ("3", 3, 0.5), ("1", 1, 0.5), ("3", 3, 0.5)]
    assert [s.gpu for s in gpus.places(cfg.ExecutorConfig(kind="process", workers=4), train)] == ["0", "1", "2", "3"]
    assert gpus.places(cfg.ExecutorConfig(gpus=[2]), train) == [gpus.Slot("2", 2, 1.0)]  # serial: the first asked
    assert gpus.places(cfg.ExecutorConfig(), cfg.TrainConfig(device="cuda:3")) == [gpus.Slot("3", 3, 1.0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # torch's index 1 is the machine's GPU 5
    assert gpus.places(cfg.ExecutorConfig(gpus=[1]), train) == [gpus.Slot("5", 1, 1.0)]
    with pytest.raises(cfg.ConfigError, match=r"there is no GPU 4 here; torch sees 4 GPU\(s\) \(CUDA_VISIBLE_DEVICES"):
        gpus.places(cfg.ExecutorConfig(gpus=[0, 4]), train)
    with pytest.raises(cfg.ConfigError, match=r"executor.workers=5 .* hold 4: pass --runs-per-gpu 3"):
        gpus.places(cfg.ExecutorConfig(kind="process", workers=5, gpus=[0, 1], runs_per_gpu=2), train)


def test_on_the_cpu_nothing_is_placed_and_asking_for_gpus_is_an_error():
    assert not torch.cuda.is_available()
    assert gpus.places(cfg.ExecutorConfig(kind="process", workers=2), cfg.TrainConfig()) == []
    with pytest.raises(cfg.ConfigError, match="but they train on cpu here"):
        gpus.places(cfg.ExecutorConfig(runs_per_gpu=2), cfg.TrainConfig())


def test_config_refuses_gpu_settings_that_contradict_each_other():
    for overrides, message in [({"executor.gpus": [0, 0]}, "names a GPU twice"),
                               ({"executor.runs_per_gpu": 2, "train.device": "cpu"}, "but train.device=cpu"),
                               ({"executor.gpus": [1], "train.device": "cuda:0"}, "pins every run to GPU 0"),
                               ({"executor.kind": "ray", "executor.gpus_per_run": 0.5, "executor.runs_per_gpu": 2},
                                "give one of them")]:
        with pytest.raises(cfg.ConfigError, match=message):
            cfg.resolve("cpu", overrides=overrides)
    parser = cli.build_parser()
    args, _ = parser.parse_known_args(["search", "--gpus", "0,2", "--runs-per-gpu", "2"])
    assert cli._executor_overrides(args) == ["executor.gpus=[0,2]", "executor.runs_per_gpu=2"]
    assert cfg.resolve("cpu", overrides=cli._executor_overrides(args) + ["train.device=auto"]).executor.gpus == [0, 2]


def test_serial_runs_use_the_first_gpu_asked_for_within_their_share(fake_cuda):
    with make_executor(cfg.ExecutorConfig(gpus=[2], runs_per_gpu=2), cfg.TrainConfig()) as executor:
        seen = dict(executor.map(lambda shared, i: str(gpus.resolve_device("auto")), [(0,), (1,)]))
    assert seen == {0: "cuda:2", 1: "cuda:2"}
    assert fake_cuda == [(0.5, "cuda:2"), (0.5, "cuda:2")]
    assert gpus.here() is None  # the place lasts while the executor's runs go


def test_the_memory_budget_counts_this_process_s_share_and_what_it_holds(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * GB, 80 * GB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2 * GB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * GB)
    device = torch.device("cuda", 0)
    assert gpus.device_memory_budget(device) == 34 * GB  # free + its unused cache
    with gpus.placed(gpus.Slot("0", 0, 0.25)):  # four runs share the GPU: 20 GB each, 2 taken
        assert gpus.device_memory_budget(device) == 18 * GB


def test_ray_asks_one_share_of_a_gpu_per_run_where_not_given():
    auto = cfg.TrainConfig()
    assert gpus.ray_gpus_per_run(cfg.ExecutorConfig(kind="ray", runs_per_gpu=4), auto, cluster_gpus=2) == 0.25
    assert gpus.ray_gpus_per_run(cfg.ExecutorConfig(kind="ray", gpus_per_run=0.5), auto, cluster_gpus=2) == 0.5
    assert gpus.ray_gpus_per_run(cfg.ExecutorConfig(kind="ray"), cfg.TrainConfig(device="cpu"), cluster_gpus=2) == 0
    assert gpus.ray_gpus_per_run(cfg.ExecutorConfig(kind="ray"), auto, cluster_gpus=0) == 0
    with pytest.raises(cfg.ConfigError, match="no node of this Ray cluster has a GPU"):
        gpus.ray_gpus_per_run(cfg.ExecutorConfig(kind="ray", require_gpu=True), auto, cluster_gpus=0)


@pytest.mark.slow
def test_each_worker_process_is_pinned_to_its_gpu_with_its_memory_share(fake_cuda, tmp_path):
    settings = cfg.ExecutorConfig(kind="process", workers=2, gpus=[1, 3], runs_per_gpu=2)
    with make_executor(settings, cfg.TrainConfig(num_threads=1)) as executor:
        seen = [result for _, result in executor.map(where, [(str(tmp_path), 2)] * 2)]
    assert sorted(s["visible"] for s in seen) == ["1", "3"]  # one worker on each GPU, seen as cuda:0
    assert all(s["index"] == 0 and s["share"] == 0.5 for s in seen)
    assert os.environ.get("CUDA_VISIBLE_DEVICES") is None  # the driver keeps every GPU


@pytest.mark.slow
def test_rows_go_to_the_gpus_asked_for(fake_cuda, smoke, monkeypatch):
    rows = [{"method": "linear_probe", "preset": "smoke", "label": str(seed),
             "overrides": {**smoke["overrides"], "train.device": "auto", "train.seeds": [seed]}} for seed in (0, 1)]
    outcome = biotune.run_many(rows, jobs=2, gpus=[0, 2], store=smoke["store"])
    assert outcome["status"].tolist() == ["ok", "ok"]
    assert set(outcome["gpu"]) <= {"0", "2"} and outcome["gpu"].notna().all()

    seen = []  # one row at a time runs in this process, unpinned; its own runs go to the GPUs asked for

    def record(method, **arguments):
        seen.append((gpus.here(), arguments["overrides"]["executor.gpus"]))
        return "a run id"

    monkeypatch.setattr(batch, "run_method", record)
    one = biotune.run_many(rows[:1], jobs=1, gpus=[3], store=smoke["store"])
    assert one["status"].tolist() == ["ok"] and seen == [(None, [3])]


# -- out of GPU memory: an infrastructure failure, never a fitness -----------------------------------


def fail_training(monkeypatch, module, when) -> list:
    """Make ``module.train`` run out of GPU memory on the calls ``when(call number)`` picks."""
    calls, real = [], module.train

    def train(*args, **kwargs):
        calls.append(1)
        if when(len(calls)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "train", train)
    return calls


def test_a_run_out_of_memory_once_is_retried_after_freeing_memory(smoke, monkeypatch):
    freed = []
    monkeypatch.setattr(gpus, "free_cached_memory", lambda: freed.append(1))
    calls = fail_training(monkeypatch, fitness, lambda n: n == 2)
    result = biotune.search(**smoke, progress=False)
    assert len(freed) == 1
    assert (result.evaluations["status"] == "ok").all()
    assert len(calls) == result.evaluations["train_runs"].sum() + 1


def test_a_run_out_of_memory_twice_stops_the_search_storing_no_fitness_for_it(smoke, monkeypatch, capsys):
    real = fitness.train
    fail_training(monkeypatch, fitness, lambda n: n >= 3)  # the third evaluation's run, on both attempts
    with pytest.raises(OutOfGPUMemoryError, match=r"ran out of GPU memory on both attempts .*train.batch_size.*"
                                                  r"--runs-per-gpu.*biotune search --resume"):
        biotune.search(**smoke, progress=False)
    with RunStore(smoke["store"]) as db:
        run_id = db.runs()["run_id"].iloc[0]
        stored = db.evaluations(run_id)
        assert db.run(run_id)["status"] == "failed"
    assert stored["seq"].tolist() == [0, 1] and (stored["status"] == "ok").all()
    monkeypatch.setattr(fitness, "train", real)  # memory lowered: the search continues where it stopped
    resumed = biotune.search(resume=run_id, store=smoke["store"], progress=False)
    assert resumed.evaluations["seq"].tolist() == list(range(len(resumed.evaluations)))

    fail_training(monkeypatch, fitness, lambda n: True)  # the command line: one line, exit 2
    code = cli.main(["--store", str(smoke["store"]), "--results-dir", smoke["overrides"]["results_dir"], "search",
                     "--preset", "smoke", "--quiet", f"--data.root={smoke['overrides']['data.root']}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("biotune: error: run ") and err.count("\n") == 1
    assert "ran out of GPU memory on both attempts" in err


def test_a_row_or_baseline_out_of_memory_twice_stops_with_the_message(smoke, monkeypatch):
    trainer = importlib.import_module("biotune.methods.base")  # where the final protocol's methods look the trainer up

    calls = fail_training(monkeypatch, trainer, lambda n: n == 1)
    run_id, finals = biotune.run_baseline("full", **smoke, progress=False)
    assert len(calls) == 2 and finals["status"].tolist() == ["ok"]

    fail_training(monkeypatch, trainer, lambda n: True)
    with pytest.raises(OutOfGPUMemoryError, match="final_run.*ran out of GPU memory on both attempts"):
        biotune.run_baseline("linear_probe", **smoke, progress=False)
    with RunStore(smoke["store"]) as db:
        assert len(db.finals(run_id)) == 1
        probe = db.runs().query("method == 'linear_probe'")
        assert probe["status"].tolist() == ["failed"] and db.finals(probe["run_id"].iloc[0]).empty

    fail_training(monkeypatch, fitness, lambda n: True)  # a searcher row, in this process
    rows = [{"method": "random", "label": "search", "preset": "smoke", "overrides": smoke["overrides"]}]
    with pytest.raises(OutOfGPUMemoryError, match="biotune search --resume"):
        biotune.run_many(rows, jobs=1, store=smoke["store"])
    with RunStore(smoke["store"]) as db:
        assert db.evaluations().query("status == 'failed'").empty


@pytest.mark.slow
def test_a_worker_process_out_of_memory_is_retried_then_stops_the_map(tmp_path):
    with ProcessExecutor(workers=1, threads=1) as executor:
        assert dict(executor.map(out_of_memory_first, [(str(tmp_path / "once"), 1)])) == {0: "done after 2 calls"}
        with pytest.raises(OutOfGPUMemoryError, match="out_of_memory_first.*both attempts.*CUDA out of memory"):
            dict(executor.map(out_of_memory_first, [(str(tmp_path / "always"), 9)]))
    assert (tmp_path / "always").read_text() == "2"


# -- the torch build ----------------------------------------------------------------------------------


@pytest.fixture()
def unusable_gpu(monkeypatch):
    """An NVIDIA driver 535 (CUDA 12.2 at most) beside a torch built for CUDA 13.0."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(gpus, "nvidia_driver", lambda: ("535.104.05", "12.2"))
    for cached in (gpus._unusable_nvidia_gpu, gpus._warn_unusable_gpu):
        cached.cache_clear()
    yield
    for cached in (gpus._unusable_nvidia_gpu, gpus._warn_unusable_gpu):
        cached.cache_clear()


def test_auto_warns_once_where_torch_cannot_use_the_nvidia_gpu(unusable_gpu, caplog, monkeypatch):
    with caplog.at_level("WARNING", logger="biotune.gpus"):
        assert gpus.resolve_device("auto").type == "cpu"
        gpus.resolve_device("auto")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert all(text in warnings[0] for text in ("535.104.05", "CUDA 12.2", "CUDA 13.0", "docs/usage.md"))
    with pytest.raises(ValueError, match="cannot use this machine's NVIDIA GPU.*install the torch build"):
        gpus.resolve_device("cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden on purpose (a Ray CPU task): no warning
    gpus._unusable_nvidia_gpu.cache_clear()
    assert gpus._unusable_nvidia_gpu() is None


def test_the_paper_preset_refuses_the_cpu_unless_asked(unusable_gpu, smoke):
    paper = cfg.resolve("paper")
    assert paper.executor.require_gpu and paper.train.device == "auto"
    with pytest.raises(cfg.ConfigError, match=r"535.104.05.*--train.device cpu"):
        gpus.training_device(paper.executor, paper.train)
    assert gpus.training_device(paper.executor, cfg.TrainConfig(device="cpu")).type == "cpu"
    with pytest.raises(cfg.ConfigError, match="run on the CPU on purpose with --train.device cpu"):
        biotune.run_many([{"method": "full", "preset": "paper", "dataset": "cifar10"}], jobs=2)
    refused = {**smoke["overrides"], "executor.require_gpu": True, "train.device": "auto"}
    with pytest.raises(cfg.ConfigError, match="--train.device cpu"):
        biotune.search(**dict(smoke, overrides=refused), progress=False)
    with RunStore(smoke["store"]) as db:
        assert db.runs().empty  # refused before the run existed
    asked = biotune.search(**dict(smoke, overrides={**refused, "train.device": "cpu"}), progress=False)
    assert (asked.evaluations["status"] == "ok").all()


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB",
                                     "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate",
                                     "cuDNN error: CUDNN_STATUS_ALLOC_FAILED"])
def test_every_way_a_gpu_says_out_of_memory_is_recognised(message):
    assert gpus.is_out_of_memory(RuntimeError(message))
    assert not gpus.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
