"""AdaFilter: per example and per filter, a recurrent gate picks the pretrained or the fine-tuned filter.

Guo et al., AAAI 2020 (no public code; the method section could not be recovered): the idea is
the paper's, the gate SkipNet's RNNGate, the options SpotTune's, the rest ours; docs/methods.md
says which is which. Every gated conv l computes

    y_l = g_l * BN^F_l(F_l(x_l)) + (1 - g_l) * BN^P_l(P_l(x_l)),     g_l in {0, 1}^{C_l}

(P_l frozen, F_l a trainable copy, one BatchNorm per path), with g_l from one LSTM cell shared
by all gated layers (straight-through hard threshold). Conv-BN pairs are found by tracing one
forward pass (timm's BatchNormAct2d carries its activation into each path: with binary gates,
the same as activating after the mix); with every gate at 0 the network must give the
pretrained output exactly.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections import Counter

import pandas as pd
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .base import METHODS, Method

log = logging.getLogger(__name__)


class GateNetwork(nn.Module):
    """The recurrent gate: per-layer embedding W_l and head V_l around one shared LSTM cell."""

    def __init__(self, in_channels: list[int], out_channels: list[int], d: int, gumbel_temperature: float | None):
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, d) for c in in_channels)
        self.cell = nn.LSTMCell(d, d)
        self.heads = nn.ModuleList(nn.Linear(d, c) for c in out_channels)
        self.gumbel_temperature = gumbel_temperature
        # every gate set to this value, or layer l's gates to the mask fixed[l] (checks and analysis)
        self.fixed: float | list[torch.Tensor] | None = None
        self.reset()

    def reset(self) -> None:
        """Zero the LSTM state: called before every batch."""
        self.state = None
        self.used: list[tuple[int, torch.Tensor]] = []  # (layer index, gates) of the last forward

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The gates (batch, C_l) of gated layer ``index``, from its input ``x``."""
        if isinstance(self.fixed, list):
            gates = self.fixed[index].to(x.device, x.dtype).expand(len(x), -1)
        elif self.fixed is not None:
            gates = x.new_full((len(x), self.heads[index].out_features), self.fixed)
        else:
            self.state = self.cell(self.embed[index](x.mean((2, 3))), self.state)
            gates = self.decide(self.heads[index](self.state[0]))
        self.used.append((index, gates))
        return gates

    def decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard 0/1 in the forward pass, the sigmoid's gradient in the backward pass."""
        if self.gumbel_temperature is not None and self.training:
            u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
            logits = (logits + u.log() - (-u).log1p()) / self.gumbel_temperature
        p = torch.sigmoid(logits)
        return (p > 0.5).to(p.dtype) - p.detach() + p


