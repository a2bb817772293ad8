"""The types. `ImageDataset` and `Split` are what the rest of the library sees: uint8 tensors,
mapped from the cache where there is one. `Fold` is a chunk of the search data. `RawDataset` and
`RawSplit` are what a source returns: native images, before carving and storing."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .preprocess import Preprocess, resize_to_input

SPLITS = ("train", "val", "test")


class DatasetNotFoundError(FileNotFoundError):
    """The data is not on disk; the message says how to get it."""


# ---------------------------------------------------------------------------------------------
# What the rest of the library sees


@dataclass
class Split:
    """uint8 images (N, C, H, W) at their stored size (C = 1 for gray kept native, else 3) and
    int64 labels (N,). Read from the cache, it pickles as the cache file's path: a worker or a Ray
    task maps the same file instead of receiving a copy, so a machine holds the data once."""

    images: torch.Tensor
    labels: torch.Tensor
    cache_file: Path | None = field(default=None, repr=False, compare=False)  # <folder>/<split>

    def __len__(self) -> int:
        return len(self.labels)

    def __reduce__(self):
        if self.cache_file is None:
            return Split, (self.images, self.labels)
        return map_split, (self.cache_file,)


def map_split(cache_file: Path) -> Split:
    """A split of the cache (cache.write_cache's files), mapped copy-on-write: pages are read on use
    and shared by the processes mapping the file. It lives beside Split, which unpickles through it."""
    if not cache_file.parent.is_dir():
        raise DatasetNotFoundError(
            f"the dataset cache {cache_file.parent} is not on this machine; a Ray task on another node "
            "needs data.root on a shared filesystem (or a copy of the cache folder at the same path)")
    images = np.load(f"{cache_file}_images.npy", mmap_mode="c")
    labels = np.load(f"{cache_file}_labels.npy")
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ValueError(f"{cache_file}: images {images.dtype} {images.shape} and {len(labels)} labels")
    return Split(torch.from_numpy(images), torch.from_numpy(labels), cache_file)


@dataclass
class ImageDataset:
    """A loaded dataset: three stored splits and the preprocess that turns them into model input."""

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
