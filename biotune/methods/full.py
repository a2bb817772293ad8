"""Full fine-tuning: every block trained at base_lr, a new head Linear(features, classes)."""
from ..genome import FineTunePlan
from . import METHODS


@METHODS.register("full")
def plan(model) -> FineTunePlan:
    names = tuple(b.name for b in model.blocks)
    return FineTunePlan(multipliers={name: 1.0 for name in names}, block_names=names)
