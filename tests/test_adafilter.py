"""AdaFilter: the gated layers, the recurrent gate and the method under the one trainer."""
import copy
import logging
from dataclasses import replace
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import biotune
from biotune.methods import get_method
from biotune.methods.adafilter import AdaFilterNet
from biotune.models import create_model
from biotune.train import fresh_net


def gated(model, **options) -> tuple[AdaFilterNet, nn.Module]:
    """(AdaFilter network, the pretrained network it was built from), the fine-tuned path moved
    away from the pretrained one (convs, BN affine and statistics), so the two paths differ."""
    pretrained = fresh_net(model, seed=0)
    net = get_method("adafilter", **options).prepare(copy.deepcopy(pretrained), model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in net.gated_layers():
            for tensor in [*layer.tuned.parameters(), *layer.bn_tuned.parameters(), *layer.bn_tuned.buffers()]:
                if tensor.is_floating_point():
                    tensor.add_(0.2 * torch.rand(tensor.shape, generator=generator))
    return net, pretrained


def fine_tuned_network(net: AdaFilterNet, pretrained: nn.Module) -> nn.Module:
    """The plain network with every gated conv and its BN replaced by the fine-tuned copies."""
    plain = copy.deepcopy(pretrained)
    for (conv, bn), layer in zip(net.pairs, net.gated_layers()):
        plain.set_submodule(conv, copy.deepcopy(layer.tuned))
        if bn:
            plain.set_submodule(bn, copy.deepcopy(layer.bn_tuned))
    return plain


@pytest.fixture(scope="module")
def lite0_case():
    """Lite0 (depthwise convs, timm's BatchNormAct2d and Conv2dSame) on 32 px inputs."""
    return (*gated(create_model("tf_efficientnet_lite0", 3, weights=None)),
            torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)))


@pytest.fixture(scope="module")
def tiny_case(smoke_inputs):
    """tiny_cnn on the smoke data."""
    model, dataset = smoke_inputs
    return (*gated(model), dataset.to_input(dataset.val.images[:8]))


@pytest.mark.parametrize("case", ["tiny_case", "lite0_case"])
def test_gates_at_0_give_the_pretrained_network_and_at_1_the_fine_tuned_one(case, request):
    net, pretrained, images = request.getfixturevalue(case)
    assert len(net.pairs) == sum(isinstance(m, nn.Conv2d) for m in pretrained.modules())
    assert all(bn for _, bn in net.pairs), "every conv of these models is followed by its BatchNorm"
    net.eval()
    pretrained.eval()
    with torch.no_grad():
        with net.gates_fixed(0.0):
            at_0 = net(images)
        with net.gates_fixed(1.0):
            at_1 = net(images)
        assert torch.equal(at_0, pretrained(images))
        assert torch.equal(at_1, fine_tuned_network(net, pretrained)(images))
    assert not torch.allclose(at_0, at_1), "the two paths must differ, or the checks above prove nothing"


def test_lite0_gates_depthwise_and_same_padded_convs(lite0_case):
    layers = lite0_case[0].gated_layers()
    assert any(layer.tuned.groups == layer.tuned.out_channels > 1 for layer in layers)
    assert any(type(layer.tuned).__name__ == "Conv2dSame" for layer in layers)
    assert all(type(layer.bn_tuned).__name__ == "BatchNormAct2d" for layer in layers)


def test_straight_through_gives_every_part_of_the_gate_network_a_gradient(smoke_inputs):
    model, dataset = smoke_inputs
    net, _ = gated(model)
    net.train()
    images, labels = dataset.to_input(dataset.train.images[:16]), dataset.train.labels[:16]
    F.cross_entropy(net(images), labels).backward()
    gates = net.gates
    for module in [*gates.embed, gates.cell, *gates.heads]:
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gates_are_hard_and_per_example(smoke_inputs):
    model, dataset = smoke_inputs
    net, _ = gated(model)
    net.eval()
    with torch.no_grad():
        net(dataset.to_input(dataset.val.images[:8]))
    gates = [g for _, g in net.gates.used]
    assert [g.shape[1] for g in gates] == [layer.tuned.out_channels for layer in net.gated_layers()]
    assert all(set(g.unique().tolist()) <= {0.0, 1.0} for g in gates)


