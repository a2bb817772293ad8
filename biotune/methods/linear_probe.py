"""Linear probing: only the new head trains; the backbone is frozen with its BatchNorm statistics.

The head is the new classifier, not the whole last block: on VGG-19 the pretrained fc6 and fc7
of the classifier block stay frozen, on DenseNet-121 so does `norm5` with its statistics.
"""
from ..genome import FineTunePlan
from .base import METHODS, Method


@METHODS.register("linear_probe")
class LinearProbe(Method):
    name = "linear_probe"

    def plan(self, model) -> FineTunePlan:
        names = tuple(b.name for b in model.blocks)
        return FineTunePlan(multipliers={names[-1]: 1.0}, block_names=names)

    def param_groups(self, net, model, plan, base_lr: float) -> list[dict]:
        head = set(model.head_param_names)
        for n, p in net.named_parameters():
            p.requires_grad_(n in head)
        return [{"params": [p for p in net.parameters() if p.requires_grad], "lr": base_lr, "lr_scale": 1.0,
                 "name": "head"}]

    def frozen_modules(self, model, plan) -> list[str]:
        return [m for block in model.blocks for m in block.modules if m not in model.head]
