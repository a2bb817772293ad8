"""Fine-tuning methods compared with BioTune; each is a small module registered here.

A method decides which blocks train (a plan) and may hook into the one trainer (hooks.py): wrap
the network (LoRA), build its own param groups, add a penalty to the loss (L2-SP, L1-SP) or
rebuild the optimizer before every epoch (AutoRGN). All methods share the data, seeds and final
protocol (docs/algorithm.md §7), so the rows of a results table differ in the method alone.
"""
from __future__ import annotations

from . import adafilter, autorgn, full, linear_probe, lora, lp_ft, sp  # noqa: F401  (they register themselves)
from .base import METHODS, Method, PlanMethod

__all__ = ["METHODS", "Method", "PlanMethod", "get_method", "list_methods"]


def get_method(name: str, **hyperparameters) -> Method:
    return METHODS.get(name)(**hyperparameters)


def list_methods() -> list[str]:
    return METHODS.names()
