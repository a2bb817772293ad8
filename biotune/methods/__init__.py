"""Fine-tuning methods compared with BioTune; each is a small module registered here.

A method decides which blocks train (a plan) and may hook into the one trainer: wrap the network
(LoRA), build its own param groups, add a penalty to the loss (L2-SP, L1-SP) or rebuild the
optimizer before every epoch (AutoRGN). All methods go through the same data, seeds and final
protocol (docs/algorithm.md §7), so the rows of a results table differ in the method alone.
"""
from __future__ import annotations

import torch

from ..genome import FineTunePlan
from ..registry import Registry

METHODS = Registry("method")


class Method:
    """Full fine-tuning behaviour by default; subclasses override what their method changes."""

    name = "method"
    grid: list[dict] = [{}]  # hyperparameter settings tried on validation (docs/methods.md)

    def plan(self, model) -> FineTunePlan:
        names = tuple(b.name for b in model.blocks)
        return FineTunePlan(multipliers={name: 1.0 for name in names}, block_names=names)

    def fit(self, model, dataset, cfg, seed: int, **kwargs):
        """One training run of this method (LP-FT overrides it with two)."""
        from ..train import train

        return train(model, dataset, self.plan(model), cfg, seed, method=self, **kwargs)

    # hooks the trainer calls ------------------------------------------------------------------
    def prepare(self, net: torch.nn.Module, model) -> torch.nn.Module:
        """The network to train (LoRA wraps it)."""
        return net

    def param_groups(self, net: torch.nn.Module, model, plan: FineTunePlan, base_lr: float) -> list[dict]:
        """Optimizer groups, each with an ``lr_scale`` the schedule multiplies."""
        from ..train import plan_param_groups

        return plan_param_groups(net, model.blocks, plan, base_lr)

    def frozen_modules(self, model, plan: FineTunePlan) -> list[str]:
        """Modules whose BatchNorm statistics stay fixed (with ``train.frozen_bn = "eval"``)."""
        return [m for name in plan.frozen for m in model.block(name).modules]

    def penalty(self, net: torch.nn.Module) -> torch.Tensor | None:
        """A term added to the task loss (regularisers)."""
        return None

    def on_epoch_start(self, epoch: int, net, optimizer, sample_batches) -> torch.optim.Optimizer:
        """Called before every epoch; may return a new optimizer."""
        return optimizer

    def lr_factor(self, epoch: int, cfg) -> float:
        """The schedule: the base learning rate of this epoch as a multiple of ``cfg.base_lr``. The
        protocol's recipe is CosineAnnealingLR stepped per epoch; a method with its own recipe
        overrides it (AdaFilter's SpotTune-style step decay)."""
        from ..train import cosine_factor

        return cosine_factor(epoch, cfg.cosine_t_max)

    def test_report(self, net: torch.nn.Module, dataset, cfg):
        """A table of the method's own on the test split, run as the test evaluation is (``cfg``'s
        batch size, autocast and memory format), which the final protocol writes to the run folder
        as ``(file name, DataFrame)``; None for most methods (AdaFilter: gate usage)."""
        return None


class PlanMethod(Method):
    """Trains a genome's plan as it is: BioTune's best genome in the final protocol. Holds the
    genes, not a function, so it can be sent to a worker process."""

    name = "biotune"

    def __init__(self, genes: list[float], encoding: str):
        self.genes, self.encoding = list(genes), encoding

    def plan(self, model) -> FineTunePlan:
        from ..genome import decode

        return decode(self.genes, [b.name for b in model.blocks], self.encoding)


def get_method(name: str, **hyperparameters) -> Method:
    return METHODS.get(name)(**hyperparameters)


def list_methods() -> list[str]:
    return METHODS.names()


from . import adafilter, autorgn, full, linear_probe, lora, lp_ft, sp  # noqa: E402,F401  (modules register themselves)
