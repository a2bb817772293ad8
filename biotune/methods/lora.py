"""LoRA on convolutions, through the ``peft`` library.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, applied to every
Conv2d of the backbone with peft's Conv2d LoRA:

    out = base(x) + B(A(x)) * alpha / r,

A a convolution of the base layer's kernel, stride and padding to r channels (random init), B a
1x1 convolution back to the output channels (zero init, so training starts at the pretrained
function). The base weights stay frozen; the new head trains fully (only the new classifier:
VGG-19's pretrained fc6 and fc7, which are linear layers, stay frozen); BatchNorm affine parameters
are frozen unless ``train_bn``. BatchNorm running statistics keep updating in train mode, since
the adapted features shift them. The trained adapters can be merged into the base weights
(``merge_lora``), giving the original architecture back with no inference cost.

Grouped and depthwise convolutions (groups > 1) are not adapted. peft accepts them only when r is
divisible by groups (for a depthwise conv, groups is its channel count, 16 to 1000+, above any r of
our grid), and even then its A spans all input channels, so the update is a dense convolution that
the grouped base weight cannot hold: peft cannot merge it. Adapting only ungrouped convolutions
keeps LoRA a low-rank change of the pretrained weights everywhere it applies.
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
