"""The paper's nine datasets as fakes in their exact on-disk formats (biotune/fakes.py), read by
the real loaders: what a GPU box's fetched data root holds, proven without a download."""
import numpy as np
import pytest
import torchvision.datasets as tvd

from biotune import cli, staging
from biotune.data import DatasetNotFoundError, load_dataset
from biotune.fakes import FAKES, class_code, write_fake_dataset

GRAY = {"mnist", "usps"}
# classes, train / val / test after the loader's carves, with 5 images per class and split
EXPECTED = {
    "cifar10": (3, 12, 3, 6), "stl10": (3, 12, 3, 6), "svhn": (10, 40, 10, 20), "usps": (10, 40, 10, 20),
    "mnist": (10, 40, 10, 20), "flowers102": (102, 510, 510, 510), "fgvc_aircraft": (3, 15, 15, 15),
    "dtd": (3, 15, 15, 15), "isic2020": (2, 13, 3, 4),
}
# a file each loader needs, relative to the root
FILES = {
    "cifar10": "cifar-10-batches-py/data_batch_1", "stl10": "stl10_binary/train_X.bin", "svhn": "train_32x32.mat",
    "usps": "usps.bz2", "mnist": "MNIST/raw/train-images-idx3-ubyte", "flowers102": "flowers-102/setid.mat",
    "fgvc_aircraft": "fgvc-aircraft-2013b/data/images_variant_train.txt", "dtd": "dtd/dtd/labels/train1.txt",
    "isic2020": "isic2020/train.csv",
}


def test_there_is_a_fake_for_each_of_the_paper_datasets():
    assert set(FAKES.names()) == set(EXPECTED) == set(staging.FILES) - {"fashion_mnist"} | set(staging.MANUAL)


def decoded_labels(images, gray: bool) -> np.ndarray:
    """The class each flat fake image encodes (fakes.class_code), from its mean colour."""
    mean = images.float().mean(dim=(2, 3)).numpy() / 17
    return np.rint(mean[:, 0]).astype(int) + (0 if gray else 16 * np.rint(mean[:, 1]).astype(int))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_loader_reads_its_fake_through_the_real_code_path(tmp_path, name):
    write_fake_dataset(name, tmp_path)
    dataset = load_dataset(name, root=tmp_path, verify=False, cache=False)  # download stays off
    classes, *sizes = EXPECTED[name]
    assert dataset.num_classes == classes
    assert [len(dataset.train), len(dataset.val), len(dataset.test)] == sizes
    for split in (dataset.train, dataset.val, dataset.test):  # every image still carries its own label
        np.testing.assert_array_equal(decoded_labels(split.images, name in GRAY), split.labels.numpy())
        assert set(split.labels.tolist()) == set(range(classes))


def test_class_names_come_from_the_files_or_torchvision(tmp_path):
    for name in ("flowers102", "fgvc_aircraft", "cifar10", "dtd"):
        write_fake_dataset(name, tmp_path)
    names = {name: load_dataset(name, root=tmp_path, verify=False, cache=False).class_names
             for name in ("flowers102", "fgvc_aircraft", "cifar10", "dtd")}
    assert names["flowers102"] == tvd.Flowers102.classes  # hard-coded by torchvision
    assert names["fgvc_aircraft"] == ["Fake 0-100", "Fake 1-101", "Fake 2-102"]  # spaces in variant names
    assert names["cifar10"] == ["class0", "class1", "class2"]  # batches.meta
    assert names["dtd"] == ["texture0", "texture1", "texture2"]
    assert class_code(5, gray=True) == (85, 85, 85)


def test_torchvision_checksums_refuse_the_fakes_unless_verify_is_off(tmp_path):
    write_fake_dataset("cifar10", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="CIFAR10 not found under .*corrupted"):
        load_dataset("cifar10", root=tmp_path, cache=False)
    assert len(load_dataset("cifar10", root=tmp_path, verify=False, cache=False).train) == 12


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_missing_file_gives_the_checks_message_not_a_traceback(tmp_path, name):
    write_fake_dataset(name, tmp_path)
    (tmp_path / FILES[name]).unlink()
    if name == "mnist":  # its gzipped copy would stand in
        (tmp_path / f"{FILES[name]}.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, root=tmp_path, verify=False, cache=False)
    fetch = f"biotune data fetch {name} --root {tmp_path}"
    assert (fetch in str(error.value)) == (name != "isic2020")  # isic2020 is placed by hand: no fetch to offer
    [status] = staging.check([staging.Need("dataset", name, tmp_path, verify=False)])
    assert not status.present and status.problem == str(error.value)


def test_a_truncated_isic_table_names_its_rows(tmp_path):
    write_fake_dataset("isic2020", tmp_path)
    table = tmp_path / FILES["isic2020"]
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:-1] + [lines[-1].split(",")[0] + ","]) + "\n")  # the last target cut off
    with pytest.raises(ValueError, match="target column must be 0 .* or 1 .* but 1 rows hold something else"):
        load_dataset("isic2020", root=tmp_path, cache=False)


@pytest.mark.parametrize("name", sorted(set(EXPECTED) - {"isic2020"}))  # its CSV is read by biotune's own checks
def test_a_truncated_file_gives_the_checks_message_not_a_traceback(tmp_path, name):
    write_fake_dataset(name, tmp_path)
    path = tmp_path / (FILES[name] + (".gz" if name == "mnist" else ""))  # mnist: the copy read first
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2 + 3])
    with pytest.raises(ValueError if name == "dtd" else DatasetNotFoundError) as error:
        load_dataset(name, root=tmp_path, verify=False, cache=False)
    if name != "dtd":  # its shorter split file parses, but lacks a class: the label check says so
        assert "a file is damaged or incomplete" in str(error.value)
        assert f"biotune data fetch {name} --root {tmp_path}" in str(error.value)
    [status] = staging.check([staging.Need("dataset", name, tmp_path, verify=False)])
    assert not status.present and status.problem == str(error.value)


def test_a_missing_image_is_found_by_the_check_before_any_decoding(tmp_path):
    write_fake_dataset("flowers102", tmp_path)
    (tmp_path / "flowers-102" / "jpg" / "image_00007.jpg").unlink()
    [status] = staging.check([staging.Need("dataset", "flowers102", tmp_path, verify=False)])
    assert not status.present and "1 image files do not exist" in status.problem and "image_00007" in status.problem


def test_data_check_says_the_fakes_are_present(tmp_path, capsys):
    for name in EXPECTED:
        write_fake_dataset(name, tmp_path)
    assert cli.main(["data", "check", *EXPECTED, "--root", str(tmp_path), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert out.count(" present ") == len(EXPECTED) and "missing" not in out
    assert f"{tmp_path}/cifar-10-batches-py" in out and "KB" in out  # where, and its size
