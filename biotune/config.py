"""Typed configuration: one dataclass per component, presets, and a strict merge.

Merge order: dataclass defaults <- preset <- YAML file <- dotted overrides
(``--ga.population 8``). Unknown sections or keys are errors that list the valid ones, and
values are checked before anything trains, so a typo costs a second, not an hour.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    image_size: int | None = None  # None: the model's native input size
    max_train: int | None = None  # stratified, seeded subsets of each split (None: all)
    max_val: int | None = None
    max_test: int | None = None
    val_fraction: float = 0.2  # carved from train when the dataset has no official validation split
    split_seed: int = 0
    root: str = "data"
    download: bool = False
    options: dict = field(default_factory=dict)  # source options, e.g. {"path": "my.npz"}


@dataclass
class ModelConfig:
    name: str = "tf_efficientnet_lite0"
    weights: str | None = "imagenet"  # "imagenet", None (random) or a path to a state dict
    allow_download: bool = False


@dataclass
class TrainConfig:
    base_lr: float = 1e-3
    weight_decay: float = 0.0
    max_epochs: int = 30
    patience: int = 3  # epochs without improvement of validation macro accuracy
    min_delta: float = 0.0
    cosine_t_max: int = 100  # CosineAnnealingLR(T_max) stepped once per epoch
    batch_size: int = 96
    eval_batch_size: int = 64
    frozen_bn: str = "eval"  # "eval": frozen blocks keep BatchNorm statistics; "train": released code
    seeds: list = field(default_factory=lambda: [684, 559, 629])
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on CPU)
    num_threads: int | None = None  # torch CPU threads (None: torch's default)


@dataclass
class GAConfig:
    population: int = 10
    generations: int = 10
    elites: int = 3
    train_split: float = 0.5  # fold share: n_folds = ceil(1 / train_split)
    fitness: str = "acc"  # "acc" | "acc+std" | "loss"
    encoding: str = "full"  # "full" | "no_lr_genes" | "no_freezing"
    ga_variant: str = "improved"  # "improved" | "reference" (the released code's behaviour)
    momentum: bool = False
    exploit_step: float = 0.25
    seed: int = 0
    cache: bool = True  # evaluation cache (improved variant only)
    searcher: str = "biotune"  # "biotune" | "random" | "tpe" | "cmaes": baselines at BioTune's budget


@dataclass
class Config:
    preset: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ga: GAConfig = field(default_factory=GAConfig)
    results_dir: str = "results"
    store: str | None = None  # SQLite file; None: <results_dir>/runs.sqlite

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else Path(self.results_dir) / "runs.sqlite"

    def to_dict(self) -> dict:
        return asdict(self)


CHOICES = {
    "train.frozen_bn": ("eval", "train"),
    "ga.fitness": ("acc", "acc+std", "loss"),
    "ga.encoding": ("full", "no_lr_genes", "no_freezing"),
    "ga.ga_variant": ("improved", "reference"),
    "ga.searcher": ("biotune", "random", "tpe", "cmaes"),
}

# Presets override the defaults (which are the paper's recipe). The cpu values were chosen so a
# whole cpu run (search + final for BioTune, full fine-tuning and linear probing) on one dataset
# takes about an hour on 2 cores; `make bench` measures the time per evaluation.
PRESETS: dict[str, dict] = {
    "paper": {},
    "cpu": {
        "data": {"image_size": 64, "max_train": 4000, "max_val": 1000, "max_test": 2000},
        "train": {"max_epochs": 6, "patience": 2, "batch_size": 64, "eval_batch_size": 256,
                  "seeds": [684]},
        "ga": {"population": 6, "generations": 4, "elites": 2},
    },
    "demo": {
        "data": {"image_size": 48, "max_train": 1000, "max_val": 400, "max_test": 1000},
        "train": {"max_epochs": 3, "patience": 1, "batch_size": 64, "eval_batch_size": 256,
                  "seeds": [684]},
        "ga": {"population": 4, "generations": 3, "elites": 1},
    },
    "smoke": {
        "data": {"dataset": "synthetic", "image_size": 16, "max_train": None,
                 "options": {"num_classes": 3, "num_train": 96, "num_val": 48, "num_test": 48,
                             "size": 16}},
        "model": {"name": "tiny_cnn", "weights": None},
        "train": {"max_epochs": 1, "patience": 1, "batch_size": 32, "eval_batch_size": 64,
                  "seeds": [0], "device": "cpu"},
        "ga": {"population": 3, "generations": 1, "elites": 1},
    },
}


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


def _merge_section(target: Any, updates: dict, where: str) -> None:
    valid = {f.name for f in fields(target)}
    for key, value in updates.items():
        if key not in valid:
            raise ConfigError(
                f"unknown config key {where}.{key}; valid keys of [{where}]: {', '.join(sorted(valid))}"
            )
        setattr(target, key, copy.deepcopy(value))


def merge(config: Config, updates: dict, source: str) -> Config:
    """Apply a nested dict of updates; unknown sections or keys raise ConfigError."""
    sections = {f.name for f in fields(Config) if dataclasses.is_dataclass(getattr(config, f.name))}
    top = {f.name for f in fields(Config)} - sections
    for key, value in (updates or {}).items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a mapping of keys, got {value!r}")
            _merge_section(getattr(config, key), value, key)
        elif key in top:
            setattr(config, key, value)
        else:
            raise ConfigError(
                f"{source}: unknown config section or key {key!r}; valid: {', '.join(sorted(sections | top))}"
            )
    return config


def parse_overrides(pairs: list[str] | dict) -> dict:
    """``["ga.population=8", "train.seeds=[1,2]"]`` -> nested dict; values parsed as YAML."""
    if isinstance(pairs, dict):
        items = pairs.items()
    else:
        items = []
        for pair in pairs:
            if "=" not in pair:
                raise ConfigError(f"override {pair!r} must look like section.key=value, e.g. ga.population=8")
            key, raw = pair.split("=", 1)
            items.append((key, yaml.safe_load(raw) if raw != "" else None))
    nested: dict = {}
    for dotted, value in items:
        parts = dotted.split(".")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(f"override key {dotted!r} must be 'section.key' or a top-level key")
        if len(parts) == 1:
            nested[parts[0]] = value
        else:
            nested.setdefault(parts[0], {})[parts[1]] = value
    return nested


def resolve(preset: str = "cpu", config_file: str | Path | None = None,
            overrides: list[str] | dict | None = None) -> Config:
    """Build the run's config: defaults <- preset <- YAML file <- dotted overrides, then validate."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    config = merge(Config(preset=preset), PRESETS[preset], f"preset {preset}")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file with sections "
                              "data/model/train/ga")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        loaded.pop("preset", None)
        merge(config, loaded, str(path))
    merge(config, parse_overrides(overrides or []), "override")
    validate(config)
    return config