class GatedConv(nn.Module):
    """A conv and its BN (if any) as two paths, pretrained and fine-tuned, mixed per filter."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module | None, gates: GateNetwork, index: int):
        super().__init__()
        self.pretrained, self.tuned = conv, copy.deepcopy(conv)
        self.bn_pretrained = bn if bn is not None else nn.Identity()
        self.bn_tuned = copy.deepcopy(self.bn_pretrained)
        self.index = index
        self.__dict__["gates"] = gates  # shared by every layer: a reference, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gates(self.index, x)[:, :, None, None]
        # two products, not p + g * (f - p): exactly f or p for g in {0, 1}
        return g * self.bn_tuned(self.tuned(x)) + (1 - g) * self.bn_pretrained(self.pretrained(x))


class AdaFilterNet(nn.Module):
    """The network with its gated layers, and the gate network they share."""

    def __init__(self, net: nn.Module, pairs: list[tuple[str, str | None]], pretrained_bns: list[str],
                 d: int, gumbel_temperature: float | None, freeze_pretrained_bn: bool):
        super().__init__()
        modules = dict(net.named_modules())
        convs = [modules[conv] for conv, _ in pairs]
        self.gates = GateNetwork([c.in_channels for c in convs], [c.out_channels for c in convs], d,
                                 gumbel_temperature)
        for index, (conv, bn) in enumerate(pairs):
            net.set_submodule(conv, GatedConv(modules[conv], modules[bn] if bn else None, self.gates, index))
            if bn:
                net.set_submodule(bn, nn.Identity())  # its normalisation now happens in each path
        self.net = net
        self.pairs = pairs  # (conv, its BatchNorm or None) in forward order
        self.pretrained_bns = pretrained_bns + [f"{conv}.bn_pretrained" for conv, bn in pairs if bn]
        self.freeze_pretrained_bn = freeze_pretrained_bn

    def forward(self, x: torch.Tensor):
        self.gates.reset()
        return self.net(x)

    def train(self, mode: bool = True):
        """Pretrained BatchNorms keep their statistics (eval mode) unless they may update."""
        super().train(mode)
        if self.freeze_pretrained_bn:
            for name in self.pretrained_bns:
                self.net.get_submodule(name).eval()
        return self

    def gated_layers(self) -> list[GatedConv]:
        return [self.net.get_submodule(conv) for conv, _ in self.pairs]

    @contextlib.contextmanager
    def gates_fixed(self, value: float | list[torch.Tensor]):
        """Every gate at ``value``: 0 runs the pretrained network, 1 the fine-tuned copies; or per
        layer a 0/1 mask over its filters, the same for every example."""
        previous, self.gates.fixed = self.gates.fixed, value
        try:
            yield self
        finally:
            self.gates.fixed = previous


@torch.no_grad()
def trace(net: nn.Module, sample: torch.Tensor):
    """One eval-mode forward of ``sample``: the Conv2d names in call order, how often every conv
    and BN ran, for each conv the BNs that took its output untouched, and the network's output."""
    names = {m: n for n, m in net.named_modules()}
    order, calls, produced, bn_after = [], Counter(), {}, {}

    def after_conv(module, inputs, output):
        order.append(names[module])
        calls[names[module]] += 1
        produced[id(output)] = (names[module], output, output._version)  # the tensor kept: ids stay unique

    def before_bn(module, inputs):
        calls[names[module]] += 1
        conv, output, version = produced.get(id(inputs[0]), (None, None, None))
        if conv is not None and inputs[0] is output and output._version == version:  # not changed in place
            bn_after.setdefault(conv, []).append(names[module])

    handles = [m.register_forward_hook(after_conv) for m in names if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_pre_hook(before_bn) for m in names if isinstance(m, _BatchNorm)]
    was_training = net.training
    try:
        output = net.eval()(sample)
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return list(dict.fromkeys(order)), calls, bn_after, output


def plan_gates(net: nn.Module, head: tuple[str, ...], layers: str | None, sample: torch.Tensor):
    """Which convs to gate, with their BNs, from a trace of ``sample``: (conv, BN or None) pairs in
    forward order, targeted convs left frozen with the reason, the pretrained BNs left in place,
    and the network's output."""
    order, calls, bn_after, output = trace(net, sample)

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in head)

    targets = [name for name, m in net.named_modules() if isinstance(m, nn.Conv2d) and not in_head(name)
               and (layers is None or re.fullmatch(layers, name))]
    left_out = {name: "not run in an eval-mode forward" for name in targets if not calls[name]}
    left_out.update({name: f"run {calls[name]} times per forward" for name in targets if calls[name] > 1})
    pairs = []
    for conv in (name for name in order if name in targets and name not in left_out):
        bns = bn_after.get(conv, [])
        pairs.append((conv, bns[0] if len(bns) == 1 and calls[bns[0]] == 1 else None))
    paired = {bn for _, bn in pairs if bn}
    pretrained_bns = [name for name, m in net.named_modules()
                      if isinstance(m, _BatchNorm) and name not in paired and not in_head(name)]
    return pairs, left_out, pretrained_bns, output


