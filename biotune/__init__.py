"""BioTune: evolutionary search over which blocks of a pretrained CNN to freeze and which
learning rate each trained block gets (Davila, Colan, Hasegawa, IEEE Access 2025).

Public API::

    import biotune
    result = biotune.search("fashion_mnist", "tf_efficientnet_lite0", preset="cpu")
    biotune.final(result.run_id)
    groups = biotune.apply_recipe(my_net, result.folder / "recipe.json", base_lr=1e-3)
"""
from .batch import run_many, run_method
from .config import Config, ConfigError
from .config import resolve as resolve_config
from .data import list_datasets, load_dataset, make_folds
from .experiment import compare, final, run_baseline, search
from .genome import apply_recipe, decode, encode, frozen_modules, load_recipe
from .methods import list_methods
from .models import create_model, list_models
from .store import RunStore
from .train import evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "RunStore", "apply_recipe", "compare", "create_model", "decode", "encode",
    "evaluate", "final", "frozen_modules", "list_datasets", "list_methods", "list_models", "load_dataset",
    "load_recipe", "make_folds", "resolve_config", "run_baseline", "run_many", "run_method", "search", "train",
]
