"""Pretrained CNNs cut into ordered blocks, the unit BioTune freezes or trains.

- zoo.py: `create_model`, `list_models`, `PretrainedModel` and the registered factories (block maps);
- weights.py: state-dict files and where ImageNet weights come from, locally first (offline machines);
- blocks.py: `Block` and the check that a model's blocks partition its parameters;
- tiny.py: `TinyCNN`, for tests and the smoke preset.
Imports go one way: blocks, tiny and weights know nothing of the zoo.
"""

from ..data import Preprocess
from .blocks import Block
from .tiny import TinyCNN
from .weights import StateDict, WeightSource, WeightsUnavailableError
from .zoo import (
    MODELS,
    PretrainedModel,
    create_model,
    list_models,
    meta_arch,
    model_preprocess,
    weight_source,
)

__all__ = [
    "MODELS",
    "Block",
    "PretrainedModel",
    "Preprocess",
    "StateDict",
    "TinyCNN",
    "WeightSource",
    "WeightsUnavailableError",
    "create_model",
    "list_models",
    "meta_arch",
    "model_preprocess",
    "weight_source",
]
