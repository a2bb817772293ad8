"""Baseline fine-tuning methods: each test checks the method's own mechanism, not only that it runs."""
import copy
import importlib
import itertools
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biotune.methods import get_method, list_methods
from biotune.methods.lora import lora_layers, merge_lora
from biotune.models import Block, PretrainedModel
from biotune.models.blocks import _block
from biotune.store import RunStore
from biotune.train import fresh_net


def backbone_state(model, net) -> dict:
    """Parameters and buffers (BatchNorm statistics) of everything but the new head."""
    return {k: v.cpu() for k, v in net.state_dict().items() if not any(k.startswith(h + ".") for h in model.head)}


def head_params(model, net) -> dict:
    params = dict(net.named_parameters())
    return {n: params[n].detach().cpu() for n in model.head_param_names}


def changed(before: dict, after: dict) -> list[str]:
    return [k for k in before if not torch.equal(before[k], after[k])]


def bn_named_model(reference) -> PretrainedModel:
    """A tiny CNN whose BatchNorm layers are named "bn" as in ResNets, with a depthwise conv."""
    net = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 8, 3, padding=1, bias=False), bn=nn.BatchNorm2d(8), relu=nn.ReLU(),
        depthwise=nn.Conv2d(8, 8, 3, padding=1, groups=8), bn2=nn.BatchNorm2d(8), relu2=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(8, reference.num_classes)))
    blocks = [block(net, "conv", "bn"), block(net, "depthwise", "bn2"), block(net, "fc")]
    return PretrainedModel("bn_cnn", net, blocks, reference.preprocess, "random", reference.num_classes, ("fc",))


def pretrained_layers_in_head_block(reference) -> PretrainedModel:
    """Like VGG-19 and DenseNet-121: the last block holds pretrained layers (a BatchNorm, a hidden
    Linear) besides the new head ``classifier.2``."""
    net = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 8, 3, padding=1), bn=nn.BatchNorm2d(8), relu=nn.ReLU(), norm5=nn.BatchNorm2d(8),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        classifier=nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, reference.num_classes))))
    with torch.no_grad():  # statistics and affine values a fresh BatchNorm would not have
        for bn in (net.bn, net.norm5):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    blocks = [block(net, "conv", "bn"), block(net, "norm5", "classifier")]
    return PretrainedModel("vgg_like", net, blocks, reference.preprocess, "random", reference.num_classes,
                           ("classifier.2",))


def block(net, *modules) -> Block:
    return _block(net, "+".join(modules), modules)


