"""CUDA checks (skipped without a GPU): a fitness run with bfloat16 autocast on the GPU; Ray runs on GPU shares."""
import copy

import pytest
import torch

from biotune.genome import FineTunePlan
from biotune.train import evaluate, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_mixed_precision_training_freezes_and_learns(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    config = copy.deepcopy(smoke_config.train)
    config.device, config.amp, config.max_epochs, config.patience, config.base_lr = "cuda", True, 8, 8, 3e-3
    names = [b.name for b in model.blocks]
    plan = FineTunePlan({n: 1.0 for n in names[1:]}, tuple(names))
    result = train(model, dataset, plan, config, seed=0, keep_net=True, progress=False)
    assert result.ok and next(result.net.parameters()).is_cuda
    assert result.val["macro_acc"] > 1.5 / dataset.num_classes
    before, after = model.net.state_dict(), result.net.state_dict()
    for key in before:
        if key.startswith(model.block(names[0]).modules[0] + "."):
            assert torch.equal(before[key], after[key].cpu()), key
    again = evaluate(result.net, dataset, "val", batch_size=64)
    assert again["macro_acc"] == pytest.approx(result.val["macro_acc"])


def test_cuda_and_cpu_agree_on_the_same_weights(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    net = copy.deepcopy(model.net)
    on_cpu = evaluate(net, dataset, "val", device=torch.device("cpu"))
    on_gpu = evaluate(net.cuda(), dataset, "val", amp=False)
    assert on_gpu["macro_acc"] == pytest.approx(on_cpu["macro_acc"])
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-4)


def test_ray_packs_runs_on_gpu_shares(smoke_config, tmp_path):
    """Four runs on quarter GPUs: Ray assigns each its device and ends its worker after the task.
    The evaluations keep the serial schedule; their floats may differ, as two serial runs on a GPU
    may (cuDNN's non-deterministic kernels: biotune does not force deterministic algorithms)."""
    ray = pytest.importorskip("ray")
    import os
    import socket

    import biotune

    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results"), "train.device": "auto",
                 "train.seeds": [0, 1], "ga.population": 4, "ga.generations": 2, "ga.elites": 1,
                 "train.num_threads": 1, "run.executor": "ray", "run.workers": 4, "run.gpus_per_run": 0.25}
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        packed = biotune.search(preset="smoke", store=tmp_path / "ray.sqlite", progress=False, overrides=overrides)
    finally:
        ray.shutdown()
    evaluations = packed.evaluations
    assert not evaluations["status"].eq("failed").any()  # a child may train no block: no_trained_block
    assert evaluations["seq"].tolist() == list(range(len(evaluations)))
    workers = {run["worker"] for per_seed in evaluations["per_seed"] for run in per_seed}
    assert f"{socket.gethostname()}:{os.getpid()}" not in workers and len(workers) > 1  # max_calls=1: a worker per task
