"""LoRA on convolutions through peft: ``out = base(x) + B(A(x)) * alpha / r`` (docs/methods.md).

Every ungrouped Conv2d of the backbone gets an adapter (B starts at zero, so training starts at
the pretrained function); base weights and BatchNorm affine parameters stay frozen, the new head
trains. Grouped and depthwise convs are left out: peft's A would span all input channels, an
update the grouped base weight cannot hold, so the adapters could not be merged.
"""
from __future__ import annotations

import copy
import logging
import re

from torch import nn

from .base import METHODS, Method

log = logging.getLogger(__name__)


def lora_layers(net: nn.Module) -> dict:
    """The peft LoRA layers of ``net`` by module name (peft imported here: it is slow to import)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


def merge_lora(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every adapter merged into its base convolution and the peft wrappers
    replaced by those convolutions: the original architecture and parameter names."""
    merged = copy.deepcopy(net)
    for name, layer in lora_layers(merged).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    return merged


@METHODS.register("lora")
class LoRA(Method):
    name = "lora"
    grid = [{"r": r, "alpha": r} for r in (4, 8, 16)]

    def __init__(self, r: int = 8, alpha: float = 8, train_bn: bool = False):
        self.r, self.alpha, self.train_bn = r, alpha, train_bn

    def prepare(self, net: nn.Module, model) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        head = model.head
        targets = [name for name, m in net.named_modules()
                   if isinstance(m, nn.Conv2d) and m.groups == 1
                   and not any(name == h or name.startswith(h + ".") for h in head)]
        if not targets:
            raise ValueError(f"LoRA here adapts the backbone's Conv2d layers with groups=1, and "
                             f"{model.name} has none; choose a convolutional model")
        skipped = sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in net.modules())
        log.info("LoRA r=%d on %d convolutions (%d grouped ones left out)", self.r, len(targets), skipped)
        # a regular expression matched against whole module names: exactly these layers
        pattern = "|".join(re.escape(t) for t in targets)
        config = LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=pattern)
        return inject_adapter_in_model(config, net)

    def param_groups(self, net: nn.Module, model, plan, base_lr: float) -> list[dict]:
        """Adapters, head and (with ``train_bn``) BatchNorm affine train at base_lr; nothing else."""
        params = dict(net.named_parameters())
        kinds = {
            "lora": [p for layer in lora_layers(net).values()
                     for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()]],
            "head": [params[n] for n in model.head_param_names],
            "bn": [p for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                   for p in m.parameters()] if self.train_bn else [],
        }
        trained = {id(p) for group in kinds.values() for p in group}
        for p in net.parameters():
            p.requires_grad_(id(p) in trained)
        return [{"params": ps, "lr": base_lr, "lr_scale": 1.0, "name": kind} for kind, ps in kinds.items() if ps]
