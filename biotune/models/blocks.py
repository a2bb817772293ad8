"""Blocks: the unit BioTune freezes or trains, and the check that they partition a model.

A block names its modules (a frozen block's BatchNorm is kept in eval mode) and its parameters
(the optimizer's groups). The genome relies on every parameter being in exactly one block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Block:
    name: str
    modules: tuple[str, ...]
    param_names: tuple[str, ...]
    num_params: int


def _block(net: nn.Module, name: str, modules: tuple[str, ...], param_names=None) -> Block:
    """A block of `modules`; its parameters are all of theirs unless `param_names` says otherwise."""
    if param_names is None:
        param_names = [
            n for m in modules for n, _ in net.get_submodule(m).named_parameters(prefix=m)
        ]
    params = dict(net.named_parameters())
    return Block(
        name, tuple(modules), tuple(param_names), sum(params[n].numel() for n in param_names)
    )


def _blocks(net: nn.Module, spec: list[tuple[str, tuple[str, ...]]]) -> list[Block]:
    """Blocks from (block name, module names) pairs."""
    return [_block(net, name, modules) for name, modules in spec]


def _block_of_params(net: nn.Module, param_names: list[str]) -> Block:
    """A block from a group of parameters; its modules are the largest ones wholly inside the group.

    Parameters held directly by a module only partly inside (ViT's `cls_token` on the root)
    appear in the block's name but not under its modules.
    """
    inside = set(param_names)
    modules: list[str] = []
    for mname, module in net.named_modules():
        if not mname or any(mname.startswith(m + ".") for m in modules):
            continue
        params = [n for n, _ in module.named_parameters(prefix=mname)]
        if params and inside.issuperset(params):
            modules.append(mname)
    covered = {n for m in modules for n, _ in net.get_submodule(m).named_parameters(prefix=m)}
    loose = [n for n in param_names if n not in covered]
    return _block(net, "+".join(modules + loose), tuple(modules), param_names)


def _check_partition(name: str, net: nn.Module, blocks: list[Block]) -> None:
    """Every parameter in exactly one non-empty block, block names unique: the genome relies on it."""
    owners: dict[str, list[str]] = {}
    for b in blocks:
        for n in b.param_names:
            owners.setdefault(n, []).append(b.name)
    problems = [f"{n} is in no block" for n, _ in net.named_parameters() if n not in owners]
    problems += [f"{n} is in several blocks: {bs}" for n, bs in owners.items() if len(bs) > 1]
    problems += [f"block {b.name!r} has no parameters" for b in blocks if b.num_params == 0]
    if len({b.name for b in blocks}) != len(blocks):
        problems.append(f"duplicate block names: {[b.name for b in blocks]}")
    if problems:
        raise RuntimeError(
            f"internal error: the block map of {name} is not a partition of its parameters: "
            + "; ".join(problems[:10])
        )