def _listed(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@METHODS.register("adafilter")
class AdaFilter(Method):
    name = "adafilter"
    grid = [{"lr_scale": s} for s in (1.0, 0.1)]

    RECIPES = ("protocol", "spottune")

    def __init__(self, d: int = 64, layers: str | None = None, gumbel_temperature: float | None = None,
                 gate_penalty: float = 0.0, freeze_pretrained_bn: bool = True, lr_scale: float = 1.0,
                 recipe: str = "protocol", sgd_lr: float = 0.01, gate_lr_scale: float | None = None):
        """``layers``: a regex that must match a conv's whole module name (default: every backbone
        conv); ``lr_scale``: the trained parameters' learning rate as a multiple of base_lr;
        ``gate_lr_scale``: the gate network's own (default: ``lr_scale``); ``d``: the gate's
        embedding and LSTM width (SkipNet used 10).
        ``recipe="spottune"`` trains with SGD (momentum 0.9) from ``sgd_lr``, divided by 10 at half
        and at three quarters of ``train.max_epochs``, instead of the protocol's Adam and cosine
        schedule: SpotTune's kind of recipe, since AdaFilter's own is unknown (its values are ours)."""
        if recipe not in self.RECIPES:
            raise ValueError(f"AdaFilter recipe {recipe!r}: choose one of {', '.join(self.RECIPES)}")
        self.d, self.layers, self.gumbel_temperature = d, layers, gumbel_temperature
        self.gate_penalty, self.freeze_pretrained_bn, self.lr_scale = gate_penalty, freeze_pretrained_bn, lr_scale
        self.recipe, self.sgd_lr = recipe, sgd_lr
        self.gate_lr_scale = lr_scale if gate_lr_scale is None else gate_lr_scale
        self.initial_gates: dict | None = None  # the gate network before training, for the report

    def prepare(self, net: nn.Module, model) -> AdaFilterNet:
        """Gate the convs a trace finds, log what is not gated, and check that every gate at 0
        still computes the pretrained network."""
        training, size = net.training, model.preprocess.image_size
        sample = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        sample = sample.to(next(net.parameters()).device)
        pairs, left_out, pretrained_bns, expected = plan_gates(net, model.head, self.layers, sample)
        if not pairs:
            matching = f" matching {self.layers!r}" if self.layers else ""
            raise ValueError(f"AdaFilter gates the backbone's Conv2d layers, and {model.name} has none{matching}; "
                             "choose a convolutional model")
        without_bn = [conv for conv, bn in pairs if bn is None]
        log.info("AdaFilter on %s: %d convs gated, %d with their BatchNorm", model.name, len(pairs),
                 len(pairs) - len(without_bn))
        if without_bn:
            log.warning("AdaFilter on %s: %d convs have no BatchNorm right after them and are gated without one "
                        "(y = g*F(x) + (1-g)*P(x)): %s", model.name, len(without_bn), _listed(without_bn))
        for reason in sorted(set(left_out.values())):
            names = [name for name, why in left_out.items() if why == reason]
            log.warning("AdaFilter on %s: %d convs are %s and stay frozen, not gated: %s", model.name, len(names),
                        reason, _listed(names))

        wrapped = AdaFilterNet(net, pairs, pretrained_bns, self.d, self.gumbel_temperature,
                               self.freeze_pretrained_bn).to(sample.device)
        with torch.no_grad(), wrapped.gates_fixed(0.0):
            rebuilt = wrapped.eval()(sample)
        wrapped.train(training)
        if not torch.equal(rebuilt, expected):
            raise RuntimeError(f"AdaFilter could not rebuild {model.name}: with every gate at 0 it no longer "
                               "computes the pretrained network (a conv output used elsewhere than its BatchNorm?)")
        self.initial_gates = copy.deepcopy(wrapped.gates.state_dict())
        return wrapped

    def param_groups(self, net: AdaFilterNet, model, plan, base_lr: float) -> list[dict]:
        """The fine-tuned convs and BNs, the gate network and the head train; with
        ``freeze_pretrained_bn=False`` the pretrained BNs' affine parameters too; nothing else."""
        layers = net.gated_layers()
        params = dict(net.net.named_parameters())
        kinds = {
            "fine_tuned": [p for layer in layers for p in [*layer.tuned.parameters(), *layer.bn_tuned.parameters()]],
            "gates": list(net.gates.parameters()),
            "head": [params[n] for n in model.head_param_names],
            "pretrained_bn": [] if self.freeze_pretrained_bn else
            [p for name in net.pretrained_bns for p in net.net.get_submodule(name).parameters()],
        }
        trained = {id(p) for group in kinds.values() for p in group}
        for p in net.parameters():
            p.requires_grad_(id(p) in trained)
        scales = {kind: self.gate_lr_scale if kind == "gates" else self.lr_scale for kind in kinds}
        return [{"params": ps, "lr": base_lr * scales[kind], "lr_scale": scales[kind], "name": kind}
                for kind, ps in kinds.items() if ps]

    def on_epoch_start(self, epoch: int, net, optimizer, sample_batches) -> torch.optim.Optimizer:
        """The SpotTune-style recipe swaps the protocol's Adam for SGD with momentum, same groups."""
        if self.recipe == "spottune" and not isinstance(optimizer, torch.optim.SGD):
            return torch.optim.SGD(optimizer.param_groups, momentum=0.9, weight_decay=optimizer.defaults["weight_decay"])
        return optimizer

    def lr_factor(self, epoch: int, cfg) -> float:
        if self.recipe == "protocol":
            return super().lr_factor(epoch, cfg)
        steps = sum(epoch >= milestone for milestone in (cfg.max_epochs // 2, 3 * cfg.max_epochs // 4) if milestone)
        return self.sgd_lr / cfg.base_lr * 0.1 ** steps

    def penalty(self, net: AdaFilterNet) -> torch.Tensor | None:
        """gate_penalty times the share of fine-tuned filters used in the last batch."""
        if not self.gate_penalty:
            return None
        used = [g.float() for _, g in net.gates.used]
        return self.gate_penalty * sum(g.sum() for g in used) / sum(g.numel() for g in used)

    @torch.no_grad()
    def test_report(self, net: AdaFilterNet, dataset, cfg) -> tuple[str, pd.DataFrame]:
        """Per gated layer on the test split, the learned gates beside the same gate network before
        training (``untrained_*``, on the trained convs), and the test macro accuracy of the learned
        gates beside a fixed per-filter majority mask: whether the gates decide per example."""
        options = {"batch_size": cfg.eval_batch_size, "amp": cfg.amp, "channels_last": cfg.channels_last}
        learned = self.gate_usage(net, dataset, "test", **options)
        report = learned.drop(columns="on").rename(columns={"macro_acc": "test_macro_acc"})
        if self.initial_gates is not None:
            trained_gates = copy.deepcopy(net.gates.state_dict())
            net.gates.load_state_dict(self.initial_gates)
            untrained = self.gate_usage(net, dataset, "test", **options)
            net.gates.load_state_dict(trained_gates)
            for column in ("share_mean", "share_std", "changing_share"):
                report[f"untrained_{column}"] = untrained[column]
        with net.gates_fixed([on > 0.5 for on in learned["on"]]):
            report["majority_mask_test_macro_acc"] = self.gate_usage(net, dataset, "test", **options)["macro_acc"]
        return "gate_usage.csv", report

    def gate_usage(self, net: AdaFilterNet, dataset, split: str = "test", batch_size: int = 256, *,
                   amp: bool = True, channels_last: bool = True) -> pd.DataFrame:
        """Per gated layer on ``split``, run as ``evaluate`` runs the network: the share of filters
        taking the fine-tuned weights (mean over examples, std across them), the share of filters
        whose choice is not the same for every example, each filter's share of examples choosing it
        (``on``), and the network's macro accuracy in that pass (the same in every row)."""
        from sklearn.metrics import balanced_accuracy_score

        from ..train import autocast, image_part, memory_format

        device = next(net.parameters()).device
        part = image_part(dataset, split, None, device)
        shares, on, predictions = [[] for _ in net.pairs], [0.0 for _ in net.pairs], []
        net.eval()
        for images, _ in part.batches(part.order, batch_size, device, memory_format(channels_last)):
            with autocast(device, amp):
                predictions.append(net(images).argmax(1).cpu())
            for index, g in net.gates.used:
                shares[index].append(g.float().mean(1))
                on[index] = on[index] + g.float().sum(0)
        macro_acc = balanced_accuracy_score(part.labels[part.order].cpu().numpy(), torch.cat(predictions).numpy())
        rows = []
        for (conv, bn), head, layer_shares, layer_on in zip(net.pairs, net.gates.heads, shares, on):
            share, chosen = torch.cat(layer_shares), (layer_on / len(part.order)).cpu()
            rows.append({"layer": conv, "batchnorm": bn, "filters": head.out_features,
                         "share_mean": share.mean().item(), "share_std": share.std(correction=0).item(),
                         "changing_share": ((chosen > 0) & (chosen < 1)).float().mean().item(), "on": chosen,
                         "macro_acc": float(macro_acc)})
        return pd.DataFrame(rows)
