"""Linear probing: only the new head trains; the backbone is frozen with its BatchNorm statistics."""
from ..genome import FineTunePlan
from . import METHODS, Method


@METHODS.register("linear_probe")
class LinearProbe(Method):
    name = "linear_probe"

    def plan(self, model) -> FineTunePlan:
        names = tuple(b.name for b in model.blocks)
        return FineTunePlan(multipliers={names[-1]: 1.0}, block_names=names)
