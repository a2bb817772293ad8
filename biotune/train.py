"""The one trainer every method uses.

A run gets a pretrained model, a dataset held as uint8 tensors, a fine-tuning plan and a seed.
The plan becomes optimizer param groups at base_lr x multiplier (the multipliers really reach the
optimizer, unlike the released code); frozen blocks get requires_grad False and, by default, keep
their BatchNorm statistics. Adam, cosine schedule stepped per epoch, early stopping on validation
macro accuracy with best-weights restore. A NaN or infinite loss ends the run as "diverged": a
result, never an exception.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score
from tqdm.auto import tqdm

from .config import TrainConfig
from .genome import FineTunePlan
from .gpus import resolve_device  # with the GPU placement policy (gpus.py), beside the executors
from .hooks import TrainingHooks

log = logging.getLogger(__name__)

AUX_LOSS_WEIGHT = 0.4  # Inception-v3's auxiliary classifier, as in torchvision's reference recipe


@dataclass
class TrainResult:
    status: str  # "ok" | "diverged" | "pruned" (stopped by ``stop_early``; val is the best it reached)
    best_epoch: int  # 0-based; -1 when no epoch finished
    epochs: int  # epochs run
    val: dict  # validation metrics at the best epoch: macro_acc, top1, loss
    history: list = field(default_factory=list)  # one dict per epoch
    seconds: float = 0.0
    train_images: int = 0  # training images processed (for images per second)
    trainable_params: int = 0
    train_runs: int = 1  # training runs this result cost (LP-FT: 2)
    net: torch.nn.Module | None = None  # the best-validation network, when asked for

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def fresh_net(model, seed: int) -> torch.nn.Module:
    """A copy of the pretrained network with its new head initialised from ``seed``; everything
    else, pretrained layers in the head's block included, as loaded."""
    net = copy.deepcopy(model.net)
    torch.manual_seed(seed)
    for name in model.head:
        for sub in net.get_submodule(name).modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
    return net


def set_train_mode(net: torch.nn.Module, frozen_modules: list, frozen_bn: str) -> None:
    """Train mode, except BatchNorm layers of frozen blocks when frozen_bn == "eval"."""
    net.train()
    if frozen_bn == "eval":
        for module in frozen_modules:
            for sub in module.modules():
                if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                    sub.eval()


def logits_and_loss(net, images, labels):
    """The logits and the task loss (with Inception-v3's auxiliary term in train mode)."""
    out = net(images)
    if isinstance(out, tuple):  # Inception-v3 in train mode: (logits, aux_logits)
        logits, aux = out
        loss = F.cross_entropy(logits, labels)
        if aux is not None:
            loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(aux, labels)
        return logits, loss
    return out, F.cross_entropy(out, labels)


