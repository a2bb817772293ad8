"""AutoRGN: per-tensor learning rates from relative gradient norms, re-measured every epoch.

Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023, with
the semantics of the official code. Before every epoch, on its first 5 training mini-batches, the
cross-entropy gradient of every parameter tensor j gives

    RGN_j = mean over the batches of ||grad_j|| / ||theta_j||,    w_j = RGN_j / max_k RGN_k,

and a new Adam (weight decay 1e-4) trains tensor j at lr_j = w_j * lr, so the tensor whose
gradient is largest relative to its weights trains at lr and the others slower. Building a new
Adam resets its moments every epoch, as the official code does. The trainer's cosine schedule
scales every lr_j alike. The official code gives each tensor a param group of its own; here one
group and per-tensor step scales (``ScaledAdam``) make the same steps in multi-tensor ops.

Tensors whose name contains "bn" are left out and stay frozen: the official rule, kept as the
default. It matches timm's EfficientNets (``bn1``) and most of torchvision's ResNet BatchNorm
layers, but not layers named otherwise, which are then weighted and trained like any tensor:
ResNet's shortcut BatchNorm (``downsample.1``) and DenseNet's ``norm`` layers, for instance.
The gradients are measured in full precision with the network in train mode (BatchNorm running
statistics see those batches, as in the official code). A tensor with zero norm has no scale to
be relative to; it gets w = 1 instead of the official code's division by zero.
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