def train_batches(dataset, batch_size: int = 16) -> list:
    images, labels = dataset.train.images, dataset.train.labels
    return [(dataset.to_input(images[i:i + batch_size]), labels[i:i + batch_size])
            for i in range(0, len(labels), batch_size)]


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_end_to_end(name, smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    result = get_method(name).fit(model, dataset, smoke_config.train, seed=0, progress=False)
    assert result.ok and result.epochs >= 1 and result.train_images > 0
    assert 0 < result.trainable_params


def test_linear_probe_keeps_backbone_and_batchnorm_statistics(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    result = get_method("linear_probe").fit(model, dataset, smoke_config.train, seed=0, keep_net=True,
                                            progress=False)
    before = backbone_state(model, model.net)
    assert any("running_mean" in k for k in before)
    assert changed(before, backbone_state(model, result.net)) == []
    assert changed(head_params(model, fresh_net(model, 0)), head_params(model, result.net))


def test_lp_ft_fine_tunes_from_the_probe(smoke_config, smoke_inputs, monkeypatch):
    model, dataset = smoke_inputs
    base = importlib.import_module("biotune.methods.base")  # where Method.fit looks the trainer up
    runs, real_train = [], base.train

    def spy(*args, **kwargs):
        result = real_train(*args, **kwargs)
        runs.append({"plan": args[2], "start_from": kwargs.get("start_from"), "result": result,
                     "train_images": result.train_images})  # before LP-FT adds the probe's
        return result

    monkeypatch.setattr(base, "train", spy)
    result = get_method("lp_ft").fit(model, dataset, smoke_config.train, seed=0, keep_net=True, progress=False)
    probe, tuned = runs
    head = model.blocks[-1].name
    assert probe["plan"].trained == [head] and len(tuned["plan"].trained) == len(model.blocks)
    assert tuned["start_from"] is probe["result"].net
    assert changed(head_params(model, fresh_net(model, 0)), head_params(model, probe["result"].net))
    pretrained = backbone_state(model, model.net)
    assert changed(pretrained, backbone_state(model, probe["result"].net)) == []
    assert changed(pretrained, backbone_state(model, result.net))
    assert result.train_runs == 2
    assert result.train_images == probe["train_images"] + tuned["train_images"]
    assert [h["phase"] for h in result.history] == ["lp"] * probe["result"].epochs + ["ft"] * result.epochs


@pytest.mark.parametrize("name", ["l2_sp", "l1_sp"])
def test_sp_penalty_is_zero_at_the_start_and_pulls_back(name, smoke_inputs):
    model, _ = smoke_inputs
    alpha, beta = 0.1, 0.01
    method = get_method(name, alpha=alpha, beta=0.0)
    net = fresh_net(model, 0)
    method.param_groups(net, model, method.plan(model), 1e-3)
    assert method.penalty(net).item() == 0.0, "no backbone move, and no head term with beta 0"
    weight = net.get_parameter(model.blocks[1].param_names[0])
    start = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.01 * torch.randn_like(weight))
    small = method.penalty(net).item()
    with torch.no_grad():
        weight.copy_(start + 2 * (weight - start))
    assert 0 < small < method.penalty(net).item()

    weight.grad = None
    method.penalty(net).backward()
    expected = alpha * (weight - start) if name == "l2_sp" else alpha * torch.sign(weight - start)
    torch.testing.assert_close(weight.grad, expected.detach())

    with_head = get_method(name, alpha=alpha, beta=beta)
    with_head.param_groups(net, model, with_head.plan(model), 1e-3)  # moved weights become the start
    head = head_params(model, net).values()
    assert with_head.penalty(net).item() == pytest.approx(beta / 2 * sum(p.pow(2).sum().item() for p in head))


def test_autorgn_learning_rates_are_relative_gradient_norms(smoke_inputs):
    reference, dataset = smoke_inputs
    model = bn_named_model(reference)
    lr, base_lr = 1e-3, 1e-2
    method = get_method("autorgn", lr=lr)
    net = method.prepare(fresh_net(model, 0), model).train()
    groups = method.param_groups(net, model, method.plan(model), base_lr)
    batches = train_batches(dataset)
    assert len(batches) > 5
    optimizer = method.on_epoch_start(0, net, torch.optim.Adam(groups), lambda: iter(batches))
    assert all(p.grad is None for p in net.parameters()), "the measurement must leave no gradients"

    trained = {n: p for n, p in net.named_parameters() if "bn" not in n}
    rgn = dict.fromkeys(trained, 0.0)
    for images, labels in itertools.islice(batches, 5):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()
        for n, p in trained.items():
            rgn[n] += (p.grad.norm() / p.norm()).item() / 5
    top = max(rgn.values())
    (group,) = optimizer.param_groups
    assert group["params"] == list(trained.values()) and group["weight_decay"] == 1e-4
    rates = {n: scale * group["lr"] for n, scale in zip(trained, optimizer.scales)}
    assert rates == pytest.approx({n: v / top * lr for n, v in rgn.items()}, rel=1e-4)
    assert max(rates.values()) == lr
    assert group["lr_scale"] * base_lr == pytest.approx(group["lr"])


def test_autorgn_scaled_adam_steps_as_one_group_per_tensor(smoke_inputs):
    """One group with per-tensor step scales moves every tensor as Adam with a group per tensor at
    lr_j = scale_j * lr (the official code's optimizer), step after step; a zero scale freezes."""
    from biotune.methods.autorgn import ScaledAdam

    reference, dataset = smoke_inputs
    model = bn_named_model(reference)
    nets = [fresh_net(model, 0), fresh_net(model, 0)]
    params = [list(net.parameters()) for net in nets]
    scales = torch.linspace(0, 1, len(params[0])).tolist()
    scaled = ScaledAdam([{"params": params[0], "lr": 1e-2}], scales, weight_decay=1e-4)
    per_tensor = torch.optim.Adam([{"params": [p], "lr": 1e-2 * s} for p, s in zip(params[1], scales)],
                                  weight_decay=1e-4)
    initial = [p.detach().clone() for p in params[0]]
    for images, labels in train_batches(dataset)[:3]:  # the same gradients for both: a bias before a
        scaled.zero_grad()                             # BatchNorm has a gradient of rounding noise only
        F.cross_entropy(nets[0](images), labels).backward()
        for a, b in zip(*params):
            b.grad = a.grad.clone()
        scaled.step()
        per_tensor.step()
    assert torch.equal(params[0][0], initial[0]), "scale 0: the tensor stays exactly where it was"
    assert not torch.equal(params[0][-1], initial[-1])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["l2_sp", "l1_sp"])
