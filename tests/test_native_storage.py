"""Images stored at their native size and resized per batch: same pixels, native memory, shared
cache files, and sizes that cannot fit refused before anything is allocated."""
import pickle

import numpy as np
import pytest
import torch

from biotune import config as cfg
from biotune.data import Preprocess, load_dataset, resize_to_input
from biotune.experiment import load_data
from biotune.models import model_preprocess

HALF = (0.5, 0.5, 0.5)


def npz(path, n: int = 60, shape=(12, 10)) -> str:
    """Random uint8 images with three classes in the MedMNIST layout (train only: val/test carved)."""
    rng = np.random.default_rng(0)
    np.savez(path, train_images=rng.integers(0, 256, (n, *shape), dtype=np.uint8), train_labels=np.arange(n) % 3)
    return str(path)


@pytest.mark.parametrize("shape", [(12, 10), (9, 9, 3)], ids=["gray non-square", "colour"])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_per_batch_resize_gives_the_pixels_of_the_resize_at_load(tmp_path, shape, interpolation):
    path, preprocess = npz(tmp_path / "small.npz", shape=shape), Preprocess(32, 36, interpolation, HALF, HALF)
    native = load_dataset(path, preprocess, root=tmp_path, store_at="native")
    at_input = load_dataset(path, preprocess, root=tmp_path, store_at="input")
    assert native.train.images.shape[1:] == (shape[2] if len(shape) == 3 else 1, *shape[:2])  # gray: one channel
    assert at_input.train.images.shape[1:] == (3, 32, 32)
    for split in ("train", "val", "test"):
        stored_small, stored_large = getattr(native, split).images, getattr(at_input, split).images
        assert torch.equal(resize_to_input(stored_small, preprocess).expand_as(stored_large), stored_large)
        batch = torch.arange(0, len(stored_small), 2)  # a batch, not the whole split: per-image results
        assert torch.equal(native.to_input(stored_small[batch]), at_input.to_input(stored_large[batch]))


def test_a_32px_dataset_at_the_paper_preset_holds_its_native_bytes(tmp_path):
    """20,000 32-px colour images for ResNet-50 (224 px): the stored bytes are the native images'
    (within 10%), about 61 MB, where storing at the input would take 3 GB."""
    rng = np.random.default_rng(0)
    path = tmp_path / "cifar_like.npz"
    np.savez(path, train_images=rng.integers(0, 256, (20000, 32, 32, 3), dtype=np.uint8),
             train_labels=np.arange(20000) % 10)
    config = cfg.resolve("paper", overrides={"data.dataset": str(path), "model.name": "resnet50",
                                             "data.root": str(tmp_path)})
    dataset = load_data(config)
    native = 20000 * 32 * 32 * 3
    held = sum(getattr(dataset, s).images.nbytes for s in ("train", "val", "test"))
    assert dataset.preprocess.image_size == 224 and held == pytest.approx(native, rel=0.1)
    assert dataset.to_input(dataset.train.images[:2]).shape == (2, 3, 224, 224)
    assert sum(row["at_input_bytes"] for row in dataset.describe()) > 40 * held


