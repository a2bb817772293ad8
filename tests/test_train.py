"""The one trainer: param groups, frozen blocks, early stopping, metrics, divergence."""
import copy
import importlib

import pytest
import torch

from biotune.genome import FineTunePlan
from biotune.hooks import plan_param_groups
from biotune.train import evaluate, train


def plan_for(model, multipliers):
    return FineTunePlan(multipliers=multipliers, block_names=tuple(b.name for b in model.blocks))


def test_multipliers_reach_the_optimizer(smoke_config, smoke_inputs, monkeypatch):
    model, dataset = smoke_inputs
    names = [b.name for b in model.blocks]
    plan = plan_for(model, {names[1]: 0.1, names[2]: 5.0, names[-1]: 1.0})
    seen = {}
    real_adam = torch.optim.Adam

    def spy(groups, **kwargs):
        optimizer = real_adam(groups, **kwargs)
        seen["groups"] = [(g["name"], g["lr"], len(g["params"])) for g in optimizer.param_groups]
        return optimizer

    monkeypatch.setattr(torch.optim, "Adam", spy)
    train(model, dataset, plan, smoke_config.train, seed=0, progress=False)
    base = smoke_config.train.base_lr
    assert seen["groups"] == [(names[1], pytest.approx(0.1 * base), len(model.block(names[1]).param_names)),
                              (names[2], pytest.approx(5.0 * base), len(model.block(names[2]).param_names)),
                              (names[-1], pytest.approx(base), len(model.block(names[-1]).param_names))]


def test_frozen_blocks_are_bit_identical_and_trained_blocks_move(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    names = [b.name for b in model.blocks]
    plan = plan_for(model, {names[1]: 1.0, names[-1]: 1.0})
    result = train(model, dataset, plan, smoke_config.train, seed=0, keep_net=True, progress=False)
    before, after = model.net.state_dict(), result.net.state_dict()
    frozen_keys = [k for k in before for b in plan.frozen for m in model.block(b).modules if k.startswith(m + ".")]
    assert any("running_mean" in k for k in frozen_keys), "the frozen blocks should hold BatchNorm buffers"
    for key in frozen_keys:
        assert torch.equal(before[key], after[key].cpu()), key
    moved = [k for k in model.block(names[1]).param_names if not torch.equal(before[k], after[k].cpu())]
    assert moved, "a trained block should change"


def test_frozen_bn_train_reproduces_the_released_behaviour(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    names = [b.name for b in model.blocks]
    config = copy.deepcopy(smoke_config.train)
    config.frozen_bn = "train"
    result = train(model, dataset, plan_for(model, {names[-1]: 1.0}), config, seed=0, keep_net=True, progress=False)
    stem = model.block(names[0]).modules[0]
    key = next(k for k in model.net.state_dict() if k.startswith(stem) and "running_mean" in k)
    assert not torch.equal(model.net.state_dict()[key], result.net.state_dict()[key].cpu())


def test_param_groups_freeze_what_the_plan_freezes(smoke_inputs):
    model, _ = smoke_inputs
    net = copy.deepcopy(model.net)
    names = [b.name for b in model.blocks]
    groups = plan_param_groups(net, model.blocks, plan_for(model, {names[-1]: 2.0}), 1e-3)
    assert [g["lr"] for g in groups] == [pytest.approx(2e-3)]
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == set(model.block(names[-1]).param_names)


def test_same_seed_same_numbers_and_best_weights_restored(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    config = copy.deepcopy(smoke_config.train)
    config.max_epochs, config.patience = 3, 1
    plan = plan_for(model, {b.name: 1.0 for b in model.blocks})
    first = train(model, dataset, plan, config, seed=5, keep_net=True, progress=False)
    second = train(model, dataset, plan, config, seed=5, progress=False)
    assert first.history == second.history and first.val == second.val
    assert evaluate(first.net, dataset, "val", batch_size=64) == pytest.approx(first.val)
    assert first.val["macro_acc"] == max(h["val_macro_acc"] for h in first.history)
    other = train(model, dataset, plan, config, seed=6, progress=False)
    assert other.history != first.history


def test_training_learns_the_synthetic_task(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    config = copy.deepcopy(smoke_config.train)
    config.max_epochs, config.patience, config.base_lr = 8, 8, 3e-3
    result = train(model, dataset, plan_for(model, {b.name: 1.0 for b in model.blocks}), config, seed=0,
                   progress=False)
    assert result.ok and result.val["macro_acc"] > 1.5 / dataset.num_classes


def test_a_diverging_run_is_a_result_not_a_crash(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    config = copy.deepcopy(smoke_config.train)
    config.base_lr, config.max_epochs = 1e20, 3  # Adam steps of 1e20 overflow to NaN
    result = train(model, dataset, plan_for(model, {b.name: 1.0 for b in model.blocks}), config, seed=0,
                   progress=False)
    assert result.status == "diverged" and not result.ok


def test_empty_plan_is_refused(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    with pytest.raises(ValueError, match="trains no block"):
        train(model, dataset, plan_for(model, {}), smoke_config.train, seed=0)


def test_amp_auto_is_the_models_measured_precision_and_true_false_force_it(smoke_inputs):
    from biotune.models import meta_arch
    from biotune.train import autocast, resolve_amp

    resnet, lite = meta_arch("resnet50"), meta_arch("tf_efficientnet_lite0")
    assert resolve_amp("auto", resnet) is True and resolve_amp("auto", lite) is False  # H100: 1.3x, slower
    assert resolve_amp(True, lite) is True and resolve_amp(False, resnet) is False
    model, _ = smoke_inputs
    assert resolve_amp("auto", model) is model.amp is True  # unmeasured models: bf16, an assumption
    with pytest.raises(TypeError, match="resolve_amp"):
        autocast(torch.device("cuda"), "auto")  # an unresolved value would silently mean bf16


def test_cudnn_benchmark_is_left_alone_on_the_cpu(smoke_config, smoke_inputs, monkeypatch):
    model, dataset = smoke_inputs
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert smoke_config.train.cudnn_benchmark
    train(model, dataset, plan_for(model, {model.blocks[-1].name: 1.0}), smoke_config.train, seed=0, progress=False)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("switch", [True, False])
def test_cudnn_benchmark_follows_its_switch_on_cuda(switch, smoke_config, smoke_inputs, monkeypatch):
    """CUDA mocked: the run resolves a CUDA device, sets the flag, and stops before any tensor moves."""
    trainer = importlib.import_module("biotune.train")  # the module: biotune.train is also the function

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    model, dataset = smoke_inputs
    config = copy.deepcopy(smoke_config.train)
    config.cudnn_benchmark = switch
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not switch)
    monkeypatch.setattr(trainer, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(trainer, "fresh_net", stop)
    with pytest.raises(Stop):
        train(model, dataset, plan_for(model, {model.blocks[-1].name: 1.0}), config, seed=0, progress=False)
    assert torch.backends.cudnn.benchmark is switch