def test_sp_penalty_equals_the_per_tensor_loop_and_so_does_a_step(name, smoke_inputs):
    """The multi-tensor penalty is the paper's formula summed tensor by tensor (value and gradient),
    and one Adam step with it lands where a step with the per-tensor loop does."""
    model, dataset = smoke_inputs
    alpha, beta = 0.1, 0.01
    images, labels = train_batches(dataset)[0]

    def loop_penalty(method, net):
        power = 2 if name == "l2_sp" else 1
        start = sum((p - s).abs().pow(power).sum() / power for p, s in zip(method._backbone, method._start))
        return alpha * start + beta / 2 * sum(p.pow(2).sum() for p in method._head)

    stepped = []
    for penalty in ("foreach", "loop"):
        net, method = fresh_net(model, 0), get_method(name, alpha=alpha, beta=beta)
        optimizer = torch.optim.Adam(method.param_groups(net, model, method.plan(model), 1e-3))
        with torch.no_grad():  # away from the start, so the backbone term is not zero
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        value = method.penalty(net) if penalty == "foreach" else loop_penalty(method, net)
        if penalty == "foreach":
            torch.testing.assert_close(value, loop_penalty(method, net))
        optimizer.zero_grad()
        (F.cross_entropy(net(images), labels) + value).backward()
        optimizer.step()
        stepped.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*stepped):
        torch.testing.assert_close(a, b)


def test_autorgn_leaves_bn_tensors_untouched(smoke_config, smoke_inputs):
    reference, dataset = smoke_inputs
    model = bn_named_model(reference)
    result = get_method("autorgn").fit(model, dataset, smoke_config.train, seed=0, keep_net=True, progress=False)
    before = dict(model.net.named_parameters())
    after = {n: p.detach().cpu() for n, p in result.net.named_parameters()}
    bn = [n for n in before if "bn" in n]
    assert bn and all(torch.equal(before[n], after[n]) for n in bn)
    assert all(not torch.equal(before[n], after[n]) for n in ("conv.weight", "depthwise.weight"))
    assert result.trainable_params == sum(p.numel() for n, p in before.items() if "bn" not in n)


def test_lora_trains_adapters_and_head_only_and_merges(smoke_config, smoke_inputs):
    model, dataset = smoke_inputs
    result = get_method("lora").fit(model, dataset, smoke_config.train, seed=0, keep_net=True, progress=False)
    net = result.net.cpu()
    layers = lora_layers(net)
    convs = [n for n, m in model.net.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(layers) == sorted(convs)

    pretrained = dict(model.net.named_parameters())
    head = head_params(model, fresh_net(model, 0))
    for name, p in net.named_parameters():
        base_name = name.replace(".base_layer.", ".")
        if "lora_" in name:
            assert p.requires_grad
        elif name in head:
            assert p.requires_grad and not torch.equal(p, head[name]), name
        else:  # base convolutions and BatchNorm affine
            assert not p.requires_grad and torch.equal(p, pretrained[base_name]), name
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in layers.values()), "B starts at 0"

    adapters = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    assert result.trainable_params == adapters + sum(p.numel() for p in head.values())
    assert result.trainable_params / model.num_params < 1

    merged = merge_lora(net).eval()
    assert merged.state_dict().keys() == model.net.state_dict().keys()
    images = train_batches(dataset)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(merged(images), net.eval()(images), atol=1e-5, rtol=1e-5)


