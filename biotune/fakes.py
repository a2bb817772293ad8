"""Tiny copies of the paper's nine datasets in each source's exact on-disk format.

Each writer lays out what torchvision's download (or ISIC's archive) leaves under the data root,
so the real loaders read them as they would the real files: the approach of torchvision's own test
suite (test/datasets_utils.py), which proves its dataset classes without downloading them. Every
image is one flat colour that encodes its class (`class_code`), so a test can tell that images and
labels still belong together after loading. The checksums differ from the real files': load the
fakes with `data.verify` false. `biotune data fakes ROOT` (and `make rehearse`) writes all nine.
"""
from __future__ import annotations

import bz2
import gzip
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
from PIL import Image

from .registry import Registry

FAKES: Registry[Callable[[Path, int], None]] = Registry("fake dataset")
PHOTO_SIZE = (40, 30)  # (width, height) of the fake JPEGs: not square, so the shorter side matters
FLOWERS_CLASSES = 102  # torchvision hard-codes Flowers102's class list, so every class needs images


def class_code(label: int, gray: bool = False) -> tuple[int, int, int]:
    """The RGB colour of class `label`'s fake images (gray sets: 17 * label in every channel)."""
    if gray:
        return (17 * label,) * 3
    return 17 * (label % 16), 17 * (label // 16), 200


def write_fake_dataset(name: str, root: str | Path, per_class: int = 5) -> Path:
    """Write fake `name` under `root` with `per_class` images per class in each split the
    source has (5 leaves enough for the stratified carves of the others); returns `root`."""
    writer = FAKES.get(name)
    if per_class < 2:
        raise ValueError(f"per_class must be at least 2 (a stratified split needs two per class), got {per_class}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writer(root, per_class)
    return root


def _labels(num_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(num_classes), per_class)


def _images(labels: np.ndarray, size: int, gray: bool = False) -> np.ndarray:
    """(N, size, size) uint8 for gray sets, else (N, size, size, 3): flat colours by class."""
    codes = np.array([class_code(int(label), gray) for label in labels], dtype=np.uint8)
    images = np.broadcast_to(codes[:, None, None, :], (len(labels), size, size, 3))
    return np.ascontiguousarray(images[..., 0] if gray else images)


def _jpeg(path: Path, label: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", PHOTO_SIZE, class_code(label)).save(path, quality=95)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _idx(array: np.ndarray) -> bytes:
    """MNIST's idx format: magic (0, 0, 8 = uint8, ndim), big-endian dimensions, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


@FAKES.register("mnist")
def _mnist(root: Path, per_class: int) -> None:
    """MNIST/raw/: the four gzipped idx files and their extracted copies, as torchvision leaves them."""
    for part, count in (("train", per_class), ("t10k", 2)):
        labels = _labels(10, count)
        for kind, array in (("images-idx3", _images(labels, 28, gray=True)), ("labels-idx1", labels)):
            data = _idx(array)
            _write(root / "MNIST" / "raw" / f"{part}-{kind}-ubyte", data)
            _write(root / "MNIST" / "raw" / f"{part}-{kind}-ubyte.gz", gzip.compress(data))


@FAKES.register("usps")
def _usps(root: Path, per_class: int) -> None:
    """usps.bz2 and usps.t.bz2: libsvm text, "digit+1 1:v ... 256:v" with v in [-1, 1]."""
    for filename, count in (("usps.bz2", per_class), ("usps.t.bz2", 2)):
        labels = _labels(10, count)
        # + 0.5: torchvision truncates (v + 1) / 2 * 255 to uint8, so the pixel comes back exactly
        values = (_images(labels, 16, gray=True).reshape(len(labels), -1) + 0.5) / 127.5 - 1
        lines = [f"{label + 1} " + " ".join(f"{i}:{v:.6f}" for i, v in enumerate(row, 1))
                 for label, row in zip(labels, values, strict=True)]
        _write(root / filename, bz2.compress(("\n".join(lines) + "\n").encode()))


@FAKES.register("svhn")
def _svhn(root: Path, per_class: int) -> None:
    """train_32x32.mat and test_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0."""
    for filename, count in (("train_32x32.mat", per_class), ("test_32x32.mat", 2)):
        labels = _labels(10, count)
        scipy.io.savemat(root / filename, {"X": _images(labels, 32).transpose(1, 2, 3, 0),
                                           "y": np.where(labels == 0, 10, labels).astype(np.uint8)[:, None]})


@FAKES.register("cifar10")
def _cifar10(root: Path, per_class: int, num_classes: int = 3) -> None:
    """cifar-10-batches-py/: five pickled training batches, test_batch and batches.meta (the
    class names, so fewer classes than the real ten work)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = _labels(num_classes, per_class)
    batches = {f"data_batch_{i + 1}": chunk for i, chunk in enumerate(np.array_split(train, 5))}
    for filename, labels in {**batches, "test_batch": _labels(num_classes, 2)}.items():
        entry = {"batch_label": filename, "labels": labels.tolist(),
                 "data": _images(labels, 32).transpose(0, 3, 1, 2).reshape(len(labels), -1),
                 "filenames": [f"fake_{filename}_{i}.png" for i in range(len(labels))]}
        (folder / filename).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"label_names": [f"class{c}" for c in range(num_classes)], "num_cases_per_batch": len(train) // 5,
            "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


@FAKES.register("stl10")
def _stl10(root: Path, per_class: int, num_classes: int = 3) -> None:
    """stl10_binary/: {train,test}_X.bin (N, 3, 96, 96) column-major, {train,test}_y.bin 1-based,
    unlabeled_X.bin, class_names.txt (fewer classes than ten) and fold_indices.txt."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    for part, count in (("train", per_class), ("test", 2)):
        labels = _labels(num_classes, count)
        (folder / f"{part}_X.bin").write_bytes(_images(labels, 96).transpose(0, 3, 2, 1).tobytes())
        (folder / f"{part}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(_images(np.zeros(2, int), 96).transpose(0, 3, 2, 1).tobytes())
    (folder / "class_names.txt").write_text("".join(f"class{c}\n" for c in range(num_classes)))
    (folder / "fold_indices.txt").write_text(" ".join(map(str, range(num_classes * per_class))) + "\n")


@FAKES.register("flowers102")
def _flowers102(root: Path, per_class: int) -> None:
    """flowers-102/: jpg/image_00001.jpg ..., imagelabels.mat (labels 1..102) and setid.mat
    (trnid, valid, tstid: 1-based image ids)."""
    folder = root / "flowers-102"
    labels = np.tile(_labels(FLOWERS_CLASSES, per_class), 3)
    for image_id, label in enumerate(labels, 1):
        _jpeg(folder / "jpg" / f"image_{image_id:05d}.jpg", int(label))
    ids = np.arange(1, len(labels) + 1).reshape(3, -1)
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": (labels + 1)[None, :].astype(np.uint8)})
    scipy.io.savemat(folder / "setid.mat", {key: ids[i][None, :].astype(np.uint16)
                                            for i, key in enumerate(("trnid", "valid", "tstid"))})


@FAKES.register("fgvc_aircraft")
def _fgvc_aircraft(root: Path, per_class: int, num_classes: int = 3) -> None:
    """fgvc-aircraft-2013b/data/: variants.txt (one class per line), images_variant_{train,val,test}.txt
    ("image_id Variant Name") and images/<image_id>.jpg."""
    folder = root / "fgvc-aircraft-2013b" / "data"
    variants = [f"Fake {c}-{100 + c}" for c in range(num_classes)]  # real names hold spaces and dashes
    _write(folder / "variants.txt", "".join(f"{v}\n" for v in variants).encode())
    image_id = 1000000
    for split in ("train", "val", "test"):
        lines = []
        for label in _labels(num_classes, per_class):
            image_id += 1
            _jpeg(folder / "images" / f"{image_id}.jpg", int(label))
            lines.append(f"{image_id} {variants[label]}\n")
        (folder / f"images_variant_{split}.txt").write_text("".join(lines))


@FAKES.register("dtd")
def _dtd(root: Path, per_class: int, num_classes: int = 3) -> None:
    """dtd/dtd/: images/<texture>/<texture>_NNNN.jpg and labels/{train,val,test}1.txt (partition 1,
    the one biotune reads; the class list is each split file's sorted textures)."""
    folder = root / "dtd" / "dtd"
    textures = [f"texture{c}" for c in range(num_classes)]
    number = 0
    for split in ("train", "val", "test"):
        lines = []
        for label in _labels(num_classes, per_class):
            number += 1
            name = f"{textures[label]}/{textures[label]}_{number:04d}.jpg"
            _jpeg(folder / "images" / name, int(label))
            lines.append(name + "\n")
        _write(folder / "labels" / f"{split}1.txt", "".join(lines).encode())


@FAKES.register("isic2020")
def _isic2020(root: Path, per_class: int) -> None:
    """isic2020/: train.csv with the columns of ISIC_2020_Training_GroundTruth.csv and the JPEGs
    in train/ (2 classes: benign 0, malignant 1)."""
    folder = root / "isic2020"
    labels = _labels(2, 2 * per_class)  # test and validation are both carved from these
    names = [f"ISIC_{9000000 + i:07d}" for i in range(len(labels))]
    for name, label in zip(names, labels, strict=True):
        _jpeg(folder / "train" / f"{name}.jpg", int(label))
    pd.DataFrame({"image_name": names, "patient_id": [f"IP_{i % 7:07d}" for i in range(len(labels))],
                  "lesion_id": [f"IL_{i:07d}" for i in range(len(labels))], "sex": "female", "age_approx": 45.0,
                  "anatom_site_general_challenge": "torso",
                  "diagnosis": np.where(labels == 1, "melanoma", "nevus"),
                  "benign_malignant": np.where(labels == 1, "malignant", "benign"),
                  "target": labels}).to_csv(folder / "train.csv", index=False)