@pytest.fixture(scope="module")
def trained(smoke_inputs, smoke_config):
    """AdaFilter trained for three epochs on the smoke data by the one trainer."""
    model, dataset = smoke_inputs
    cfg = replace(smoke_config.train, max_epochs=3, patience=3)
    method = get_method("adafilter")
    return method, method.fit(model, dataset, cfg, seed=0, keep_net=True, progress=False)


def test_after_training_examples_get_different_gate_patterns(trained, smoke_inputs):
    method, result = trained
    _, dataset = smoke_inputs
    assert result.ok and result.epochs == 3
    net = result.net.eval()
    with torch.no_grad():
        net(dataset.to_input(dataset.val.images))
    gates = [g for _, g in net.gates.used]
    assert len(torch.cat(gates, dim=1).unique(dim=0)) > 1
    usage = method.gate_usage(net, dataset, "val", batch_size=16, channels_last=False)
    assert usage["layer"].tolist() == [conv for conv, _ in net.pairs]
    assert usage["share_mean"].between(0, 1).all() and usage["share_std"].between(0, 0.5).all()
    assert (usage["share_std"] > 0).any()
    assert usage["share_mean"].tolist() == pytest.approx([g.mean().item() for g in gates])
    assert usage["share_std"].tolist() == pytest.approx([g.mean(1).std(correction=0).item() for g in gates])


def test_training_leaves_the_pretrained_convs_and_bns_bit_identical(trained, smoke_inputs):
    _, result = trained
    model, _ = smoke_inputs
    for (conv, bn), layer in zip(result.net.pairs, result.net.gated_layers()):
        original = model.net.get_submodule(conv).state_dict()
        assert all(torch.equal(v, layer.pretrained.state_dict()[k]) for k, v in original.items()), conv
        assert not all(torch.equal(v, layer.tuned.state_dict()[k]) for k, v in original.items()), conv
        original = model.net.get_submodule(bn).state_dict()
        assert all(torch.equal(v, layer.bn_pretrained.state_dict()[k]) for k, v in original.items()), bn
        assert not torch.equal(original["running_mean"], layer.bn_tuned.running_mean), bn


def test_pretrained_bns_update_when_allowed(smoke_inputs, smoke_config):
    model, dataset = smoke_inputs
    method = get_method("adafilter", freeze_pretrained_bn=False)
    result = method.fit(model, dataset, smoke_config.train, seed=0, keep_net=True, progress=False)
    for (conv, bn), layer in zip(result.net.pairs, result.net.gated_layers()):
        assert torch.equal(model.net.get_submodule(conv).weight, layer.pretrained.weight)
        assert not torch.equal(model.net.get_submodule(bn).running_mean, layer.bn_pretrained.running_mean)
        assert not torch.equal(model.net.get_submodule(bn).weight, layer.bn_pretrained.weight)


def test_gate_penalty_is_the_share_of_fine_tuned_filters(smoke_inputs):
    model, dataset = smoke_inputs
    method = get_method("adafilter", gate_penalty=0.5)
    net = method.prepare(fresh_net(model, seed=0), model).train()
    net(dataset.to_input(dataset.train.images[:8]))
    gates = [g for _, g in net.gates.used]
    share = sum(g.sum() for g in gates) / sum(g.numel() for g in gates)
    assert 0 < share < 1
    assert method.penalty(net).item() == pytest.approx(0.5 * share.item())
    method.penalty(net).backward()
    assert net.gates.heads[0].weight.grad.abs().sum() > 0
    assert get_method("adafilter").penalty(net) is None


def test_gumbel_gates_are_random_in_training_only(smoke_inputs):
    model, dataset = smoke_inputs
    net = get_method("adafilter", gumbel_temperature=5.0).prepare(fresh_net(model, seed=0), model)
    images = dataset.to_input(dataset.train.images[:8])

    def gates():
        with torch.no_grad():
            net(images)
        return torch.cat([g for _, g in net.gates.used], dim=1)

    net.train()
    assert not torch.equal(gates(), gates())
    net.eval()
    assert torch.equal(gates(), gates())


