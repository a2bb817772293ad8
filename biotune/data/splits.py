"""Stratified splits: the missing test and validation splits carved from train, subsets that keep
the class proportions, and the folds the search scores genomes on (docs/algorithm.md, section 4)."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.utils import resample

from ..config import num_folds
from .dataset import Fold, RawDataset, RawSplit

TEST_FRACTION = 0.2  # datasets without an official test split: stratified share of the labelled data
TEST_SEED = 0  # fixed, unlike the validation seed, so the test images never change


def carve(raw: RawDataset, val_fraction: float, seed: int) -> tuple[dict[str, RawSplit], str, str]:
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


def subsample(split: RawSplit, limit: int | None, seed: int, name: str) -> RawSplit:
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


# ---------------------------------------------------------------------------------------------
# Folds


def make_folds(train_labels, val_labels, train_split: float, seed: int = 0, whole_val: bool = False) -> list[Fold]:
    """ceil(1 / train_split) folds; fold k is the k-th stratified chunk of train and of val. Chunks
    are disjoint and cover their part, per class within one image of each other. ``whole_val``
    scores every fold on the whole validation part: a chunk of a small one makes a noisy fitness."""
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
