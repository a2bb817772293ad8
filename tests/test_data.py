"""biotune.data: sources, stratified carving and subsets, folds, user data, errors, cache.

Offline and CPU only; every load uses a temporary root so no test reads or writes ./data.
"""
import bz2
import gzip
import io
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from biotune.data import (
    DatasetNotFoundError,
    Preprocess,
    list_datasets,
    load_dataset,
    make_folds,
    sources,
)
from biotune.registry import UnknownNameError

HALF = (0.5, 0.5, 0.5)


def pp(size: int, resize: int | None = None, interpolation: str = "bilinear") -> Preprocess:
    return Preprocess(size, resize or size, interpolation, HALF, HALF)


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


def write_images(folder, count: int, colour: int, suffix: str = ".png", size=(12, 10)) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"img{i}{suffix}" for i in range(count)]
    for f in files:
        Image.new("RGB", size, (colour, 255 - colour, 0)).save(f)
    return files


def id_images(n: int) -> np.ndarray:
    """(n, 4, 4) uint8 images whose first two pixels spell their index: tracks samples across splits."""
    images = np.zeros((n, 4, 4), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
    return images


def ids(split) -> set[int]:
    pixels = split.images[:, 0, 0].long()
    return set((pixels[:, 0] * 256 + pixels[:, 1]).tolist())


# ---------------------------------------------------------------------------------------------
# Preprocess and normalize


def test_preprocess_at_size_keeps_the_resize_ratio():
    resnet = Preprocess(224, 232, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    small = resnet.at_size(64)
    assert (small.image_size, small.resize_size) == (64, 66)
    assert small.mean == resnet.mean and small.interpolation == "bilinear"


@pytest.mark.parametrize("args", [(32, 32, "nearest", HALF, HALF), (32, 28, "bilinear", HALF, HALF),
                                  (32, 32, "bilinear", (0.5, 0.5), HALF)])
def test_preprocess_rejects_bad_values(args):
    with pytest.raises(ValueError):
        Preprocess(*args)


def test_to_input_maps_uint8_through_mean_and_std():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ds = load_dataset("synthetic", Preprocess(16, 16, "bilinear", mean, std), cache=False,
                      num_train=8, num_val=8, num_test=8)
    white = ds.to_input(torch.full((2, 3, 16, 16), 255, dtype=torch.uint8))
    black = ds.to_input(torch.zeros((3, 16, 16), dtype=torch.uint8))
    assert white.dtype == torch.float32 and white.shape == (2, 3, 16, 16)
    for c in range(3):
        assert torch.allclose(white[:, c], torch.tensor((1 - mean[c]) / std[c]), atol=1e-5)
        assert torch.allclose(black[c], torch.tensor(-mean[c] / std[c]), atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        ds.to_input(torch.zeros((1, 3, 2, 2)))


# ---------------------------------------------------------------------------------------------
# Built-in sources


@pytest.mark.skipif(not sources.FASHION_MNIST_DEBIAN.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed (`make data`)")
def test_fashion_mnist_from_the_debian_files(tmp_path):
    full = load_dataset("fashion_mnist", root=tmp_path, cache=False)  # native 28 px: under a second
    assert full.summary()["train"] == 48000 and len(full.val) == 12000 and len(full.test) == 10000
    assert full.class_names[:2] == ["T-shirt/top", "Trouser"] and full.num_classes == 10
    assert class_counts(full.val.labels, 10) == [1200] * 10
    assert class_counts(full.test.labels, 10) == [1000] * 10
    assert full.val_source == "carved from train: 20%, stratified, seed 0" and full.test_source == "official"
    images = full.train.images
    assert images.dtype == torch.uint8 and images.shape == (48000, 3, 28, 28)
    assert torch.equal(images[:, 0], images[:, 2])  # gray replicated

    small = load_dataset("fashion_mnist", pp(32, 36, "bicubic"), root=tmp_path, cache=False,
                         max_train=500, max_val=200, max_test=100)
    assert small.train.images.shape == (500, 1, 28, 28)  # stored native (one gray channel), resized per batch
    assert small.to_input(small.train.images[:4]).shape == (4, 3, 32, 32)
    assert class_counts(small.train.labels, 10) == [50] * 10
    assert (len(small.val), len(small.test)) == (200, 100)


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_prefers_idx_files_in_the_root(tmp_path):
    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for part, n, compress in (("train", 50, True), ("t10k", 20, False)):
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, compress)
    ds = load_dataset("fashion_mnist", pp(28), root=tmp_path, cache=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 20)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DEBIAN", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("fashion_mnist", root=tmp_path)
    assert "make data" in str(err.value) and "download=True" in str(err.value)
    assert str(tmp_path / "fashion_mnist") in str(err.value)


def test_mnist5k_carves_test_then_val_stratified(tmp_path):
    ds = load_dataset("mnist5k", root=tmp_path, cache=False)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3200, 800, 1000)
    assert class_counts(ds.test.labels, 10) == [100] * 10
    assert class_counts(ds.val.labels, 10) == [80] * 10
    assert ds.test_source == "carved from train: 20%, stratified, seed 0"
    assert ds.train.images.shape[1:] == (3, 28, 28)


def test_digits_sizes_range_and_stratified_subsets(tmp_path):
    ds = load_dataset("digits", pp(16), root=tmp_path, cache=False, store_at="input")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1150, 288, 359)
    assert ds.train.images.shape == (1150, 3, 16, 16) and ds.train.images.max() == 255
    full = np.bincount(load_dataset("digits", root=tmp_path, cache=False).train.labels.numpy())
    sub = load_dataset("digits", root=tmp_path, cache=False, max_train=100, max_test=50)
    again = load_dataset("digits", root=tmp_path, cache=False, max_train=100, max_test=50)
    assert (len(sub.train), len(sub.test), len(sub.val)) == (100, 50, 288)
    assert np.all(np.abs(np.bincount(sub.train.labels.numpy()) - full * 100 / full.sum()) < 1)
    assert torch.equal(sub.train.images, again.train.images)
    with pytest.raises(ValueError, match="max_train=5 is below the 10 classes"):
        load_dataset("digits", root=tmp_path, cache=False, max_train=5)


def test_synthetic_sizes_and_official_splits(tmp_path):
    ds = load_dataset("synthetic", root=tmp_path, cache=False, num_classes=3, num_train=30,
                      num_val=12, num_test=9, size=20)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (30, 12, 9)
    assert ds.train.images.shape == (30, 3, 20, 20) and ds.num_classes == 3
    assert ds.val_source == ds.test_source == "official"
    assert class_counts(ds.train.labels, 3) == [10, 10, 10]


def test_synthetic_is_learnable_in_one_epoch():
    ds = load_dataset("synthetic", cache=False, num_classes=4, num_train=256, num_test=128)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for batch in torch.randperm(len(ds.train)).split(16):
        loss = nn.functional.cross_entropy(net(ds.to_input(ds.train.images[batch])), ds.train.labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(ds.to_input(ds.test.images)).argmax(1) == ds.test.labels).float().mean()
    assert accuracy > 0.6  # chance is 0.25


def test_isic2020_from_a_local_folder(tmp_path):
    folder = tmp_path / "isic2020"
    (folder / "train").mkdir(parents=True)
    names = [f"ISIC_{i:07d}" for i in range(20)]
    for name in names:
        Image.new("RGB", (40, 30), (200, 100, 50)).save(folder / "train" / f"{name}.jpg")
    pd.DataFrame({"image_name": names, "patient_id": "p", "target": [0] * 15 + [1] * 5}).to_csv(
        folder / "train.csv", index=False)
    ds = load_dataset("isic2020", pp(16, 18), root=tmp_path, cache=False)
    assert ds.class_names == ["benign", "malignant"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (13, 3, 4)
    assert class_counts(ds.test.labels, 2) == [3, 1]
    assert ds.train.images.shape == (13, 3, 16, 16)


def test_torchvision_layouts_already_on_disk_load_offline(tmp_path):
    """Fake USPS and DTD files in torchvision's layouts: the array and the file-list paths."""
    for filename, n in (("usps.bz2", 30), ("usps.t.bz2", 10)):
        rows = [f"{i % 10 + 1} " + " ".join(f"{j + 1}:{(i + j) % 3 - 1}" for j in range(256)) for i in range(n)]
        with bz2.open(tmp_path / filename, "wt") as f:
            f.write("\n".join(rows) + "\n")
    usps = load_dataset("usps", root=tmp_path, cache=False, val_fraction=0.34)
    assert (len(usps.train), len(usps.val), len(usps.test)) == (20, 10, 10)
    assert usps.train.images.shape == (20, 3, 16, 16) and usps.train.images.max() == 255

    dtd = tmp_path / "dtd" / "dtd"
    (dtd / "labels").mkdir(parents=True)
    for split, count in (("train", 3), ("val", 2), ("test", 1)):
        lines = []
        for texture, colour in (("banded", 0), ("dotted", 255)):
            files = write_images(dtd / "images" / texture, count, colour, suffix=f"_{split}.jpg")
            lines += [f"{texture}/{f.name}" for f in files]
        (dtd / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    textures = load_dataset("dtd", pp(8), root=tmp_path, cache=False)
    assert textures.class_names == ["banded", "dotted"] and textures.val_source == "official"
    assert (len(textures.train), len(textures.val), len(textures.test)) == (6, 4, 2)
    assert torch.equal(textures.train.images[:, 0, 4, 4] > 127, textures.train.labels == 1)


@pytest.mark.parametrize("name", ["cifar10", "stl10", "mnist", "usps", "svhn", "flowers102",
                                  "fgvc_aircraft", "dtd", "isic2020"])
def test_datasets_without_local_files_say_how_to_get_them(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match="download=True|README"):
        load_dataset(name, root=tmp_path)


def test_unknown_names_and_options_list_the_choices(tmp_path):
    assert {"fashion_mnist", "synthetic", "npz", "imagefolder", "csv"} <= set(list_datasets())
    with pytest.raises(UnknownNameError, match="choose one of: .*fashion_mnist") as err:
        load_dataset("fashion_mnst", root=tmp_path)
    assert "Did you mean 'fashion_mnist'" in str(err.value)
    with pytest.raises(ValueError, match="its options are: num_classes, num_train"):
        load_dataset("synthetic", root=tmp_path, num_clases=3)
    with pytest.raises(ValueError, match="missing a required argument: 'path'"):
        load_dataset("npz", root=tmp_path)


@pytest.mark.parametrize("name", ["nope.npz", "nope.csv", "./missing_dir", "missing_dir/", "sub/missing"])
def test_a_dataset_path_that_does_not_exist_says_so(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist") as err:
        load_dataset(name, root=tmp_path)
    assert name.strip("./") in str(err.value) and "unknown dataset" not in str(err.value)


def test_a_name_without_a_separator_stays_a_registry_lookup_and_other_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownNameError, match="unknown dataset 'missing_dir'"):
        load_dataset("missing_dir", root=tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt is neither an .npz file, a .csv file nor a folder"):
        load_dataset("notes.txt", root=tmp_path)


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0}, {"val_fraction": 1.0}, {"max_train": 0}])
def test_bad_split_parameters_fail_early(tmp_path, kwargs):
    with pytest.raises(ValueError):
        load_dataset("synthetic", root=tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------
# User data


def medmnist(path, n=(40, 10, 20), shape=(7, 7), labels_2d=True, **extra):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        labels = np.arange(count) % 3
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[:, None] if labels_2d else labels
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_npz_in_the_medmnist_layout(tmp_path):
    gray = load_dataset("npz", pp(8), root=tmp_path, path=medmnist(tmp_path / "blood.npz"), store_at="input")
    assert gray.name == "blood" and gray.class_names == ["0", "1", "2"]
    assert (len(gray.train), len(gray.val), len(gray.test)) == (40, 10, 20)
    assert gray.val_source == "official" and gray.train.images.shape == (40, 3, 8, 8)
    colour = load_dataset(str(medmnist(tmp_path / "derma.npz", shape=(9, 9, 3), labels_2d=False,
                                       class_names=np.array(["a", "b", "c"]))), root=tmp_path)
    assert colour.class_names == ["a", "b", "c"] and colour.train.images.shape == (40, 3, 9, 9)


def test_splits_are_carved_disjointly_from_train_only(tmp_path):
    path = tmp_path / "only_train.npz"
    np.savez(path, train_images=id_images(300), train_labels=np.arange(300) % 3)
    ds = load_dataset(path, root=tmp_path, cache=False)
    parts = [ids(ds.train), ids(ds.val), ids(ds.test)]
    assert [len(p) for p in parts] == [192, 48, 60]
    assert set.union(*parts) == set(range(300)) and sum(map(len, parts)) == 300
    reseeded = load_dataset(path, root=tmp_path, cache=False, seed=1)
    assert ids(reseeded.test) == parts[2] and ids(reseeded.val) != parts[1]  # test never moves


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((3, 4, 4), np.uint8)}, "expected train_images, train_labels"),
    ({"train_images": np.zeros((3, 4, 4), np.uint8), "train_labels": np.zeros(4, int)}, "3 images but 4 labels"),
    ({"train_images": np.zeros((3, 4, 4)), "train_labels": np.zeros(3, int)}, "must be uint8"),
    ({"train_images": np.zeros((3, 3, 4, 4), np.uint8), "train_labels": np.zeros(3, int)}, "channels-last"),
    ({"train_images": np.zeros((3, 4, 4), np.uint8), "train_labels": np.zeros(3, int),
      "val_images": np.zeros((3, 4, 4), np.uint8)}, "expected train_images"),
    ({"train_images": np.zeros((6, 4, 4), np.uint8), "train_labels": np.array([0, 0, 0, 1, 1, 2])},
     "class '2' has a single image"),
])
def test_malformed_npz_says_what_is_expected(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_dataset("npz", root=tmp_path, path=tmp_path / "bad.npz")


def truncated(path):
    np.savez(path, train_images=np.zeros((30, 4, 4), np.uint8), train_labels=np.arange(30) % 3)
    path.write_bytes(path.read_bytes()[:200])


def single_npy(path):
    np.save(path.with_suffix(".npy"), np.zeros(3))
    path.with_suffix(".npy").rename(path)


@pytest.mark.parametrize("write", [
    lambda path: path.write_text("images,labels\n1,2\n"),  # a text file renamed .npz
    truncated,
    lambda path: np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8),
                          train_labels=np.array([[0], [1, 1]], dtype=object)),  # ragged: an object array
    single_npy,
], ids=["text", "truncated", "object_array", "single_npy"])
def test_unreadable_npz_is_not_a_valid_archive_and_pickle_is_not_suggested(tmp_path, write):
    path = tmp_path / "broken.npz"
    write(path)
    with pytest.raises(ValueError) as err:
        load_dataset(path, root=tmp_path, cache=False)
    message = str(err.value)
    assert "broken.npz is not a valid numpy .npz archive of uint8 images and integer labels" in message
    assert "train_images, train_labels" in message and "allow_pickle" not in message


