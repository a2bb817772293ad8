"""Frozen-prefix activations, computed once per fold and shared by every genome that freezes them.

A genome freezing blocks 0..k-1 (BatchNorm in eval mode, nothing stochastic) feeds every image
through a fixed function; the activations entering block k are computed once per fold, kept
within ``train.prefix_cache_mb`` (least recently used evicted), and runs train a network whose
first k blocks are cut away (nn.Identity). The cut is checked once per prefix against the whole
network; where it would not be exact the prefix is "n/a" and trains the ordinary way.
"""
from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from .gpus import is_out_of_memory
from .train import (
    Part,
    autocast,
    image_part,
    memory_format,
    resolve_amp,
    resolve_device,
    set_train_mode,
)

log = logging.getLogger(__name__)

HIT, MISS, NOT_APPLICABLE = "hit", "miss", "n/a"


class _Cut(Exception):
    """Raised by the hook on block k's first module: the prefix's output is known, stop there."""

    def __init__(self, activations: torch.Tensor):
        self.activations = activations


@dataclass
class CachedPrefix:
    """What the trainer needs to start at block ``start``: the fold's activations entering it,
    and the cut that removes blocks 0..start-1 from a network."""

    start: int
    skipped: tuple[str, ...]  # modules replaced by nn.Identity
    train: Part
    val: Part

    def attach(self, net: nn.Module) -> nn.Module:
        return cut_network(net, self.skipped)

    @property
    def nbytes(self) -> int:
        return sum(p.inputs.numel() * p.inputs.element_size() for p in (self.train, self.val))


def cut_network(net: nn.Module, skipped: tuple[str, ...]) -> nn.Module:
    """``net`` with the ``skipped`` modules replaced by nn.Identity (in place)."""
    for name in skipped:
        net.set_submodule(name, nn.Identity())
    return net


def frozen_prefix(plan, block_names) -> int:
    """How many leading blocks the plan freezes."""
    count = 0
    while count < len(block_names) and block_names[count] not in plan.multipliers:
        count += 1
    return count