class Toy(nn.Module):
    """One conv of every kind the pairing must tell apart."""

    def __init__(self):
        super().__init__()
        self.with_bn, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.no_bn = nn.Conv2d(4, 4, 3, padding=1)  # VGG-like
        self.relu_first, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # in-place ReLU before the BN
        self.twice = nn.Conv2d(4, 4, 1)
        self.aux = nn.Conv2d(4, 4, 1)  # run in training only, like Inception-v3's AuxLogits
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.no_bn(self.bn1(self.with_bn(x)))
        x = self.bn2(torch.relu_(self.relu_first(x)))
        x = self.twice(self.twice(x))
        if self.training:
            x = x + self.aux(x)
        return self.fc(x.mean((2, 3)))


def test_pairing_by_trace_and_what_is_not_gated(caplog):
    model = SimpleNamespace(name="toy", net=Toy(), head=("fc",), preprocess=SimpleNamespace(image_size=8))
    for m in model.net.modules():  # statistics of a pretrained network, not the defaults
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    with caplog.at_level(logging.INFO):
        net = get_method("adafilter").prepare(model.net, model)
    assert net.pairs == [("with_bn", "bn1"), ("no_bn", None), ("relu_first", None)]
    assert set(net.pretrained_bns) == {"bn2", "with_bn.bn_pretrained"}
    assert "gated without one" in caplog.text and "no_bn, relu_first" in caplog.text
    assert "not run in an eval-mode forward and stay frozen, not gated: aux" in caplog.text
    assert "run 2 times per forward and stay frozen, not gated: twice" in caplog.text
    only = get_method("adafilter", layers="with_.*").prepare(Toy(), model)
    assert only.pairs == [("with_bn", "bn1")]


def test_trainable_parameters_are_the_copies_the_gates_and_the_head(smoke_inputs):
    model, _ = smoke_inputs
    method = get_method("adafilter")
    net = method.prepare(fresh_net(model, seed=0), model)
    groups = method.param_groups(net, model, None, base_lr=1e-3)
    trained = {id(p) for g in groups for p in g["params"]}
    names = {n for n, p in net.named_parameters() if id(p) in trained}
    assert names == {n for n, p in net.named_parameters() if p.requires_grad}
    assert all(".tuned." in n or ".bn_tuned." in n or n.startswith("gates.") or n.startswith("net.head.2.")
               for n in names)
    assert any(n.startswith("gates.") for n in names) and "net.head.2.weight" in names
    assert not any(".pretrained." in n or ".bn_pretrained." in n for n in names)


def test_adafilter_baseline_runs_end_to_end_on_smoke(tmp_path, smoke_config):
    overrides = {"data.root": smoke_config.data.root, "results_dir": str(tmp_path / "results")}
    run_id, finals = biotune.run_baseline("adafilter", preset="smoke", store=tmp_path / "runs.sqlite",
                                          overrides=overrides, progress=False)
    assert finals["status"].tolist() == ["ok"] and 0 <= finals["test_macro_acc"].iloc[0] <= 1
    assert finals["trainable_share"].iloc[0] > 1, "the copies and the gate network count, the frozen convs not"
    table = biotune.compare([run_id], store=tmp_path / "runs.sqlite")
    assert table["train_runs"].tolist() == [len(get_method("adafilter").grid)]
    usage = pd.read_csv(tmp_path / "results" / run_id / "gate_usage.csv")  # per gated layer, test split
    assert len(usage) == len(get_method("adafilter").grid) * usage["layer"].nunique() and usage["layer"].nunique() > 1
    assert usage["share_mean"].between(0, 1).all() and usage["share_std"].between(0, 0.5).all()


