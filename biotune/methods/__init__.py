"""Fine-tuning methods compared with BioTune; each is a small module registered here.

A method turns a model into a fine-tuning plan for the one trainer; all of them go through the
same data, seeds and final protocol (biotune.md §7), so rows of a results table differ in the
method alone.
"""
from ..registry import Registry

METHODS = Registry("method")

from . import full, linear_probe  # noqa: E402,F401  (modules register themselves)


def list_methods() -> list[str]:
    return METHODS.names()
