"""Datasets as uint8 tensors: `load_dataset(name, preprocess)`, stored once and shared by processes.

The modules, each importing only those above it:
  preprocess.py  Preprocess (resize, crop, normalise) and resize_to_input, the one resize
  dataset.py     the types: ImageDataset, Split, Fold; RawDataset, RawSplit (what a source returns)
  images.py      native images to stored tensors (arrays resized, files decoded); memory checks
  splits.py      stratified carving of missing splits, subsets, and the search's folds
  cache.py       the memory-mapped cache under <root>/cache
  sources.py     the registered sources (DATASETS) and the helpers they share
  load.py        load_dataset: source -> checks -> carve -> subsets -> stored tensors -> cache
data/README.md describes every source.
"""
from .dataset import SPLITS, DatasetNotFoundError, Fold, ImageDataset, RawDataset, RawSplit, Split
from .images import available_memory, check_batch_fits
from .load import MAX_DEFAULT_SIZE, STORE_AT, check_labels, load_dataset, resolve_source
from .preprocess import Preprocess, resize_to_input
from .sources import (
    DATASETS,
    DIGITS,
    FASHION_MNIST_DEBIAN,
    FETCHABLE,
    IMAGE_SUFFIXES,
    NPZ_KEYS,
    NPZ_LAYOUT,
    check_image_files,
    list_datasets,
    reading_source,
)
from .splits import TEST_FRACTION, TEST_SEED, make_folds

__all__ = [
    "DATASETS", "DIGITS", "FASHION_MNIST_DEBIAN", "FETCHABLE", "IMAGE_SUFFIXES", "MAX_DEFAULT_SIZE", "NPZ_KEYS",
    "NPZ_LAYOUT", "SPLITS", "STORE_AT", "TEST_FRACTION", "TEST_SEED", "DatasetNotFoundError", "Fold",
    "ImageDataset", "Preprocess", "RawDataset", "RawSplit", "Split", "available_memory", "check_batch_fits",
    "check_image_files", "check_labels", "list_datasets", "load_dataset", "make_folds", "reading_source",
    "resize_to_input", "resolve_source",
]