class Reused(nn.Module):
    """A conv whose output feeds its BatchNorm and a shortcut too: not a conv-BN pair to merge."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc((self.bn(y) + y).mean((2, 3)))


def test_a_rebuild_that_changes_the_pretrained_function_is_refused():
    model = SimpleNamespace(name="reused", net=Reused(), head=("fc",), preprocess=SimpleNamespace(image_size=8))
    with pytest.raises(RuntimeError, match="could not rebuild reused: with every gate at 0"):
        get_method("adafilter").prepare(model.net, model)


def test_bench_compares_a_method_s_cost_per_image_with_full_fine_tuning(smoke_config):
    from biotune.bench import method_costs

    table = method_costs("smoke", ("full", "adafilter"), overrides=[f"data.root={smoke_config.data.root}"])
    assert table["method"].tolist() == ["full", "adafilter"]
    assert (table["images_per_s"] > 0).all() and table["seconds_per_image_vs_first"].iloc[0] == 1.0
    assert table["train_images"].iloc[0] == table["train_images"].iloc[1]  # the same fold, epochs and batches


def test_the_spottune_recipe_trains_with_sgd_and_step_decay(smoke_config, smoke_inputs, monkeypatch):
    import sys

    trainer = sys.modules["biotune.train"]  # the module: biotune.train is also a function's name
    model, dataset = smoke_inputs
    seen = []
    real = trainer.set_learning_rates

    def spy(optimizer, base_lr):
        seen.append((type(optimizer).__name__, optimizer.param_groups[0].get("momentum"), base_lr))
        real(optimizer, base_lr)

    monkeypatch.setattr(trainer, "set_learning_rates", spy)
    config = replace(smoke_config.train, max_epochs=4, patience=4)
    get_method("adafilter", recipe="spottune", sgd_lr=0.05).fit(model, dataset, config, 0, progress=False)
    assert [kind for kind, _, _ in seen] == ["SGD"] * 4 and {m for _, m, _ in seen} == {0.9}
    assert [lr for _, _, lr in seen] == pytest.approx([0.05, 0.05, 0.005, 0.0005])  # / 10 at epochs 2 and 3
    with pytest.raises(ValueError, match="choose one of protocol, spottune"):
        get_method("adafilter", recipe="sgd")


def test_the_report_sets_learned_gates_beside_untrained_ones_and_a_majority_mask(trained, smoke_inputs, smoke_config):
    from biotune.train import evaluate

    method, result = trained
    _, dataset = smoke_inputs
    net = result.net.eval()
    usage = method.gate_usage(net, dataset, "test", batch_size=16, channels_last=False)
    with torch.no_grad():
        net(dataset.to_input(dataset.test.images))
    gates = [g for _, g in net.gates.used]
    # a filter changes when some examples take it and others do not
    assert usage["changing_share"].tolist() == pytest.approx(
        [((g.mean(0) > 0) & (g.mean(0) < 1)).float().mean().item() for g in gates])
    cfg = replace(smoke_config.train, amp=False)  # resolved, as the final protocol passes it
    name, report = method.test_report(net, dataset, cfg)
    assert name == "gate_usage.csv" and "on" not in report.columns
    assert {"untrained_share_mean", "untrained_share_std", "untrained_changing_share",
            "majority_mask_test_macro_acc"} <= set(report.columns)
    test = evaluate(net, dataset, "test", batch_size=cfg.eval_batch_size, amp=False, channels_last=cfg.channels_last)
    assert report["test_macro_acc"].iloc[0] == pytest.approx(test["macro_acc"])
    # the report left the learned gates in place
    assert method.gate_usage(net, dataset, "test", batch_size=16, channels_last=False)["share_mean"].tolist() == \
        pytest.approx(usage["share_mean"].tolist())
    masks = [(g.mean(0) > 0.5) for g in gates]
    with torch.no_grad(), net.gates_fixed(masks):
        net(dataset.to_input(dataset.test.images[:5]))
    assert all(torch.equal(g, m.float().expand(5, -1)) for (_, g), m in zip(net.gates.used, masks))


def test_the_gate_network_can_have_its_own_learning_rate(smoke_inputs):
    model, _ = smoke_inputs
    method = get_method("adafilter", lr_scale=0.1, gate_lr_scale=3.0, d=10)
    net = method.prepare(copy.deepcopy(model.net), model)
    groups = {g["name"]: g["lr_scale"] for g in method.param_groups(net, model, method.plan(model), 1e-3)}
    assert groups["gates"] == 3.0 and groups["fine_tuned"] == 0.1 and net.gates.cell.hidden_size == 10
