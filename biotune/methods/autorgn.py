"""AutoRGN: per-tensor learning rates from relative gradient norms, re-measured every epoch.

Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts", ICLR 2023, with
the semantics of the official code. Before every epoch, on its first 5 training mini-batches, the
cross-entropy gradient of every parameter tensor j gives

    RGN_j = mean over the batches of ||grad_j|| / ||theta_j||,    w_j = RGN_j / max_k RGN_k,

and a new Adam (weight decay 1e-4) gets one group per tensor at lr_j = w_j * lr, so the tensor
whose gradient is largest relative to its weights trains at lr and the others slower. Building a
new Adam resets its moments every epoch, as the official code does. The trainer's cosine schedule
scales every lr_j alike.

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

from ..train import _logits_and_loss
from . import METHODS, Method

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
            _, loss = _logits_and_loss(net, images, labels)
            grads = torch.autograd.grad(loss, params, materialize_grads=True)  # unused tensors: 0
            grad_norms.append(torch.stack([g.norm() for g in grads]))
        param_norms = torch.stack([p.detach().norm() for p in params])
        return torch.stack(grad_norms).mean(0) / param_norms

    def on_epoch_start(self, epoch: int, net, optimizer, sample_batches) -> torch.optim.Optimizer:
        rgn = self.relative_gradient_norms(net, sample_batches())
        rgn = torch.where(rgn.isfinite(), rgn, rgn[rgn.isfinite()].max())  # zero-norm tensors: w = 1
        weights = (rgn / rgn.max()).tolist()
        log.debug("epoch %d AutoRGN weights: %s", epoch, dict(zip(self._params, weights)))
        # lr_scale makes the trainer's schedule scale every lr_j alike
        groups = [{"params": [param], "lr": w * self._lr, "lr_scale": w * self._lr / self._base_lr, "name": name}
                  for (name, param), w in zip(self._params.items(), weights)]
        return torch.optim.Adam(groups, weight_decay=self.weight_decay)