def set_learning_rates(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_scale", 1.0)


def resolve_amp(amp: bool | str, model) -> bool:
    """``train.amp`` for this model: "auto" takes the precision registered with it (models/zoo.py: bf16
    speeds ResNet-50 up on an H100 and slows EfficientNet-Lite0 down); true or false force it."""
    return model.amp if amp == "auto" else amp


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA; ``amp`` is ``train.amp`` already resolved by ``resolve_amp``."""
    if not isinstance(amp, bool):
        raise TypeError(f"autocast needs a bool, got amp={amp!r}: resolve train.amp with resolve_amp(amp, model)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                          enabled=amp and device.type == "cuda")


def memory_format(channels_last: bool):
    """NHWC is about 1.8x faster than NCHW for EfficientNet-Lite0 training on a 2-core AVX-512 CPU
    (docs/performance.md) and what cuDNN prefers; ``train.channels_last=false`` turns it off."""
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclass
class Part:
    """The inputs of one part of a split: what is stored (uint8 images, made the network's input
    per batch by ``to_input``, or activations a prefix cache computed), labels, and the positions
    to take, in order."""

    inputs: torch.Tensor
    labels: torch.Tensor
    order: torch.Tensor
    to_input: Callable[[torch.Tensor], torch.Tensor]

    def batches(self, order: torch.Tensor, batch_size: int, device: torch.device, fmt):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = self.to_input(self.inputs[chunk].to(device, non_blocking=True))
            if batch.dim() == 4:  # images or feature maps; a cached prefix may also end in pooled vectors
                batch = batch.contiguous(memory_format=fmt)
            yield batch, self.labels[chunk].to(device, non_blocking=True)


def image_part(dataset, split_name: str, index, device: torch.device) -> Part:
    """A split's indexed images, moved once to a CUDA device when they fit comfortably.

    Batches are then gathered (and resized, where stored small) on the GPU instead of copied
    from host memory every step; on the CPU, or when the stored images would take over half of
    what this process may use on the GPU (its share, when runs share the device), they stay
    where they are and each batch is copied on its own.
    """
    split = getattr(dataset, split_name)
    index = torch.arange(len(split.labels)) if index is None else torch.as_tensor(index)
    if device.type == "cuda":
        from .gpus import device_memory_budget

        needed = split.images[0].numel() * len(index)
        if needed < device_memory_budget(device) / 2:
            return Part(split.images[index].to(device), split.labels[index].to(device),
                        torch.arange(len(index), device=device), dataset.to_input)
    return Part(split.images, split.labels, index, dataset.to_input)


def evaluate(net, dataset, split_name: str, index=None, *, batch_size: int = 256,
             device: torch.device | None = None, amp: bool = True, channels_last: bool = True) -> dict:
    """Macro accuracy (mean per-class recall, the paper's accuracy), top-1 and mean loss."""
    device = device or next(net.parameters()).device
    return score(net, image_part(dataset, split_name, index, device), batch_size, device, amp,
                 memory_format(channels_last))


@torch.no_grad()
def score(net, part: Part, batch_size: int, device: torch.device, amp: bool, fmt) -> dict:
    net.eval()
    predictions, loss_sum = [], torch.zeros((), device=device)
    for batch, batch_labels in part.batches(part.order, batch_size, device, fmt):
        with autocast(device, amp):
            logits = net(batch)
        loss_sum += F.cross_entropy(logits.float(), batch_labels, reduction="sum")
        predictions.append(logits.argmax(1))
    predicted = torch.cat(predictions).cpu().numpy()
    truth = part.labels[part.order].cpu().numpy()
    return {
        "macro_acc": float(balanced_accuracy_score(truth, predicted)),
        "top1": float((predicted == truth).mean()),
        "loss": loss_sum.item() / max(1, len(part.order)),
    }


@dataclass
class TrainingState:
    """One training run's network, optimizer and data, on their device, ready for epochs."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    frozen: list  # modules whose BatchNorm statistics stay fixed (train.frozen_bn = "eval")
    training: Part
    validation: Part
    device: torch.device
    amp: bool
    fmt: torch.memory_format
    trainable_params: int


def prepare_training(model, dataset, plan: FineTunePlan, cfg: TrainConfig, seed: int, method: TrainingHooks,
                  start_from, train_idx, val_idx, prefix) -> TrainingState:
    """The network to train and its optimizer, built through the method's hooks in their order."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":  # fixed input shapes: cuDNN's timed pick of kernels pays off from the first epoch
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    fmt = memory_format(cfg.channels_last)
    net = fresh_net(model, seed) if start_from is None else copy.deepcopy(start_from)
    modules = dict(net.named_modules())
    frozen = [modules[name] for name in method.frozen_modules(model, plan)]
    net = method.prepare(net, model).to(device, memory_format=fmt)
    groups = method.param_groups(net, model, plan, cfg.base_lr)
    optimizer = torch.optim.Adam(groups, lr=cfg.base_lr, weight_decay=cfg.weight_decay)
    if prefix is None:
        training, validation = image_part(dataset, "train", train_idx, device), image_part(dataset, "val", val_idx, device)
    else:
        net = prefix.attach(net)
        training, validation = prefix.train, prefix.val
    trainable = sum(p.numel() for g in groups for p in g["params"])
    return TrainingState(net, optimizer, frozen, training, validation, device, resolve_amp(cfg.amp, model), fmt, trainable)


def run_epoch(state: TrainingState, method: TrainingHooks, epoch: int, cfg: TrainConfig,
              order: torch.Generator) -> tuple[float, float, int]:
    """One pass over the shuffled training part; returns (mean loss, base rate, images). A single
    host sync: a non-finite loss anywhere in the epoch makes the mean non-finite."""
    training, device = state.training, state.device
    set_train_mode(state.net, state.frozen, cfg.frozen_bn)
    shuffled = training.order[torch.randperm(len(training.order), generator=order).to(training.order.device)]
    epoch_batches = functools.partial(training.batches, shuffled, cfg.batch_size, device, state.fmt)
    state.optimizer = method.on_epoch_start(epoch, state.net, state.optimizer, epoch_batches)
    base_lr = cfg.base_lr * method.lr_factor(epoch, cfg)
    set_learning_rates(state.optimizer, base_lr)
    loss_sum, images = torch.zeros((), device=device), 0
    for batch, batch_labels in epoch_batches():
        with autocast(device, state.amp):
            _, loss = logits_and_loss(state.net, batch, batch_labels)
        penalty = method.penalty(state.net)  # in full precision: small weight differences matter
        if penalty is not None:
            loss = loss + penalty
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        loss_sum += loss.detach() * len(batch_labels)
        images += len(batch_labels)
    return loss_sum.item() / len(training.order), base_lr, images


class EarlyStopping:
    """Keeps the best-validation weights; says when ``patience`` epochs passed without a gain of
    more than ``min_delta`` in macro accuracy."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best_score, self.best_state, self.waited = -math.inf, None, 0

    def improved(self, score: float, net: torch.nn.Module) -> bool:
        if score > self.best_score + self.min_delta:
            self.best_score, self.waited = score, 0
            self.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            return True
        self.waited += 1
        return False

    @property
    def patience_spent(self) -> bool:
        return self.waited >= self.patience

    def restore_best(self, net: torch.nn.Module) -> None:
        if self.best_state is not None:
            net.load_state_dict(self.best_state)


def train(model, dataset, plan: FineTunePlan, cfg: TrainConfig, seed: int, *, method: TrainingHooks | None = None,
          start_from=None, train_idx=None, val_idx=None, keep_net: bool = False, progress: bool = True,
          prefix=None, stop_early: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Fine-tune a fresh copy of ``model`` (or of ``start_from``) per ``plan``; return the
    best-validation result. ``method`` hooks in (hooks.py); None is plain training.

    For a search's fitness runs: ``prefix`` supplies the activations entering the first block
    the network computes and cuts the blocks before it (prefix_cache.py); ``stop_early(epoch,
    best validation macro accuracy so far)`` may end a run, recorded as "pruned".
    """
    if plan.is_empty:
        raise ValueError("the plan trains no block; a genome with no trained block is not trained "
                         "(its fitness is the worst value)")
    if prefix is not None and (keep_net or start_from is not None or method is not None):
        raise ValueError("a cached prefix serves plain fitness runs only (no method, start or kept network)")
    method = method or TrainingHooks()
    started = time.perf_counter()
    state = prepare_training(model, dataset, plan, cfg, seed, method, start_from, train_idx, val_idx, prefix)
    order = torch.Generator().manual_seed(seed)
    result = TrainResult(status="ok", best_epoch=-1, epochs=0, val={}, trainable_params=state.trainable_params)
    stopping = EarlyStopping(cfg.patience, cfg.min_delta)
    epochs = tqdm(range(cfg.max_epochs), desc="epochs", leave=False, disable=not progress)
    for epoch in epochs:
        train_loss, base_lr, images = run_epoch(state, method, epoch, cfg, order)
        result.train_images += images
        if not math.isfinite(train_loss):
            log.warning("training loss became %s in epoch %d (seed %d): run recorded as diverged",
                        train_loss, epoch, seed)
            result.status = "diverged"
            break
        val = score(state.net, state.validation, cfg.eval_batch_size, state.device, state.amp, state.fmt)
        if not math.isfinite(val["loss"]):
            result.status = "diverged"
            break
        result.history.append({"epoch": epoch, "train_loss": train_loss, "base_lr": base_lr,
                               **{f"val_{k}": v for k, v in val.items()}})
        result.epochs = epoch + 1
        epochs.set_postfix(val_macro=f"{val['macro_acc']:.3f}")
        if stopping.improved(val["macro_acc"], state.net):
            result.best_epoch, result.val = epoch, val
        elif stopping.patience_spent:
            break
        best_seen = max(h["val_macro_acc"] for h in result.history)  # min_delta aside: what a replay reads
        if stop_early is not None and epoch + 1 < cfg.max_epochs and stop_early(epoch, best_seen):
            result.status = "pruned"
            break
    epochs.close()
    stopping.restore_best(state.net)
    result.seconds = time.perf_counter() - started
    if keep_net:
        result.net = state.net
    return result