@pytest.mark.parametrize("arrays, message", [
    ({"train_labels": np.arange(30) % 3 * 5},
     "training labels are 0, 5, 10, so 8 of 11 classes have no training images: labels 1, 2, 3, 4, 6, 7, 8, 9"),
    ({"train_labels": np.arange(30) % 2, "test_images": np.zeros((9, 4, 4), np.uint8),
      "test_labels": np.arange(9) % 3}, "1 of 3 classes have no training images: labels 2; they occur in test"),
    ({"train_labels": np.arange(30) % 2, "class_names": np.array(["a", "b", "c"])},
     r"labels 2 \(c\)"),
])
def test_classes_without_training_images_are_refused_not_padded(tmp_path, arrays, message):
    np.savez(tmp_path / "gaps.npz", train_images=np.zeros((30, 4, 4), np.uint8), **arrays)
    with pytest.raises(ValueError, match=message) as err:
        load_dataset(tmp_path / "gaps.npz", root=tmp_path, cache=False)
    assert "gaps.npz" in str(err.value) and "remap" in str(err.value)


def test_imagefolder_flat_and_with_split_folders(tmp_path):
    for name, colour in (("cat", 0), ("dog", 255)):
        write_images(tmp_path / "flat" / name, 10, colour)
    (tmp_path / "flat" / "cat" / ".DS_Store").write_text("ignored")
    flat = load_dataset(tmp_path / "flat", pp(8), root=tmp_path)  # a directory as the name
    assert flat.class_names == ["cat", "dog"] and (len(flat.train), len(flat.val), len(flat.test)) == (13, 3, 4)
    assert flat.train.images.shape == (13, 3, 8, 8)
    # pixel colour follows the class: labels and images stay paired through the splits
    assert torch.equal(flat.train.images[:, 0, 4, 4] > 127, flat.train.labels == 1)

    for split, count in (("train", 6), ("val", 2), ("test", 3)):
        for name, colour in (("cat", 0), ("dog", 255)):
            write_images(tmp_path / "split" / split / name, count, colour, suffix=".jpg")
    split = load_dataset("imagefolder", pp(8), root=tmp_path, path=tmp_path / "split")
    assert (len(split.train), len(split.val), len(split.test)) == (12, 4, 6)
    assert split.val_source == split.test_source == "official"


