"""The cache of loaded datasets: a folder per key under <root>/cache with one .npy file per array,
mapped copy-on-write, so every process on the machine shares one copy. A damaged cache or one of
another version is rebuilt, never trusted."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .dataset import SPLITS, ImageDataset, map_split
from .preprocess import Preprocess

log = logging.getLogger(__name__)
_CACHE_VERSION = 3  # 1: one torch.save file at the model input; 2: resized with the CPU's uint8 kernel


def cache_key(source: str, options: dict, preprocess: Preprocess | None, val_fraction: float,
              seed: int, limits: dict, store_at: str) -> str:
    """Hash of everything that shapes the tensors; a user file also by its modification time. The
    hash names the folder on disk: a change to these keys or to _CACHE_VERSION rebuilds every cache."""
    options = dict(options)
    if "path" in options:
        path = Path(options["path"]).expanduser().resolve()
        options["path"] = str(path)
        options["mtime_ns"] = path.stat().st_mtime_ns if path.exists() else None
    state = {"version": _CACHE_VERSION, "source": source, "options": options,
             "preprocess": asdict(preprocess) if preprocess else None,
             "val_fraction": val_fraction, "seed": seed, "limits": limits, "store_at": store_at}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_cache(dataset: ImageDataset, folder: Path) -> bool:
    """One .npy file per array and meta.json, written to a temporary folder renamed into place, so
    an interrupted write never leaves a half cache and rows loading at once keep one copy. The
    cache only saves time: a read-only or full disk costs a warning, not the data just loaded."""
    meta = {"version": _CACHE_VERSION, "name": dataset.name, "class_names": dataset.class_names,
            "preprocess": asdict(dataset.preprocess), "val_source": dataset.val_source,
            "test_source": dataset.test_source}
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.", suffix=".tmp"))
        for split in SPLITS:
            for kind in ("images", "labels"):
                np.save(tmp / f"{split}_{kind}.npy", getattr(getattr(dataset, split), kind).numpy())
        (tmp / "meta.json").write_text(json.dumps(meta))
        os.replace(tmp, folder)
    except OSError as err:
        if folder.is_dir() and (folder / "meta.json").is_file():  # another process wrote it first
            return True
        log.warning("could not write the cache %s (%s); the next load decodes the data again", folder, err)
        return False
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached %s in %s", dataset.name, folder)
    return True


def read_cache(folder: Path) -> ImageDataset | None:
    """The cached dataset, mapped, or None (and a warning) when a file is truncated, corrupt or of
    another version: the caller then rebuilds it from the source and overwrites it."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.pop("version") != _CACHE_VERSION:
            raise ValueError("another cache version")
        splits = {split: map_split(folder / split) for split in SPLITS}
        stored = meta.pop("preprocess")  # JSON made its tuples lists
        preprocess = Preprocess(**{**stored, "mean": tuple(stored["mean"]), "std": tuple(stored["std"])})
        return ImageDataset(**meta, **splits, preprocess=preprocess)
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways; all mean "rebuild"
        log.warning("the cache %s is unreadable (%s); rebuilding it from the source", folder, type(err).__name__)
        return None
