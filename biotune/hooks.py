"""The hooks through which a fine-tuning method changes the one trainer (train.py).

The defaults are plain training of a plan: the trained blocks at ``base_lr x multiplier``, the
frozen ones fixed, a cosine schedule. A method (biotune/methods/) overrides what it changes.
This module sits below the trainer, so imports go one way: methods -> train -> hooks.
"""
from __future__ import annotations

import math

import torch

from .genome import FineTunePlan


class TrainingHooks:
    """What one training run asks of its method, in this order:

    1. ``frozen_modules(model, plan)``: names in the unwrapped network, read before ``prepare``;
    2. ``prepare(net, model)``: the network to train (LoRA wraps it), then moved to the device;
    3. ``param_groups(net, model, plan, base_lr)``: once, on the prepared network on its device,
       before any step. Methods record state here that later hooks use (L2-SP's starting point
       for ``penalty``, AutoRGN's tensors for ``on_epoch_start``);
    4. every epoch: ``on_epoch_start(...)`` (may return a new optimizer), then ``lr_factor``;
    5. every batch: ``penalty(net)``, added to the loss in full precision.
    """

    def frozen_modules(self, model, plan: FineTunePlan) -> list[str]:
        """Modules whose BatchNorm statistics stay fixed (with ``train.frozen_bn = "eval"``)."""
        return [m for name in plan.frozen for m in model.block(name).modules]

    def prepare(self, net: torch.nn.Module, model) -> torch.nn.Module:
        """The network to train."""
        return net

    def param_groups(self, net: torch.nn.Module, model, plan: FineTunePlan, base_lr: float) -> list[dict]:
        """Optimizer groups, each with an ``lr_scale`` the schedule multiplies."""
        return plan_param_groups(net, model.blocks, plan, base_lr)

    def on_epoch_start(self, epoch: int, net, optimizer, sample_batches) -> torch.optim.Optimizer:
        """Called before every epoch; may return a new optimizer."""
        return optimizer

    def lr_factor(self, epoch: int, cfg) -> float:
        """This epoch's base learning rate as a multiple of ``cfg.base_lr``: the protocol's
        CosineAnnealingLR stepped per epoch, unless a method has its own recipe (AdaFilter)."""
        return cosine_factor(epoch, cfg.cosine_t_max)

    def penalty(self, net: torch.nn.Module) -> torch.Tensor | None:
        """A term added to the task loss (regularisers)."""
        return None


def plan_param_groups(net: torch.nn.Module, blocks, plan: FineTunePlan, base_lr: float) -> list[dict]:
    """Set requires_grad per the plan and return one param group per trained block.

    Each group carries ``lr = base_lr * multiplier`` and ``lr_scale`` (MAE-style): the schedule
    sets every group's rate to the scheduled base rate times its scale, so the genome's ratios
    survive any schedule.
    """
    params = dict(net.named_parameters())
    groups = []
    for block in blocks:
        scale = plan.multipliers.get(block.name)
        for name in block.param_names:
            params[name].requires_grad_(scale is not None)
        if scale is not None:
            groups.append({"params": [params[n] for n in block.param_names], "lr": base_lr * scale,
                           "lr_scale": scale, "name": block.name})
    return groups


def cosine_factor(epoch: int, t_max: int) -> float:
    """CosineAnnealingLR's closed form (eta_min 0), stepped once per epoch."""
    return (1 + math.cos(math.pi * epoch / t_max)) / 2
