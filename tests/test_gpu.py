"""CUDA checks (skipped without a GPU): fitness training runs under bfloat16 autocast and cuDNN's
benchmark mode, for the tiny CNN and for a paper model at its input size; the same weights give
the same logits on CUDA and CPU; Ray runs on GPU shares."""
import copy
import math

import pytest
import torch

from biotune import config as cfg
from biotune.experiment import load_inputs
from biotune.genome import FineTunePlan
from biotune.train import evaluate, image_part, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def plan_training(model, blocks) -> FineTunePlan:
    return FineTunePlan({b.name: 1.0 for b in blocks}, tuple(b.name for b in model.blocks))


def block_state(net, blocks) -> dict:
    """Parameters and BatchNorm statistics of ``blocks``, on the CPU."""
    state = net.state_dict()
    return {k: state[k].cpu() for b in blocks for m in b.modules for k in state if k.startswith(m + ".")}


def logits(net, dataset, device: torch.device) -> torch.Tensor:
    part = image_part(dataset, "val", None, device)
    net = net.to(device).eval()
    with torch.no_grad():
        return torch.cat([net(batch).float().cpu()
                          for batch, _ in part.batches(part.order, 64, device, torch.contiguous_format)])


def test_cuda_mixed_precision_training_freezes_and_learns(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    config = copy.deepcopy(smoke_config.train)
    config.device, config.amp, config.max_epochs, config.patience, config.base_lr = "cuda", True, 8, 8, 3e-3
    frozen = model.blocks[:1]
    result = train(model, dataset, plan_training(model, model.blocks[1:]), config, seed=0, keep_net=True,
                   progress=False)
    assert result.ok and next(result.net.parameters()).is_cuda
    assert result.val["macro_acc"] > 1.5 / dataset.num_classes
    before, after = block_state(model.net, frozen), block_state(result.net, frozen)
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    again = evaluate(result.net, dataset, "val", batch_size=64)
    assert again["macro_acc"] == pytest.approx(result.val["macro_acc"])


def test_cuda_and_cpu_agree_on_the_same_weights(smoke_config, smoke_inputs, monkeypatch):
    """Trained weights, so the predictions differ between examples (an untrained net may predict
    one class for all, which any device matches), compared logit by logit in float32 (TF32 off)."""
    model, dataset = smoke_inputs
    config = copy.deepcopy(smoke_config.train)
    config.device, config.max_epochs, config.patience, config.base_lr = "cpu", 4, 4, 3e-3
    net = train(model, dataset, plan_training(model, model.blocks), config, seed=0, keep_net=True,
                progress=False).net
    on_cpu = logits(copy.deepcopy(net), dataset, torch.device("cpu"))
    assert len(set(on_cpu.argmax(1).tolist())) > 1, "a trained net tells the classes apart"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    on_gpu = logits(net, dataset, torch.device("cuda"))
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
    scored = evaluate(net, dataset, "val", amp=False), evaluate(net.cpu(), dataset, "val", amp=False)
    assert scored[0]["macro_acc"] == scored[1]["macro_acc"]


def resnet50_at_224(tmp_path) -> dict:
    """ResNet-50 (random weights) on 32 px synthetic images resized to 224 per batch, on CUDA, with
    train.amp "auto" (bf16 for ResNet-50, models/zoo.py) and cuDNN's benchmark mode (the defaults)."""
    return {"data.root": str(tmp_path / "data"), "results_dir": str(tmp_path / "results"),
            "model.name": "resnet50", "model.weights": None, "data.image_size": 224,
            "data.options": {"num_classes": 3, "num_train": 192, "num_val": 96, "num_test": 48, "size": 32},
            "train.device": "cuda", "train.max_epochs": 6, "train.patience": 6, "train.batch_size": 32,
            "train.seeds": [0]}


def test_resnet50_at_224_px_trains_under_bf16_and_cudnn_benchmark(tmp_path, monkeypatch):
    """A paper model at its input size, the first two blocks frozen: bf16 really runs, the frozen
    blocks stay bit-identical, the loss stays finite and falls, and the easy task is learnt."""
    config = cfg.resolve("smoke", overrides=resnet50_at_224(tmp_path))
    assert config.train.amp == "auto" and config.train.cudnn_benchmark
    model, dataset = load_inputs(config)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    dtypes = set()
    hook = model.net.layer4[0].conv1.register_forward_hook(lambda m, args, out: dtypes.add(out.dtype))
    try:  # train() copies model.net, hooks included
        frozen = model.blocks[:2]
        result = train(model, dataset, plan_training(model, model.blocks[2:]), config.train, seed=0,
                       keep_net=True, progress=False)
    finally:
        hook.remove()
    assert result.ok and next(result.net.parameters()).is_cuda
    assert torch.backends.cudnn.benchmark and torch.bfloat16 in dtypes
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses
    assert result.val["macro_acc"] > 1.5 / dataset.num_classes, result.history
    before, after = block_state(model.net, frozen), block_state(result.net, frozen)
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    before, after = block_state(model.net, model.blocks[2:3]), block_state(result.net, model.blocks[2:3])
    assert any(not torch.equal(before[k], after[k]) for k in before), "layer2 trains"


def test_resnet50_fitness_evaluations_on_cuda(tmp_path):
    """The search's own path on the GPU (the fold uploaded once, the frozen-prefix cache, bf16, cuDNN
    benchmark) for the same ResNet-50 at 224 px: every evaluation trains or trains no block, none fails."""
    import biotune

    overrides = {**resnet50_at_224(tmp_path), "train.max_epochs": 2, "ga.population": 3, "ga.generations": 0}
    evaluations = biotune.search(preset="smoke", store=tmp_path / "runs.sqlite", progress=False,
                                 overrides=overrides).evaluations
    assert evaluations["status"].isin(["ok", "no_trained_block"]).all(), evaluations[["status", "per_seed"]]
    trained = evaluations[evaluations["status"] == "ok"]
    assert len(trained) and all(math.isfinite(f) for f in trained["fitness"])
    assert all(run["epochs"] == 2 for per_seed in trained["per_seed"] for run in per_seed)


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
                 "train.num_threads": 1, "executor.kind": "ray", "executor.workers": 4, "executor.gpus_per_run": 0.25}
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