def png_bytes(size: int = 32) -> bytes:
    """A noisy PNG (noise does not compress, so a cut lands in the pixel data, past the header)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def with_dog(extra: str, content: bytes):
    def build(root):
        write_images(root / "dog", 10, 255)
        (root / "dog" / extra).write_bytes(content)
    return build


@pytest.mark.parametrize("build, message", [
    (lambda root: None, "at least 2 classes"),
    (lambda root: (root / "dog").mkdir(), "has no images"),
    (with_dog("notes.txt", b"x"), "not images"),
    (with_dog("broken.png", b"not a png"), "cannot read image .*broken.png"),
    (with_dog("cut.png", png_bytes()[:1500]), "cannot read image .*cut.png"),
])
def test_malformed_imagefolder_says_how_to_fix_it(tmp_path, build, message):
    write_images(tmp_path / "tree" / "cat", 10, 0)
    build(tmp_path / "tree")
    with pytest.raises(ValueError, match=message):
        load_dataset("imagefolder", pp(8), root=tmp_path, path=tmp_path / "tree", cache=False)


def test_an_unreadable_first_image_names_the_file_also_without_a_preprocess(tmp_path):
    for name, colour in (("cat", 0), ("dog", 255)):
        write_images(tmp_path / "tree" / name, 5, colour)
    (tmp_path / "tree" / "cat" / "img0.png").write_bytes(b"not a png")  # sizes the native preprocess
    with pytest.raises(ValueError, match="cannot read image .*img0.png"):
        load_dataset(tmp_path / "tree", root=tmp_path, cache=False)


def test_files_outside_the_class_folders_are_reported(tmp_path, caplog):
    for name, colour in (("cat", 0), ("dog", 255)):
        write_images(tmp_path / "tree" / name, 5, colour)
    write_images(tmp_path / "tree", 1, 0)
    with caplog.at_level(logging.WARNING, logger="biotune.data"):
        load_dataset(tmp_path / "tree", pp(8), root=tmp_path, cache=False)
    assert "1 files outside the class folders are ignored (img0.png)" in caplog.text


def test_csv_with_relative_paths_and_a_split_column(tmp_path):
    rows = []
    for label, colour in (("benign", 0), ("malignant", 255)):
        for i, file in enumerate(write_images(tmp_path / "images" / label, 8, colour)):
            rows.append({"path": f"images/{label}/{file.name}", "label": label,
                         "split": "test" if i < 2 else "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    ds = load_dataset(tmp_path / "labels.csv", pp(8), root=tmp_path / "elsewhere")
    assert ds.class_names == ["benign", "malignant"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (10, 2, 4)
    assert torch.equal(ds.test.images[:, 0, 4, 4] > 127, ds.test.labels == 1)


@pytest.mark.parametrize("table, message", [
    ({"file": ["a.png"], "label": [0]}, "expected path,label"),
    ({"path": ["missing.png", "x.png"], "label": [0, 1]}, "do not exist"),
    ({"path": ["a.png", "a.png"], "label": [0, 1], "split": ["train", "valid"]}, "must hold train, val or test"),
    ({"path": ["a.png"] * 3, "label": ["x", "x", "y"], "split": ["train", "train", "test"]},
     r"1 of 2 classes have no training images: labels 1 \(y\); they occur in test"),
])
def test_malformed_csv_says_what_is_expected(tmp_path, table, message):
    write_images(tmp_path, 1, 0)  # img0.png
    (tmp_path / "img0.png").rename(tmp_path / "a.png")
    pd.DataFrame(table).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=message):
        load_dataset("csv", root=tmp_path, path=tmp_path / "bad.csv")


@pytest.mark.parametrize("content, message", [
    (b"", "is not a readable CSV table"),
    (png_bytes(), "is not a readable CSV table"),
    (b"path,label,split\n", "has no rows"),
], ids=["empty", "binary", "header_only"])
def test_unreadable_csv_names_the_file_and_the_expected_columns(tmp_path, content, message):
    (tmp_path / "bad.csv").write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        load_dataset(tmp_path / "bad.csv", root=tmp_path)
    assert "bad.csv" in str(err.value) and "expected path,label" in str(err.value)


def test_csv_numeric_labels_are_class_names(tmp_path, caplog):
    files = write_images(tmp_path / "images", 30, 0)
    pd.DataFrame({"path": files, "label": [0, 5, 10] * 10}).to_csv(tmp_path / "labels.csv", index=False)
    with caplog.at_level(logging.INFO, logger="biotune.data"):
        ds = load_dataset(tmp_path / "labels.csv", pp(8), root=tmp_path, cache=False)
    assert ds.class_names == ["0", "5", "10"] and ds.num_classes == 3
    assert "0, 5, 10 become class indices 0 .. 2" in caplog.text


# ---------------------------------------------------------------------------------------------
# Cache


def test_second_load_reads_the_cache(tmp_path, caplog):
    options = {"root": tmp_path, "num_train": 40, "num_val": 20, "num_test": 20}
    first = load_dataset("synthetic", pp(12), **options)
    folders = list((tmp_path / "cache").glob("synthetic-*"))
    assert len(folders) == 1 and not list((tmp_path / "cache").glob("*.tmp"))
    assert first.train.cache_file == folders[0] / "train"  # the first load maps the cache too
    with caplog.at_level(logging.INFO, logger="biotune.data"):
        second = load_dataset("synthetic", pp(12), **options)
    assert "reading the cached tensors" in caplog.text
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(first, split).images, getattr(second, split).images)
        assert torch.equal(getattr(first, split).labels, getattr(second, split).labels)
    assert second.summary() == first.summary()
    load_dataset("synthetic", pp(10), **options)  # another preprocess, another file
    assert len(list((tmp_path / "cache").glob("synthetic-*"))) == 2


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"garbage", lambda data: b""],
                         ids=["truncated", "garbage", "empty"])
def test_a_corrupt_cache_file_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    options = {"root": tmp_path, "num_train": 8, "num_val": 8, "num_test": 8}
    load_dataset("synthetic", pp(8), **options)  # writes the cache; its mapping is dropped before the damage
    fresh = load_dataset("synthetic", pp(8), **options, cache=False)
    (folder,) = (tmp_path / "cache").glob("synthetic-*")
    file = folder / "val_images.npy"
    file.write_bytes(damage(file.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="biotune.data"):
        rebuilt = load_dataset("synthetic", pp(8), **options)
    assert f"the cache {folder} is unreadable" in caplog.text
    caplog.clear()
    again = load_dataset("synthetic", pp(8), **options)  # the rebuilt file reads back
    assert "unreadable" not in caplog.text and not list((tmp_path / "cache").glob("*.tmp"))
    for loaded in (rebuilt, again):
        assert loaded.summary() == fresh.summary()
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(loaded, split).images, getattr(fresh, split).images)
            assert torch.equal(getattr(loaded, split).labels, getattr(fresh, split).labels)


def test_a_cache_that_cannot_be_written_costs_a_warning(tmp_path, caplog):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="biotune.data"):
        ds = load_dataset("synthetic", pp(8), root=tmp_path, num_train=8, num_val=8, num_test=8)
    assert len(ds.train) == 8 and "could not write the cache" in caplog.text


def test_cache_follows_changes_to_a_user_file(tmp_path):
    path = medmnist(tmp_path / "mine.npz")
    before = load_dataset(path, root=tmp_path)
    medmnist(path, n=(30, 10, 20))
    after = load_dataset(path, root=tmp_path)
    assert (len(before.train), len(after.train)) == (40, 30)


# ---------------------------------------------------------------------------------------------
# Folds


def check_folds(train_labels, val_labels, train_split):
    folds = make_folds(torch.as_tensor(train_labels), torch.as_tensor(val_labels), train_split, seed=3)
    n_folds = math.ceil(1 / train_split - 1e-9)
    assert len(folds) == n_folds
    for labels, part in ((np.asarray(train_labels), "train_idx"), (np.asarray(val_labels), "val_idx")):
        chunks = [getattr(fold, part).numpy() for fold in folds]
        everything = np.concatenate(chunks)
        assert sorted(everything) == list(range(len(labels)))  # disjoint and covering
        ideal = np.bincount(labels) / n_folds
        for chunk in chunks:
            assert np.all(np.abs(np.bincount(labels[chunk], minlength=len(ideal)) - ideal) < 1)
    return folds


@pytest.mark.parametrize("train_split, n_folds", [(1, 1), (0.5, 2), (1 / 3, 3), (0.3, 4), (0.25, 4), (0.1, 10)])
def test_folds_are_stratified_disjoint_and_covering(train_split, n_folds):
    folds = check_folds(np.arange(200) % 4, np.arange(60) % 4, train_split)
    assert len(folds) == n_folds


def test_folds_handle_imbalanced_and_tiny_classes():
    imbalanced = np.array([0] * 95 + [1] * 5 + [2])
    folds = check_folds(imbalanced, imbalanced[::-1].copy(), 1 / 3)
    assert sum(2 in imbalanced[f.train_idx.numpy()] for f in folds) == 1
    check_folds(np.repeat(np.arange(10), 2), np.arange(10), 1 / 3)  # every class smaller than n_folds


def test_fold_one_is_everything_and_bad_splits_fail():
    (only,) = make_folds(torch.arange(10) % 2, torch.arange(4) % 2, 1.0)
    assert only.train_idx.tolist() == list(range(10)) and only.val_idx.tolist() == list(range(4))
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="train_split"):
            make_folds(torch.arange(10) % 2, torch.arange(4) % 2, bad)
    with pytest.raises(ValueError, match="fewer than the 5 folds"):
        make_folds(torch.arange(10) % 2, torch.arange(4) % 2, 0.2)


def test_small_images_are_upsampled_to_the_input_without_cropping(tmp_path):
    frame = np.zeros((12, 8, 8), dtype=np.uint8)
    frame[:, 0, :] = frame[:, -1, :] = frame[:, :, 0] = frame[:, :, -1] = 255  # a bright border
    labels = np.arange(12) % 3
    path = tmp_path / "framed.npz"
    np.savez(path, **{f"{s}_images": frame for s in ("train", "val", "test")},
             **{f"{s}_labels": labels for s in ("train", "val", "test")})
    dataset = load_dataset("npz", pp(32, resize=64), root=tmp_path, path=path, store_at="input")
    image = dataset.train.images[0, 0].float()
    # a centre crop after resizing to 64 would cut the border away; the whole frame must survive
    assert image[0].mean() > 100 and image[-1].mean() > 100 and image[:, 0].mean() > 100
    assert image[12:20, 12:20].max() < 50
