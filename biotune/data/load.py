"""`load_dataset`: a name or a path in, the stored uint8 tensors out. It resolves the source and
checks its options, reads it, checks the labels, carves the missing splits, takes the subsets, stores
the images and caches them; each step lives in its own module."""
from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ..registry import UnknownNameError
from .cache import cache_key, read_cache, write_cache
from .dataset import SPLITS, ImageDataset, RawDataset
from .images import check_fits, open_image, to_split
from .preprocess import Preprocess
from .sources import DATASETS, reading_source, user_path
from .splits import carve, subsample

log = logging.getLogger(__name__)
STORE_AT = ("native", "input")
MAX_DEFAULT_SIZE = 224  # default input size cap for photo sets loaded without a Preprocess


def load_dataset(name: str, preprocess: Preprocess | None = None, *, root: str | Path = "data",
                 download: bool = False, max_train: int | None = None, max_val: int | None = None,
                 max_test: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                 cache: bool = True, store_at: str = "native", verify: bool = True,
                 **source_options) -> ImageDataset:
    """A dataset by name, or the path of an .npz, a .csv or an image folder, as uint8 tensors.

    Missing splits are carved, stratified: test first (TEST_FRACTION, TEST_SEED), then validation
    (`val_fraction` of train, `seed`). `max_*` take stratified subsets. Without `preprocess` the
    native size is kept. `store_at="native"` keeps arrays smaller than the input at their size
    (`to_input` resizes each batch), "input" resizes them once. With `cache`, every load maps the
    tensors from `<root>/cache`. `verify=False` accepts re-packed torchvision files (`reading_source`).
    """
    if store_at not in STORE_AT:
        raise ValueError(f"store_at must be one of {', '.join(STORE_AT)}, got {store_at!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    limits = {"train": max_train, "val": max_val, "test": max_test}
    for split, limit in limits.items():
        if limit is not None and limit < 1:
            raise ValueError(f"max_{split} must be a positive count or None, got {limit}")
    source_name, options = resolve_source(str(name), source_options)
    source = DATASETS.get(source_name)
    _check_options(source_name, source, options)
    root = Path(root)
    title = Path(options["path"]).stem if "path" in options else source_name
    key = cache_key(source_name, options, preprocess, val_fraction, seed, limits, store_at)
    cache_folder = (root / "cache" / f"{title}-{key}").resolve()  # a split pickles as this path: absolute
    if cache and cache_folder.exists():
        log.info("%s: reading the cached tensors %s", title, cache_folder)
        cached = read_cache(cache_folder)
        if cached is not None:
            return cached
        shutil.rmtree(cache_folder, ignore_errors=True)  # damaged: rebuilt below

    try:
        with reading_source(title, root, verify):
            raw = source(root, download, **options)
    except TypeError as err:  # an option of the wrong type, e.g. {num_classes: three}
        raise ValueError(f"dataset {title}: its options {options} do not fit ({err}); see data/README.md "
                         "for each source's options and their types") from err
    check_labels(raw, str(options.get("path", title)))
    preprocess = preprocess or _native_preprocess(raw, title)
    splits, val_source, test_source = carve(raw, val_fraction, seed)
    splits = {split: subsample(splits[split], limits[split], seed, split) for split in SPLITS}
    check_fits(splits, preprocess, store_at, title)
    tensors = {split: to_split(splits[split], preprocess, store_at, f"{title} {split}") for split in SPLITS}
    dataset = ImageDataset(title, list(raw.class_names), **tensors, preprocess=preprocess,
                           val_source=val_source, test_source=test_source)
    log.info("loaded %s", dataset.summary())
    if cache and write_cache(dataset, cache_folder):
        return read_cache(cache_folder) or dataset  # mapped: the pages are shared with other processes
    return dataset


def resolve_source(name: str, options: dict) -> tuple[str, dict]:
    """A registered name or, as a convenience, a path: *.npz, *.csv or an image-folder directory.
    A name that looks like a path (a separator, a leading ~, an existing file) is never looked up
    in the registry, so a mistyped path says that it does not exist."""
    if name in DATASETS:
        return name, options
    path = Path(name).expanduser()
    kind = {".npz": "npz", ".csv": "csv"}.get(path.suffix.lower()) or ("imagefolder" if path.is_dir() else None)
    if kind is not None:
        return kind, {**options, "path": path}
    if not ({"/", os.sep} & set(name) or name.startswith("~") or path.exists()):
        raise UnknownNameError(DATASETS.unknown_message(name)
                               + " A path to an .npz file, a .csv file or an image folder works too.")
    user_path(path, "dataset: an .npz file, a .csv file or an image folder")  # raises if missing
    raise ValueError(f"{path} is neither an .npz file, a .csv file nor a folder; a dataset path must be "
                     "one of these (see data/README.md)")


def _check_options(name: str, source, options: dict) -> None:
    """Fail on a misspelt or missing source option before any work, listing the valid ones."""
    signature = inspect.signature(source)
    try:
        signature.bind(Path(), False, **options)
    except TypeError as err:
        accepted = list(signature.parameters)[2:]
        raise ValueError(f"dataset {name!r}: {err}; its options are: {', '.join(accepted) or 'none'}") from None


def check_labels(raw: RawDataset, title: str) -> None:
    """Labels index the class names, and every class has training images: a class seen only in
    val/test could never be learnt, and integer labels with gaps (0, 5, 10) would otherwise
    silently build a head with classes that have no data."""
    num_classes = len(raw.class_names)
    for split in SPLITS:
        part = getattr(raw, split)
        if part is None:
            continue
        if len(part) == 0:
            raise ValueError(f"{title}: the {split} split has no images")
        if part.labels.max() >= num_classes:
            raise ValueError(f"{title} {split}: label {part.labels.max()} but only "
                             f"{num_classes} class names; labels must be 0 .. {num_classes - 1}")
    counts = np.bincount(raw.train.labels, minlength=num_classes)
    absent = np.flatnonzero(counts == 0)
    if len(absent):
        elsewhere = [split for split in ("val", "test")
                     if getattr(raw, split) is not None and np.isin(getattr(raw, split).labels, absent).any()]
        raise ValueError(
            f"{title}: the training labels are {_labels(np.flatnonzero(counts), raw.class_names)}, so "
            f"{len(absent)} of {num_classes} classes have no training images: labels "
            f"{_labels(absent, raw.class_names)}"
            f"{'; they occur in ' + ' and '.join(elsewhere) if elsewhere else ''}. Labels must be "
            "0 .. K-1 with every class in train: remap them (np.unique(labels, return_inverse=True)), "
            "or add training images of those classes")


def _labels(classes: np.ndarray, class_names: list[str], most: int = 20) -> str:
    """'0, 5, 10' for classes named by their label, '1 (cat), 2 (dog)' for named ones."""
    named = [str(c) if class_names[c] == str(c) else f"{c} ({class_names[c]})" for c in classes[:most]]
    return ", ".join(named) + (", ..." if len(classes) > most else "")


def _native_preprocess(raw: RawDataset, title: str) -> Preprocess:
    """No preprocess given: keep the native size (photo sets: first image's shorter side, capped)."""
    images = raw.train.images
    if isinstance(images, np.ndarray):
        size = min(images.shape[1:3])
    else:
        with open_image(images[0]) as first:
            size = min(*first.size, MAX_DEFAULT_SIZE)
    log.info("%s: no preprocess given; using %d px, bilinear, mean = std = 0.5", title, size)
    return Preprocess(size, size, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
