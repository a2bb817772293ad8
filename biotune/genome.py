"""Genome <-> fine-tuning plan, and the reusable recipe.

A genome has one gene per block plus a threshold gene (docs/algorithm.md §2). Block b is trained
iff g_b > g_T, with learning-rate multiplier r_b = 10^(2(g_b - 0.5)) in [0.1, 10]. The trainer never
sees genes, only the plan; a recipe is the plan written against module names so it can be applied
to a user's own model in their own training loop.

Encodings besides the paper's (``full``): the ablations ``no_lr_genes`` and ``no_freezing``, and
two of ours (robust BioTune, docs/algorithm.md): ``head_trained``, where the new, randomly
initialised head is always trained (its gene sets only its rate), and ``freeze_bits``, where a
freeze gene per block (trained iff > 0.5; none for the head, always trained) replaces the
threshold, so a trained block's rate is no longer bounded below by the threshold gene.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import CHOICES

ENCODINGS = CHOICES["ga.encoding"]


@dataclass(frozen=True)
class FineTunePlan:
    """Which blocks train and at which multiple of the base learning rate; absent blocks are frozen."""

    multipliers: dict  # block name -> lr multiplier, in block order, trained blocks only
    block_names: tuple  # every block of the model, in order

    @property
    def trained(self) -> list[str]:
        return list(self.multipliers)

    @property
    def frozen(self) -> list[str]:
        return [b for b in self.block_names if b not in self.multipliers]

    @property
    def is_empty(self) -> bool:
        return not self.multipliers

    def key(self, decimals: int = 4) -> str:
        """Stable text key of the decoded plan.

        The evaluation cache keys on it (docs/algorithm.md §6)."""
        return json.dumps({b: round(m, decimals) for b, m in self.multipliers.items()})

    def trained_mask(self) -> list[int]:
        return [int(b in self.multipliers) for b in self.block_names]


def num_genes(num_blocks: int, encoding: str = "full") -> int:
    check_encoding(encoding)
    return {"no_freezing": num_blocks, "freeze_bits": 2 * num_blocks - 1}.get(encoding, num_blocks + 1)


def trained_blocks(genes: Sequence[float], num_blocks: int, encoding: str = "full") -> list[int]:
    """Indices of the blocks a genome trains; block i's rate gene is genes[i] in every encoding."""
    if encoding == "no_freezing":
        return list(range(num_blocks))
    if encoding == "freeze_bits":
        return [i for i in range(num_blocks - 1) if genes[num_blocks + i] > 0.5] + [num_blocks - 1]
    trained = [i for i in range(num_blocks) if genes[i] > genes[-1]]
    if encoding == "head_trained" and num_blocks - 1 not in trained:
        trained.append(num_blocks - 1)
    return trained


def check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of: {', '.join(ENCODINGS)}")


def multiplier(gene: float) -> float:
    """r = 10^(2(g - 0.5)): 0 -> 0.1, 0.5 -> 1, 1 -> 10."""
    return 10.0 ** (2.0 * (gene - 0.5))


def gene_for_multiplier(value: float) -> float:
    if not 0.1 <= value <= 10.0:
        raise ValueError(f"a learning-rate multiplier must lie in [0.1, 10], got {value}")
    return 0.5 + math.log10(value) / 2.0


def decode(genes: Sequence[float], block_names: Sequence[str], encoding: str = "full") -> FineTunePlan:
    expected = num_genes(len(block_names), encoding)
    if len(genes) != expected:
        layout = {"no_freezing": "one per block", "freeze_bits": "one per block plus a freeze gene per block but the head"}
        raise ValueError(
            f"genome has {len(genes)} genes but encoding {encoding!r} on a model with "
            f"{len(block_names)} blocks needs {expected} ({layout.get(encoding, 'one per block plus a threshold')})"
        )
    trained = trained_blocks([float(g) for g in genes], len(block_names), encoding)
    multipliers = {block_names[i]: 1.0 if encoding == "no_lr_genes" else multiplier(float(genes[i]))
                   for i in sorted(trained)}
    return FineTunePlan(multipliers=multipliers, block_names=tuple(block_names))