def test_a_process_loading_it_grows_by_the_native_size_not_the_input_size():
    """Measured on a real process (scripts/load_memory.py): loading, and reading back from the
    cache, 20,000 32-px images for a 224-px model adds under 200 MB resident and under 400 MB at
    the peak (at the input size it would be 3 GB)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "load_memory.py"
    spec = importlib.util.spec_from_file_location("load_memory", script)
    load_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_memory)
    native = load_memory.measure(20000, ["native"])["native"]
    assert native["resident_mb"] < 200 and native["peak_mb"] < 400, native


def test_a_cached_split_pickles_as_its_path_and_maps_the_same_file(tmp_path):
    dataset = load_dataset(npz(tmp_path / "small.npz", n=300), Preprocess(32, 32, "bilinear", HALF, HALF),
                           root=tmp_path)
    payload = pickle.dumps(dataset)
    assert len(payload) < 10_000 < dataset.train.images.nbytes
    copy = pickle.loads(payload)
    assert copy.train.cache_file == dataset.train.cache_file
    assert torch.equal(copy.train.images, dataset.train.images) and torch.equal(copy.test.labels, dataset.test.labels)
    uncached = load_dataset(npz(tmp_path / "other.npz"), Preprocess(32, 32, "bilinear", HALF, HALF), cache=False)
    assert uncached.train.cache_file is None and torch.equal(pickle.loads(pickle.dumps(uncached)).train.images,
                                                             uncached.train.images)


def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path):
    path = npz(tmp_path / "small.npz", n=60)
    config = cfg.resolve("paper", overrides={"data.dataset": path, "data.root": str(tmp_path),
                                             "data.image_size": 100000})
    with pytest.raises(ValueError, match=r"one batch of 96 images at 100000 px takes .* GiB.*lower data.image_size"):
        load_data(config)
    huge = Preprocess(200000, 200000, "bilinear", HALF, HALF)
    with pytest.raises(ValueError, match=r"would take .* GiB as uint8.*more than the .* GiB this machine has"):
        load_dataset(path, huge, root=tmp_path, store_at="input")


def test_the_resize_is_float32_rounded_on_every_device():
    """The CPU's uint8 kernel is not used: its bicubic differs from the float one (which a GPU
    runs) by up to 24 levels; float32 then rounding is what every device computes."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    preprocess = Preprocess(48, 48, "bicubic", HALF, HALF)
    expected = TF.resize(images.float(), [48], antialias=True, interpolation=InterpolationMode.BICUBIC)
    assert torch.equal(resize_to_input(images, preprocess), expected.round().clamp(0, 255).to(torch.uint8))


def test_model_preprocess_sizes_are_the_paper_inputs():
    assert model_preprocess("resnet50").image_size == 224 and model_preprocess("inception_v3").image_size == 299


def test_a_search_on_native_images_equals_one_on_images_resized_at_load(tmp_path):
    """End to end: the smoke search with its 16-px images upsampled to 24 px per batch scores
    every genome exactly as with the images resized once at load."""
    import biotune

    fitness = {}
    for store_at in ("native", "input"):
        result = biotune.search(preset="smoke", store=tmp_path / f"{store_at}.sqlite", progress=False,
                                overrides={"data.root": str(tmp_path / "data"), "results_dir": str(tmp_path / "results"),
                                           "data.image_size": 24, "data.store_at": store_at})
        fitness[store_at] = result.evaluations[["seq", "fitness", "val_loss"]].to_dict("records")
    assert fitness["native"] == fitness["input"] and len(fitness["native"]) >= 3


def test_an_evaluations_seeds_share_one_upload_of_the_fold(tmp_path, smoke_config, smoke_inputs, monkeypatch):
    """The fold's images are prepared (on a GPU: uploaded) once for every run of this process on
    that fold, not once per seed and evaluation."""
    from biotune import fitness, prefix_cache
    from biotune.data import make_folds
    from biotune.store import RunStore

    prepared, real_image_part = [], prefix_cache.image_part
    monkeypatch.setattr(prefix_cache, "image_part", lambda *args: prepared.append(args[1]) or real_image_part(*args))
    model, dataset = smoke_inputs
    config = cfg.from_dict({**smoke_config.to_dict(), "train": {**smoke_config.to_dict()["train"], "seeds": [0, 1]}})
    folds = make_folds(dataset.train.labels, dataset.val.labels, 0.5, seed=0)
    with RunStore(tmp_path / "upload.sqlite") as store:
        store.create_run("upload", kind="search", method="biotune", config=config.to_dict(), meta={})
        evaluator = fitness.Evaluator(model=model, dataset=dataset, folds=folds, config=config, store=store,
                                      run_id="upload", progress=False)
        genes = [[0.9] * len(model.blocks) + [0.1], [0.8] * len(model.blocks) + [0.1]]  # every block trained
        evaluator.evaluate_many([{"genes": g, "fold": 0, "generation": 0, "individual": i, "role": "initial"}
                                 for i, g in enumerate(genes)])
        assert store.evaluations("upload")["train_runs"].tolist() == [2, 2]
    assert prepared == ["train", "val"]  # four runs, one preparation of fold 0