class PrefixCache:
    """Activations entering block k, per (fold, k), for one model, dataset and training config."""

    def __init__(self, model, dataset, folds, cfg):
        self.model, self.dataset, self.folds, self.cfg = model, dataset, folds, cfg
        self.device = resolve_device(cfg.device)
        self.fmt = memory_format(cfg.channels_last)
        self.amp = resolve_amp(cfg.amp, model)
        self.budget = cfg.prefix_cache_mb * 2**20
        self.entries: OrderedDict[tuple[int, int], CachedPrefix] = OrderedDict()
        self.cuts: dict[int, tuple[str, ...] | None] = {}  # k -> modules to skip, None: not exact
        self.image_bytes: dict[int, int] = {}  # k -> bytes of one image's activations entering block k
        self.enabled = cfg.prefix_cache and cfg.frozen_bn == "eval"
        self.latest_images: tuple[int, CachedPrefix] | None = None  # (fold, its images)

    def get(self, plan, fold: int) -> tuple[CachedPrefix | None, str]:
        """The cached prefix for this plan on this fold (or None) and hit / miss / n/a."""
        k = frozen_prefix(plan, [b.name for b in self.model.blocks])
        if not self.enabled or k == 0:
            return None, NOT_APPLICABLE
        if (fold, k) in self.entries:
            self.entries.move_to_end((fold, k))
            return self.entries[(fold, k)], HIT
        skipped = self._cut(k)
        if skipped is None:
            return None, NOT_APPLICABLE
        needed = self.image_bytes[k] * (len(self.folds[fold].train_idx) + len(self.folds[fold].val_idx))
        if needed > self.budget:  # checked before computing: a paper-sized fold at 224 px would not fit
            log.info("prefix cache: block %s's inputs for fold %d take %.0f MB, over train.prefix_cache_mb; "
                     "trained in full", self.model.blocks[k].name, fold, needed / 2**20)
            return None, NOT_APPLICABLE
        net = self._net()  # one copy serves both parts
        entry = CachedPrefix(k, skipped, self._part(net, "train", self.folds[fold].train_idx, k),
                             self._part(net, "val", self.folds[fold].val_idx, k))
        self.entries[(fold, k)] = entry
        while self.nbytes > self.budget:
            self.entries.popitem(last=False)
        return entry, MISS

    def fold_images(self, fold: int) -> CachedPrefix:
        """The fold's images, as a prefix that skips nothing: on a GPU, uploaded once for all the
        runs of this process on that fold (an evaluation's seeds, the next evaluations), not once
        per run; the latest fold only, so a search walking its folds holds one at a time."""
        if self.latest_images is None or self.latest_images[0] != fold:
            self.latest_images = None  # the previous fold's device memory goes first
            indices = self.folds[fold]
            self.latest_images = (fold, CachedPrefix(0, (), image_part(self.dataset, "train", indices.train_idx, self.device),
                                                     image_part(self.dataset, "val", indices.val_idx, self.device)))
        return self.latest_images[1]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    # -- computing the activations ------------------------------------------------------------
    def _net(self) -> nn.Module:
        return copy.deepcopy(self.model.net).to(self.device, memory_format=self.fmt).eval()

    def _hooked(self, net: nn.Module, k: int):
        """Hooks on block k's modules: the first to run raises ``_Cut`` with its input."""
        def cut(module, args):
            raise _Cut(args[0])

        return [net.get_submodule(name).register_forward_pre_hook(cut) for name in self.model.blocks[k].modules]

    @torch.no_grad()
    def _prefix(self, net: nn.Module, images: torch.Tensor) -> torch.Tensor:
        try:
            with autocast(self.device, self.amp):
                net(images)
        except _Cut as cut:
            return cut.activations.contiguous(memory_format=self.fmt) if cut.activations.dim() == 4 else cut.activations
        raise RuntimeError("the network never reached the hooked block")  # e.g. a block run only in training

    def _part(self, net: nn.Module, split: str, index, k: int) -> Part:
        images = image_part(self.dataset, split, index, self.device)
        hooks = self._hooked(net, k)
        chunks = [self._prefix(net, batch) for batch, _ in
                  images.batches(images.order, self.cfg.eval_batch_size, self.device, self.fmt)]
        for hook in hooks:
            hook.remove()
        labels = images.labels[images.order]
        return Part(torch.cat(chunks), labels, torch.arange(len(labels), device=labels.device), _unchanged)

    def _cut(self, k: int) -> tuple[str, ...] | None:
        """The modules to replace by nn.Identity to start at block k, or None when that is not exact."""
        if k not in self.cuts:
            try:
                self.cuts[k] = self._find_cut(k)
            except RuntimeError as error:  # e.g. a block run only in training, or a functional step the cut skips
                if is_out_of_memory(error):  # not a property of the block: the run's executor handles it
                    raise
                log.debug("prefix cache: no cut at block %d (%s)", k, error)
                self.cuts[k] = None
            if self.cuts[k] is None:
                log.info("prefix cache: starting at block %s would not be exact for %s; trained in full",
                         self.model.blocks[k].name, self.model.name)
        return self.cuts[k]

    def _find_cut(self, k: int) -> tuple[str, ...] | None:
        net = self._net()
        started: list[str] = []
        names = {module: name for name, module in net.named_modules()}
        hooks = [module.register_forward_pre_hook(lambda m, args: started.append(names[m])) for module in net.modules()]
        hooks += self._hooked(net, k)
        probe = image_part(self.dataset, "val", torch.arange(min(8, len(self.dataset.val.labels))), self.device)
        batch, _ = next(probe.batches(probe.order, 8, self.device, self.fmt))
        try:
            activations = self._prefix(net, batch)
        finally:
            for hook in hooks:
                hook.remove()
        # modules still running when block k starts (its ancestors, the root included) stay
        running = {name for name in started if any(_within(cut, name) for cut in self.model.blocks[k].modules)}
        before = [name for name in started if name not in running]
        skipped = tuple(name for name in before if not any(_within(name, other) and name != other
                                                           for other in before))
        frozen = {name for block in self.model.blocks[:k] for name in block.param_names}
        owned = [f"{module}.{name}" for module in skipped for name, _ in net.get_submodule(module).named_parameters()]
        if any(name not in frozen for name in owned) or any(_within(h, m) for h in self.model.head for m in skipped):
            return None  # a skipped module holds parameters of a trained block, or a head (initialised per seed)
        self.image_bytes[k] = activations[0].numel() * activations.element_size()
        return skipped if self._exact(net, skipped, batch, activations, k) else None

    @torch.no_grad()
    def _exact(self, net: nn.Module, skipped: tuple[str, ...], images, activations, k: int) -> bool:
        """The cut network fed the cached activations gives the whole network's output, and the
        prefix computes in training what it computes in eval mode (no dropout, functional or not)."""
        with autocast(self.device, self.amp):
            whole = net(images).float()
            cut = cut_network(copy.deepcopy(net), skipped)(activations).float()
        if not torch.allclose(whole, cut, rtol=1e-3, atol=1e-4 * (1 + whole.abs().max().item())):
            return False
        set_train_mode(net, [net.get_submodule(m) for block in self.model.blocks[:k] for m in block.modules], "eval")
        hooks = self._hooked(net, k)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            in_training = [self._prefix(net, images) for torch_seed in (0, 1) if torch.manual_seed(torch_seed)]
        for hook in hooks:
            hook.remove()
        return all(torch.equal(activations, other) for other in in_training)


def _within(name: str, ancestor: str) -> bool:
    """``name`` is ``ancestor`` or a module inside it (the root "" holds everything)."""
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _unchanged(activations: torch.Tensor) -> torch.Tensor:
    return activations