def encode(plan: FineTunePlan, encoding: str = "full") -> list[float]:
    """A genome that decodes to ``plan`` (multipliers exact to float precision).

    Frozen blocks get gene 0 and the threshold sits just below the smallest trained gene, so a
    trained block with multiplier 0.1 (gene 0) cannot be encoded with freezing; it is nudged to
    gene 1e-9 (multiplier 0.1 * (1 + 5e-9)).
    """
    check_encoding(encoding)
    frozen_but_trained = {"no_freezing": plan.frozen, "head_trained": plan.frozen[-1:] == [plan.block_names[-1]],
                          "freeze_bits": plan.frozen[-1:] == [plan.block_names[-1]]}.get(encoding)
    if frozen_but_trained:
        raise ValueError(f"encoding {encoding!r} trains {'every block' if encoding == 'no_freezing' else 'the head'}, "
                         f"but the plan freezes {plan.frozen}")
    if encoding == "no_freezing":
        return [gene_for_multiplier(plan.multipliers[b]) for b in plan.block_names]
    if encoding == "no_lr_genes":
        return [1.0 if b in plan.multipliers else 0.0 for b in plan.block_names] + [0.5]
    if encoding == "freeze_bits":
        rates = [gene_for_multiplier(plan.multipliers[b]) if b in plan.multipliers else 0.5 for b in plan.block_names]
        return rates + [1.0 if b in plan.multipliers else 0.0 for b in plan.block_names[:-1]]
    genes = [max(gene_for_multiplier(plan.multipliers[b]), 1e-9) if b in plan.multipliers else 0.0
             for b in plan.block_names]
    return genes + [0.0]


# ---------------------------------------------------------------------------------------------
# Recipes: the plan written against module names, reusable on any nn.Module with those modules.


def make_recipe(plan: FineTunePlan, model, base_lr: float, **info) -> dict:
    """The plan as plain JSON: block -> "frozen" or its multiplier, with each block's modules."""
    blocks = []
    for block in model.blocks:
        blocks.append({
            "name": block.name,
            "modules": list(block.modules),
            "lr_multiplier": plan.multipliers.get(block.name),  # None: frozen
            "num_params": block.num_params,
        })
    trained = sum(b["num_params"] for b in blocks if b["lr_multiplier"] is not None)
    return {
        "model": model.name,
        "base_lr": base_lr,
        "blocks": blocks,
        "trainable_share": trained / max(1, sum(b["num_params"] for b in blocks)),
        **info,
    }


def recipe_table(recipe: dict) -> dict:
    """Block -> "frozen" or multiplier: the short human-readable form."""
    return {b["name"]: ("frozen" if b["lr_multiplier"] is None else round(b["lr_multiplier"], 4))
            for b in recipe["blocks"]}


def save_recipe(recipe: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(recipe, indent=2))


def load_recipe(path_or_recipe: str | Path | dict) -> dict:
    if isinstance(path_or_recipe, dict):
        return path_or_recipe
    path = Path(path_or_recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} not found; a search writes one as results/<run_id>/recipe.json")
    return json.loads(path.read_text())


def apply_recipe(model, recipe: str | Path | dict, base_lr: float | None = None) -> list[dict]:
    """Freeze what the recipe freezes and return optimizer param groups at base_lr x multiplier.

    ``model`` is a biotune PretrainedModel or any ``torch.nn.Module`` whose module names match the
    recipe's (e.g. your own torchvision resnet50). Pass the groups to any optimizer:
    ``torch.optim.AdamW(apply_recipe(net, "recipe.json", 1e-3))``. Frozen blocks get
    ``requires_grad=False``; keep their BatchNorm layers in eval mode while training
    (``frozen_modules(net, recipe)`` lists them).
    """
    recipe = load_recipe(recipe)
    net = getattr(model, "net", model)
    base_lr = recipe["base_lr"] if base_lr is None else base_lr
    owner = _param_owners(net, recipe)
    groups = []
    for block in recipe["blocks"]:
        params = [p for name, p in net.named_parameters() if owner[name] == block["name"]]
        trained = block["lr_multiplier"] is not None
        for p in params:
            p.requires_grad_(trained)
        if trained and params:
            groups.append({"params": params, "lr": base_lr * block["lr_multiplier"],
                           "lr_scale": block["lr_multiplier"], "name": block["name"]})
    return groups


def frozen_modules(model, recipe: str | Path | dict) -> list[torch.nn.Module]:
    """Modules of the recipe's frozen blocks (put their BatchNorm layers in eval mode)."""
    recipe = load_recipe(recipe)
    net = getattr(model, "net", model)
    modules = dict(net.named_modules())
    return [modules[m] for b in recipe["blocks"] if b["lr_multiplier"] is None for m in b["modules"]]


def _param_owners(net: torch.nn.Module, recipe: dict) -> dict[str, str]:
    """Parameter name -> block name, by module-name prefix; every parameter must have an owner."""
    module_names = set(dict(net.named_modules()))
    prefixes = []
    for block in recipe["blocks"]:
        for module in block["modules"]:
            if module not in module_names:
                raise ValueError(
                    f"recipe block {block['name']!r} names module {module!r}, which this model does not "
                    f"have; the recipe was made for {recipe.get('model', 'another model')!r}"
                )
            prefixes.append((module, block["name"]))
    owners = {}
    for name, _ in net.named_parameters():
        matches = [b for m, b in prefixes if name.startswith(m + ".")]
        if len(matches) != 1:
            raise ValueError(f"parameter {name!r} belongs to {len(matches)} recipe blocks, expected exactly 1")
        owners[name] = matches[0]
    return owners
