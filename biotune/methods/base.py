"""What a fine-tuning method is: training hooks (hooks.py), a plan of trained blocks, a grid of
hyperparameters and a way to fit (one training run, LP-FT two)."""
from __future__ import annotations

import torch

from ..genome import FineTunePlan, decode
from ..hooks import TrainingHooks
from ..registry import Registry
from ..train import train

METHODS = Registry("method")


class Method(TrainingHooks):
    """Full fine-tuning by default; subclasses override what their method changes."""

    name = "method"
    grid: list[dict] = [{}]  # hyperparameter settings tried on validation (docs/methods.md)

    def plan(self, model) -> FineTunePlan:
        names = tuple(b.name for b in model.blocks)
        return FineTunePlan(multipliers={name: 1.0 for name in names}, block_names=names)

    def fit(self, model, dataset, cfg, seed: int, **kwargs):
        """One training run of this method (LP-FT overrides it with two)."""
        return train(model, dataset, self.plan(model), cfg, seed, method=self, **kwargs)

    def test_report(self, net: torch.nn.Module, dataset, cfg):
        """The method's own table on the test split, as ``(file name, DataFrame)`` for the final
        protocol's run folder, measured as the test evaluation is; None for most (AdaFilter: gates)."""
        return None


class PlanMethod(Method):
    """Trains a genome's plan as it is: BioTune's best genome in the final protocol. Holds the
    genes, not a function, so it can be sent to a worker process."""

    name = "biotune"

    def __init__(self, genes: list[float], encoding: str):
        self.genes, self.encoding = list(genes), encoding

    def plan(self, model) -> FineTunePlan:
        return decode(self.genes, [b.name for b in model.blocks], self.encoding)
