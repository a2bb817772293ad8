"""L2-SP and L1-SP (Li et al., ICML 2018): fine-tuning pulled back to the pretrained weights.

    L2-SP: (alpha/2) ||w_S - w_S^0||_2^2 + (beta/2) ||w_head||_2^2;   L1-SP: alpha ||w_S - w_S^0||_1 + the same head term

w_S: every trainable pretrained tensor (BatchNorm affine included, running statistics not), w_S^0
their values when the run starts. The penalty is added to the loss and replaces weight decay
(Adam would rescale a decay per coordinate). docs/methods.md has the details.
"""
from __future__ import annotations

import torch

from .base import METHODS, Method


@METHODS.register("l2_sp")
class L2SP(Method):
    name = "l2_sp"
    grid = [{"alpha": alpha} for alpha in (0.001, 0.01, 0.1)]

    def __init__(self, alpha: float = 0.01, beta: float = 0.01):
        self.alpha, self.beta = alpha, beta

    def param_groups(self, net: torch.nn.Module, model, plan, base_lr: float) -> list[dict]:
        """Also take the starting point: the network is on its device and no step has been made."""
        groups = [dict(group, weight_decay=0.0) for group in super().param_groups(net, model, plan, base_lr)]
        params = dict(net.named_parameters())
        head = set(model.head_param_names)
        self._backbone = [params[n] for block in model.blocks for n in block.param_names
                          if n not in head and params[n].requires_grad]
        self._start = [p.detach().clone() for p in self._backbone]
        self._head = [params[n] for n in model.head_param_names]
        return groups

    @staticmethod
    def distance(diffs: list[torch.Tensor]) -> torch.Tensor:
        """The backbone term, before alpha: (1/2) sum of squares."""
        return squared_norm(diffs) / 2

    def penalty(self, net: torch.nn.Module) -> torch.Tensor:
        """Multi-tensor ops over all the tensors at once: a few kernels per step, not a few per tensor."""
        start_term = self.distance(torch._foreach_sub(self._backbone, self._start))
        return self.alpha * start_term + self.beta * squared_norm(self._head) / 2


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of every element of ``tensors``."""
    return torch.stack(torch._foreach_norm(tensors)).pow(2).sum()


@METHODS.register("l1_sp")
class L1SP(L2SP):
    name = "l1_sp"

    @staticmethod
    def distance(diffs: list[torch.Tensor]) -> torch.Tensor:
        """The backbone term, before alpha: the sum of absolute values."""
        return torch.stack(torch._foreach_norm(diffs, 1)).sum()