def test_lora_leaves_grouped_convolutions_out(smoke_inputs):
    model = bn_named_model(smoke_inputs[0])
    net = get_method("lora", r=8).prepare(copy.deepcopy(model.net), model)
    assert list(lora_layers(net)) == ["conv"]


PRETRAINED_IN_HEAD_BLOCK = ("classifier.0.weight", "classifier.0.bias", "norm5.weight", "norm5.bias")


def test_only_the_new_head_is_initialised_per_seed(smoke_inputs):
    model = pretrained_layers_in_head_block(smoke_inputs[0])
    pretrained = model.net.state_dict()
    nets = [fresh_net(model, seed).state_dict() for seed in (0, 0, 1)]
    new = set(model.head_param_names)
    assert new == {"classifier.2.weight", "classifier.2.bias"}
    for key in pretrained.keys() - new:
        assert all(torch.equal(net[key], pretrained[key]) for net in nets), key
    for key in new:
        assert torch.equal(nets[0][key], nets[1][key]) and not torch.equal(nets[0][key], nets[2][key]), key


@pytest.mark.parametrize("name", ["linear_probe", "lora"])
def test_pretrained_layers_in_the_head_s_block_stay_frozen(name, smoke_config, smoke_inputs):
    reference, dataset = smoke_inputs
    model = pretrained_layers_in_head_block(reference)
    result = get_method(name).fit(model, dataset, smoke_config.train, seed=0, keep_net=True, progress=False)
    after = {k.replace(".base_layer.", "."): v.cpu() for k, v in result.net.state_dict().items()}
    before = fresh_net(model, 0).state_dict()
    assert not changed({k: before[k] for k in PRETRAINED_IN_HEAD_BLOCK}, after)
    assert changed({k: before[k] for k in model.head_param_names}, after) == list(model.head_param_names)
    head_size = sum(before[k].numel() for k in model.head_param_names)
    if name == "linear_probe":  # and every BatchNorm statistic, norm5's included
        assert not changed(backbone_state(model, model.net), after)
        assert result.trainable_params == head_size
    else:
        assert result.trainable_params == head_size + sum(v.numel() for k, v in after.items() if "lora_" in k)


def test_sp_pulls_pretrained_layers_of_the_head_s_block_back_and_replaces_weight_decay(smoke_inputs):
    model = pretrained_layers_in_head_block(smoke_inputs[0])
    alpha = 0.1
    method = get_method("l2_sp", alpha=alpha, beta=0.0)
    net = fresh_net(model, 0)
    groups = method.param_groups(net, model, method.plan(model), 1e-3)
    assert {g["weight_decay"] for g in groups} == {0.0}, "the penalty, not Adam's weight decay"
    hidden, head = net.get_parameter("classifier.0.weight"), net.get_parameter("classifier.2.weight")
    with torch.no_grad():
        hidden.add_(1.0)
    assert method.penalty(net).item() == pytest.approx(alpha / 2 * hidden.numel())
    with torch.no_grad():
        head.add_(1.0)
    assert method.penalty(net).item() == pytest.approx(alpha / 2 * hidden.numel()), "no start point for the head"


def test_a_setting_is_not_chosen_on_the_seeds_that_survived_it(tmp_path, smoke_config):
    store = RunStore(tmp_path / "runs.sqlite")
    store.create_run("r", kind="baseline", method="l2_sp", config=smoke_config.to_dict(), meta={})
    # alpha 0.1 looked best on validation before one of its seeds diverged
    for setting, seed, status, val in [("alpha 0.1", 0, "ok", 0.90), ("alpha 0.1", 1, "diverged", 0.99),
                                       ("alpha 0.01", 0, "ok", 0.85), ("alpha 0.01", 1, "ok", 0.85)]:
        store.add_final("r", {"method": "l2_sp", "setting": setting, "seed": seed, "status": status,
                              "val_macro_acc": val, "train_runs": 1, "trainable_share": 1.0, "seconds": 1.0})
    chosen = store.select_final_setting("r", "l2_sp")
    assert set(chosen["setting"]) == {"alpha 0.01"}