def from_dict(values: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a stored run's config)."""
    values = copy.deepcopy(values)
    config = Config(preset=values.pop("preset", "paper"))
    merge(config, values, "stored config")
    validate(config)
    return config


def validate(config: Config) -> None:
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value not in allowed:
            raise ConfigError(f"{dotted}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    ga, train, data = config.ga, config.train, config.data
    checks = [
        (ga.population >= 2, f"ga.population must be >= 2, got {ga.population}"),
        (0 <= ga.elites < ga.population,
         f"ga.elites must be >= 0 and smaller than ga.population ({ga.population}), got {ga.elites}"),
        (ga.generations >= 0, f"ga.generations must be >= 0, got {ga.generations}"),
        (0 < ga.train_split <= 1, f"ga.train_split must be in (0, 1], got {ga.train_split}"),
        (0 < ga.exploit_step <= 1, f"ga.exploit_step must be in (0, 1], got {ga.exploit_step}"),
        (train.base_lr > 0, f"train.base_lr must be > 0, got {train.base_lr}"),
        (train.max_epochs >= 1, f"train.max_epochs must be >= 1, got {train.max_epochs}"),
        (train.patience >= 1, f"train.patience must be >= 1, got {train.patience}"),
        (train.batch_size >= 1 and train.eval_batch_size >= 1, "batch sizes must be >= 1"),
        (isinstance(train.seeds, list) and len(train.seeds) >= 1
         and all(isinstance(s, int) for s in train.seeds),
         f"train.seeds must be a non-empty list of integers, got {train.seeds!r}"),
        (0 < data.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {data.val_fraction}"),
        (data.image_size is None or data.image_size >= 8,
         f"data.image_size must be >= 8 pixels or null, got {data.image_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def num_folds(train_split: float) -> int:
    """ceil(1 / train_split), where 1 / (1/3) must give 3, not 4."""
    return math.ceil(1 / train_split - 1e-9)
