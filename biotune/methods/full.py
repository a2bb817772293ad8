"""Full fine-tuning: every block trained at base_lr, a new head Linear(features, classes)."""
from .base import METHODS, Method


@METHODS.register("full")
class FullFineTuning(Method):
    name = "full"
