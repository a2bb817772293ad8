"""AutoRGN (Lee et al., ICLR 2023, the official code's semantics): per-tensor rates from relative
gradient norms, re-measured before every epoch (docs/methods.md).

On the epoch's first 5 batches, RGN_j = mean ||grad_j|| / ||theta_j||; tensor j then trains at
(RGN_j / max_k RGN_k) x lr in a new Adam (its moments reset every epoch, as officially).
Tensors named with "bn" stay frozen (the official rule). One group with per-tensor step scales
(``ScaledAdam``) makes the official per-tensor groups' steps in multi-tensor ops.
"""
from __future__ import annotations

import itertools
import logging

import torch

from ..train import logits_and_loss
from .base import METHODS, Method

log = logging.getLogger(__name__)

EXCLUDED = "bn"  # the official rule: names containing it are frozen
MEASURE_BATCHES = 5


@METHODS.register("autorgn")
class AutoRGN(Method):
    name = "autorgn"
    grid = [{"lr": lr} for lr in (1e-2, 1e-3, 1e-4)]

    def __init__(self, lr: float | None = None, weight_decay: float = 1e-4):
        self.lr, self.weight_decay = lr, weight_decay  # lr None: the trainer's base_lr

    def param_groups(self, net: torch.nn.Module, model, plan, base_lr: float) -> list[dict]:
        """Freeze the "bn" tensors; the others form a placeholder group that epoch 0 replaces."""
        self._lr, self._base_lr = (base_lr if self.lr is None else self.lr), base_lr
        self._params = {}
        for name, param in net.named_parameters():
            param.requires_grad_(EXCLUDED not in name)
            if param.requires_grad:
                self._params[name] = param
        return [{"params": list(self._params.values()), "lr_scale": self._lr / base_lr, "name": "autorgn"}]

    def relative_gradient_norms(self, net: torch.nn.Module, batches) -> torch.Tensor:
        """RGN of every trained tensor, averaged over the first MEASURE_BATCHES batches.

        torch.autograd.grad returns the gradients without storing them in ``.grad``, so nothing
        measured here leaks into the first optimizer step.
        """
        params = list(self._params.values())
        grad_norms = []
        for images, labels in itertools.islice(batches, MEASURE_BATCHES):
            _, loss = logits_and_loss(net, images, labels)
            grads = torch.autograd.grad(loss, params, materialize_grads=True)  # unused tensors: 0
            grad_norms.append(torch.stack(torch._foreach_norm(grads)))
        with torch.no_grad():
            param_norms = torch.stack(torch._foreach_norm(params))
        return torch.stack(grad_norms).mean(0) / param_norms

    def on_epoch_start(self, epoch: int, net, optimizer, sample_batches) -> torch.optim.Optimizer:
        rgn = self.relative_gradient_norms(net, sample_batches())
        rgn = torch.where(rgn.isfinite(), rgn, rgn[rgn.isfinite()].max())  # zero-norm tensors: w = 1
        weights = (rgn / rgn.max()).tolist()
        log.debug("epoch %d AutoRGN weights: %s", epoch, dict(zip(self._params, weights)))
        # lr_scale makes the trainer's schedule scale every lr_j alike
        group = {"params": list(self._params.values()), "lr": self._lr, "lr_scale": self._lr / self._base_lr,
                 "name": "autorgn"}
        return ScaledAdam([group], weights, weight_decay=self.weight_decay)


class ScaledAdam(torch.optim.Adam):
    """Adam over one param group whose step of tensor j is scaled by ``scales[j]``: tensor j moves as
    in a group of its own at lr_j = scales[j] * lr (the moments do not depend on lr), up to float
    rounding, in a few multi-tensor ops instead of torch's Python loop over one group per tensor."""

    def __init__(self, groups: list[dict], scales: list[float], **defaults):
        super().__init__(groups, **defaults)
        self.scales = scales

    @torch.no_grad()
    def step(self, closure=None):
        params = self.param_groups[0]["params"]
        before = torch._foreach_mul(params, 1.0)  # a copy
        loss = super().step(closure)
        moved = torch._foreach_sub(params, before)
        torch._foreach_mul_(moved, self.scales)
        torch._foreach_add_(before, moved)  # before + scale * Adam's step: a zero scale leaves a tensor exactly
        torch._foreach_copy_(params, before)
        return loss
