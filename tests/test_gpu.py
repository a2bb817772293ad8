"""CUDA checks (skipped without a GPU): a fitness run with bfloat16 autocast on the GPU."""
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
