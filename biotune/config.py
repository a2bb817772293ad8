"""Typed configuration: one dataclass per component, presets, and a strict merge.

Merge order: dataclass defaults <- preset <- YAML file <- dotted overrides
(``--ga.population 8``). Unknown sections or keys are errors that list the valid ones, and
values are checked before anything trains, so a typo costs a second, not an hour.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError

# Field types: pydantic checks every value against them (``validate``) before anything runs.
# Strict: YAML's "8" stays a string and 3.5 is no integer; bounds say what a value may be.
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
Seed = Annotated[int, Strict(), Field(ge=0, lt=2**32)]  # what numpy and optuna accept
Count = Annotated[int, Strict(), Field(ge=1)]
Rate = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]
FrozenBN = Literal["eval", "train"]
Fitness = Literal["acc", "acc+std", "loss"]
Encoding = Literal["full", "no_lr_genes", "no_freezing", "head_trained", "freeze_bits"]
GAVariant = Literal["improved", "reference"]
SearcherName = Literal["biotune", "random", "tpe", "cmaes"]
FinalSelection = Literal["best_so_far", "rescore_top_k"]
FitnessValidation = Literal["fold", "whole"]
Breeding = Literal["steady", "generational"]
ExecutorKind = Literal["serial", "process", "ray"]
StoreAt = Literal["native", "input"]
Device = Annotated[str, Strict(), Field(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")]
Amp = Literal["auto", True, False]  # "auto": the model's measured precision (models/zoo.py)


@dataclass
class DataConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")
    dataset: Text = "fashion_mnist"
    image_size: Annotated[int, Strict(), Field(ge=8)] | None = None  # None: the model's native input size
    max_train: Count | None = None  # stratified, seeded subsets of each split (None: all)
    max_val: Count | None = None
    max_test: Count | None = None
    # carved from train when the dataset has no official validation split
    val_fraction: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.2
    split_seed: Seed = 0
    root: Text = "data"
    download: Flag = False
    # torchvision's checksums on load (and `biotune data check`'s sha256 of weights); false accepts
    # files that differ from the originals: re-packed copies, the fakes of `make rehearse`
    verify: Flag = True
    # "native": images smaller than the model input stay at their size in memory and on disk and
    # are resized per batch on the training device (SVHN at 224 px: 0.3 GB, not 15); "input":
    # resized once at load, cheaper per step where the input is small (the cpu presets)
    store_at: StoreAt = "native"
    # the arrays cached under <root>/cache and mapped by every process; a cached split goes to a
    # worker or Ray task as the file's path (false: no cache, the images go by value)
    cache: Flag = True
    options: dict = field(default_factory=dict)  # source options, e.g. {"path": "my.npz"}


@dataclass
class ModelConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")
    name: Text = "tf_efficientnet_lite0"
    weights: Text | None = "imagenet"  # "imagenet", None (random) or a path to a state dict
    allow_download: Flag = False


@dataclass
class TrainConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")
    base_lr: Rate = 1e-3
    weight_decay: NonNegative = 0.0
    max_epochs: Count = 30
    patience: Count = 3  # epochs without improvement of validation macro accuracy
    min_delta: NonNegative = 0.0
    cosine_t_max: Count = 100  # CosineAnnealingLR(T_max) stepped once per epoch
    batch_size: Count = 96
    eval_batch_size: Count = 64
    frozen_bn: FrozenBN = "eval"  # "eval": frozen blocks keep BatchNorm statistics; "train": released code
    seeds: Annotated[list[Seed], Field(min_length=1)] = field(default_factory=lambda: [684, 559, 629])
    device: Device = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    amp: Amp = "auto"  # bfloat16 autocast on CUDA (ignored on CPU); true/false force it
    cudnn_benchmark: Flag = True  # cuDNN times its kernels once per input shape (fixed here); CUDA only
    num_threads: Count | None = None  # torch CPU threads (None: torch's default)
    # Exact speed levers (same math, float rounding aside); off only to measure them (biotune bench)
    channels_last: Flag = True  # NHWC tensors: about 1.8x faster for Lite0 on a 2-core CPU; cuDNN's preferred
    prefix_cache: Flag = True  # fitness runs reuse the activations of a frozen leading prefix per fold
    prefix_cache_mb: Count = 2048  # memory those activations may take (least recently used evicted)


@dataclass
class GAConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")
    population: Annotated[int, Strict(), Field(ge=2)] = 10
    generations: Annotated[int, Strict(), Field(ge=0)] = 10
    elites: Annotated[int, Strict(), Field(ge=0)] = 3
    train_split: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.5  # fold share: n_folds = ceil(1 / train_split)
    fitness: Fitness = "acc"
    encoding: Encoding = "full"
    ga_variant: GAVariant = "improved"  # "reference": the released code's behaviour
    momentum: Flag = False
    exploit_step: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.25
    seed: Seed = 0
    cache: Flag = True  # evaluation cache (improved variant only)
    searcher: SearcherName = "biotune"  # random / tpe / cmaes: baselines at BioTune's budget
    # Which genome a search returns: the best fitness seen (the paper's rule, each measured on
    # whichever fold it met), or the best mean over every fold of the rescore_k best distinct
    # genomes, re-evaluated at the end (their cost is counted as evaluations of the run).
    final_selection: FinalSelection = "best_so_far"
    # Where a fitness is scored: "fold", the fold's chunk of the validation split (the paper's);
    # "whole", the whole validation split on every fold (ours: a small chunk is a noisy fitness)
    fitness_val: FitnessValidation = "fold"
    rescore_k: Count = 3
    # Approximate lever, off by default (optuna's PercentilePruner): after prune_warmup finished
    # training runs on a fold, a run whose best validation macro accuracy after an epoch is below
    # the prune_percentile-th percentile of those runs at that epoch stops, recorded as "pruned".
    prune: Flag = False
    prune_percentile: Annotated[float, Strict(), Field(gt=0, lt=100)] = 50.0  # 50: the median pruner
    prune_warmup: Annotated[int, Strict(), Field(ge=0)] = 4
    # "steady": each child is evaluated before the next is bred (its fitness decides which parents
    # leave the pool, docs/algorithm.md §5c); "generational": all N - E children are bred from one
    # snapshot of the pool and evaluated at once (another algorithm; parallel, same budget).
    breeding: Breeding = "steady"


@dataclass
class ExecutorConfig:
    """Where training runs execute (biotune/executors.py). Results do not depend on it, so it
    may change on ``--resume`` and is not part of the config a finished row is reused by."""

    __pydantic_config__ = ConfigDict(extra="forbid")
    kind: ExecutorKind = "serial"
    workers: Count = 1  # training runs at once (process, ray)
    gpus_per_run: NonNegative = 0.0  # ray: GPUs each training run asks for; 0.25 packs four on one GPU
    # GPU placement (biotune/gpus.py): the GPUs runs go to (torch indices; None: every visible
    # one) and how many share each (each with that fraction of its memory; ray: 1/runs_per_gpu
    # GPUs per run unless gpus_per_run says otherwise)
    gpus: Annotated[list[Annotated[int, Strict(), Field(ge=0)]], Field(min_length=1)] | None = None
    runs_per_gpu: Count = 1
    require_gpu: Flag = False  # train.device=auto may not fall back to the CPU (the paper preset)


@dataclass
class Config:
    __pydantic_config__ = ConfigDict(extra="forbid")
    preset: Text = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ga: GAConfig = field(default_factory=GAConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    results_dir: Text = "results"
    store: Text | None = None  # SQLite file; None: <results_dir>/runs.sqlite

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else Path(self.results_dir) / "runs.sqlite"

    def to_dict(self) -> dict:
        return asdict(self)


CHOICES = {"data.store_at": get_args(StoreAt), "train.frozen_bn": get_args(FrozenBN), "ga.fitness": get_args(Fitness),
           "ga.encoding": get_args(Encoding), "ga.ga_variant": get_args(GAVariant),
           "ga.searcher": get_args(SearcherName), "ga.final_selection": get_args(FinalSelection), "ga.fitness_val": get_args(FitnessValidation),
           "ga.breeding": get_args(Breeding), "executor.kind": get_args(ExecutorKind)}

# Presets override the defaults (which are the paper's recipe). The cpu values were chosen so a
# whole cpu run (search + final for BioTune, full fine-tuning and linear probing) on one dataset
# takes about an hour on 2 cores; `make bench` measures the time per evaluation.
PRESETS: dict[str, dict] = {
    "paper": {"executor": {"require_gpu": True}},  # days on a CPU: only with --train.device cpu
    "cpu": {
        "data": {"image_size": 64, "max_train": 4000, "max_val": 1000, "max_test": 2000, "store_at": "input"},
        "train": {"max_epochs": 6, "patience": 2, "batch_size": 64, "eval_batch_size": 256,
                  "seeds": [684]},
        "ga": {"population": 6, "generations": 4, "elites": 2},
    },
    # The multi-seed study on 2 cores (docs/results.md): 44 evaluations a search, 500-image
    # validation folds where a dataset has them, pruning (for every searcher alike), 48 px
    "study": {
        "data": {"image_size": 48, "max_train": 2000, "max_val": 1000, "max_test": 2000, "store_at": "input"},
        "train": {"max_epochs": 4, "patience": 2, "batch_size": 64, "eval_batch_size": 256, "seeds": [684]},
        "ga": {"population": 6, "generations": 4, "elites": 2, "prune": True},
    },
    "demo": {
        "data": {"image_size": 48, "max_train": 1000, "max_val": 400, "max_test": 1000, "store_at": "input"},
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


class DeprecatedKey(FutureWarning):
    """A config key under an old name, read under its new one (the message names it)."""


def _merge_section(target: Any, updates: dict, where: str) -> None:
    valid = {f.name for f in fields(target)}
    for key, value in updates.items():
        if key not in valid:
            raise ConfigError(
                f"unknown config key {where}.{key}; valid keys of [{where}]: {', '.join(sorted(valid))}"
            )
        setattr(target, key, copy.deepcopy(value))


# The executor's settings were the section ``run`` (issue 22: "run" meant five things), its kind
# ``run.executor``; stores written then keep that spelling, and users' files and flags may too.
OLD_SECTION, NEW_SECTION = "run", "executor"
OLD_KEYS = {"executor": "kind"}  # run.executor -> executor.kind; any other run.X -> executor.X


def renamed(updates: dict | None, source: str, *, warn: bool = True) -> dict | None:
    """``updates`` with the old section ``run`` read as ``executor``. ``warn``: each old key a user
    typed warns (FutureWarning) with its new spelling; a stored config is translated silently."""
    if not isinstance(updates, dict) or OLD_SECTION not in updates:
        return updates
    updates = dict(updates)
    old = updates.pop(OLD_SECTION)
    if not isinstance(old, dict):
        raise ConfigError(f"{source}: [{OLD_SECTION}] (now [{NEW_SECTION}]) must be a mapping of keys, got {old!r}")
    names = {key: OLD_KEYS.get(key, key) for key in old}  # old key -> new key
    if warn:
        moves = [(f"key {OLD_SECTION}.{key}", f"{NEW_SECTION}.{new}") for key, new in names.items()]
        for was, now in moves or [(f"section {OLD_SECTION}", NEW_SECTION)]:
            warnings.warn(f"{source}: config {was} is deprecated; use {now}", DeprecatedKey, stacklevel=3)
    given = updates.get(NEW_SECTION, {})
    if isinstance(given, dict):  # (anything else is refused by merge); the new spelling wins, as a later layer
        updates[NEW_SECTION] = {**{names[key]: value for key, value in old.items()}, **given}
    return updates


def merge(config: Config, updates: dict, source: str, *, stored: bool = False) -> Config:
    """Apply a nested dict of updates; unknown sections or keys raise ConfigError.

    A layer that names another dataset without giving its options drops the options merged so
    far: they belong to the previous dataset (the smoke preset's synthetic sizes, say). Old
    spellings are read under their new names (``renamed``; ``stored``: without a warning).
    """
    updates = renamed(updates, source, warn=not stored)
    sections = {f.name for f in fields(Config) if dataclasses.is_dataclass(getattr(config, f.name))}
    top = {f.name for f in fields(Config)} - sections
    data = (updates or {}).get("data")
    if isinstance(data, dict) and "options" not in data and data.get("dataset", config.data.dataset) != config.data.dataset:
        config.data.options = {}
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


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading floats as YAML 1.2 does: ``1e-4`` is a number, not a string."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str, where: str, error: type[ValueError] = ConfigError) -> Any:
    """Parse YAML; a syntax error raises ``error`` naming ``where`` (a file or flag), the line and
    the column (PyYAML's own errors name neither the file nor are they ValueErrors)."""
    try:
        return yaml.load(text, Loader=YAMLLoader)
    except ValueError as problem:  # a scalar the resolver took for a number that is none, e.g. "._e5"
        raise error(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as problem:
        mark = getattr(problem, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        message = getattr(problem, "problem", None) or " ".join(str(problem).split())
        context, context_mark = getattr(problem, "context", None), getattr(problem, "context_mark", None)
        if context and context_mark:  # e.g. "while parsing a flow sequence", opened on an earlier line
            message += f" ({context} from line {context_mark.line + 1})"
        raise error(f"{where}: invalid YAML{at}: {message}") from None


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
            items.append((key, load_yaml(raw, f"override {key}") if raw != "" else None))
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


def flat_overrides(overrides: list[str] | dict | None) -> dict:
    """``["ga.population=8"]`` or ``{"ga.population": 8}`` -> ``{"ga.population": 8}``: one form
    that callers can extend key by key."""
    nested = parse_overrides(overrides or [])
    return {f"{key}.{inner}" if isinstance(value, dict) else key: inner_value
            for key, value in nested.items()
            for inner, inner_value in (value.items() if isinstance(value, dict) else [(None, value)])}


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
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} cannot be read as text ({error}); pass a YAML file") from None
        loaded = load_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        loaded.pop("preset", None)
        merge(config, loaded, str(path))
    merge(config, parse_overrides(overrides or []), "override")
    return validate(config)


def from_dict(values: dict) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a stored run's config)."""
    values = copy.deepcopy(values)
    config = Config(preset=values.pop("preset", "paper"))
    merge(config, values, "stored config", stored=True)
    return validate(config)


_CONFIG_SCHEMA = TypeAdapter(Config)


def validate(config: Config) -> Config:
    """Check every value against its field's type and bounds (pydantic), then the rules that tie
    fields together; return the checked config. Errors name the key, the value and what is expected."""
    try:
        checked = _CONFIG_SCHEMA.validate_python(config.to_dict())
    except ValidationError as error:
        problems = []
        for problem in error.errors():
            key = ".".join(str(part) for part in problem["loc"])
            problems.append(f"{key}={problem['input']!r}: {_expected(problem)}")
        raise ConfigError("invalid config value" + ("s" if len(problems) > 1 else "") + ": "
                          + "; ".join(problems)) from None
    ga = checked.ga
    if ga.elites >= ga.population:
        raise ConfigError(f"ga.elites must be >= 0 and smaller than ga.population ({ga.population}), got {ga.elites}")
    executor = checked.executor
    if executor.workers > 1 and executor.kind == "serial":
        raise ConfigError(f"executor.workers={executor.workers} with executor.kind=serial runs one training run at a "
                          "time; add --executor process (this machine) or --executor ray")
    if executor.gpus_per_run and executor.kind != "ray":
        raise ConfigError(f"executor.gpus_per_run={executor.gpus_per_run} needs executor.kind=ray (Ray gives each "
                          "training run its share of a GPU); the serial and process executors place runs with "
                          "executor.gpus and executor.runs_per_gpu")
    if executor.gpus_per_run and checked.train.device not in ("auto", "cuda"):
        raise ConfigError(f"executor.gpus_per_run={executor.gpus_per_run} with train.device={checked.train.device}: "
                          "each Ray task trains on the GPU Ray assigns it; set train.device=auto or cuda, or "
                          "executor.gpus_per_run=0")
    _check_gpu_placement(executor, checked.train)
    if Path(checked.results_dir).exists() and not Path(checked.results_dir).is_dir():
        raise ConfigError(f"results_dir={checked.results_dir!r} is a file; run folders need a folder "
                          "(pass --results-dir DIR)")
    return checked


def _check_gpu_placement(executor: ExecutorConfig, train: TrainConfig) -> None:
    """What contradicts itself before any GPU is looked at; gpus.places checks the rest against
    the GPUs this machine has."""
    if executor.gpus is not None and len(set(executor.gpus)) < len(executor.gpus):
        raise ConfigError(f"executor.gpus={executor.gpus} names a GPU twice; to put several runs on one GPU, use "
                          "executor.runs_per_gpu (--runs-per-gpu N)")
    if (executor.gpus is not None or executor.runs_per_gpu > 1) and train.device in ("cpu", "mps"):
        raise ConfigError(f"executor.gpus={executor.gpus} and executor.runs_per_gpu={executor.runs_per_gpu} place "
                          f"training runs on GPUs, but train.device={train.device}; drop them, or set train.device=auto "
                          "or cuda")
    pinned = re.fullmatch(r"cuda:(\d+)", train.device)
    if pinned and executor.gpus is not None and executor.gpus != [int(pinned[1])]:
        raise ConfigError(f"train.device={train.device} pins every run to GPU {pinned[1]}, but "
                          f"executor.gpus={executor.gpus}; set train.device=cuda (or auto) to spread runs over "
                          "executor.gpus")
    if executor.gpus_per_run and executor.runs_per_gpu > 1:
        raise ConfigError(f"executor.gpus_per_run={executor.gpus_per_run} and "
                          f"executor.runs_per_gpu={executor.runs_per_gpu} both say how much of a GPU a Ray run takes; "
                          "give one of them")


def _expected(problem: dict) -> str:
    """pydantic's message, with the choices spelt out and the device's pattern in words."""
    if problem["type"] == "literal_error":
        return "choose one of: " + problem["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
    if problem["type"] == "string_pattern_mismatch":
        return "expected auto, cpu, mps, cuda or cuda:N"
    if problem["type"] == "too_short":
        return f"expected at least {problem['ctx']['min_length']} value(s)"
    return problem["msg"].replace("Input should be", "expected")


def num_folds(train_split: float) -> int:
    """ceil(1 / train_split), where 1 / (1/3) must give 3, not 4."""
    return math.ceil(1 / train_split - 1e-9)
