"""LP-FT: linear probing, then full fine-tuning from the probed head.

Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution",
ICLR 2022. Fine-tuning with a random head sends large, noisy gradients into the pretrained
features early on; training the head alone first (backbone and its BatchNorm statistics frozen)
and only then every block keeps those features closer to the pretrained ones. Both phases use the
same trainer settings, each early-stopped on validation; the full fine-tuning phase starts from
the best-validation probe. The result counts as two training runs.
"""
from __future__ import annotations

from .base import METHODS, Method
from .linear_probe import LinearProbe


@METHODS.register("lp_ft")
class LPFT(Method):
    name = "lp_ft"

    def fit(self, model, dataset, cfg, seed: int, *, keep_net: bool = False, **kwargs):
        probe = LinearProbe().fit(model, dataset, cfg, seed, keep_net=True, **kwargs)
        tuned = super().fit(model, dataset, cfg, seed, start_from=probe.net, keep_net=keep_net, **kwargs)
        tuned.history = ([{"phase": "lp", **h} for h in probe.history]
                         + [{"phase": "ft", **h} for h in tuned.history])
        tuned.seconds += probe.seconds
        tuned.train_images += probe.train_images
        tuned.train_runs = probe.train_runs + tuned.train_runs
        return tuned
