"""Run bookkeeping: run ids and folders, the metadata stored with every run, and the rules of a
stored run taken up again (a resumed search, ``biotune final``): its config is kept exactly,
only the executor's settings may change."""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import secrets
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from . import config as cfg
from .gpus import places, training_device
from .store import RESULTS_VERSION, RunStore

log = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "timm", "deap", "numpy", "scikit-learn", "pandas", "optuna", "peft",
            "biotune")


def new_run_id(method: str, dataset: str) -> str:
    """Time, method, dataset and a random tag; a dataset given as a path contributes its stem, so
    the run folder stays one level under results/."""
    name = Path(dataset).stem if any(sep in dataset for sep in "/\\.") else dataset
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", name) or "data"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{method}-{name}-{secrets.token_hex(2)}"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


CODE = ("biotune", "notebooks", "pyproject.toml", "constraints.txt")  # what computes a result (not docs or tests)


def code_version() -> tuple[str | None, bool | None]:
    """The commit, and whether the code (``CODE``, not docs or results) has uncommitted changes;
    None where git cannot tell."""
    status = _git("status", "--porcelain", "--", *(f":/{path}" for path in CODE))  # paths from the top
    return _git("rev-parse", "HEAD"), None if status is None else bool(status)


def machine() -> str:
    """The CPU model and cores, torch's threads and the GPU, in words."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = names[0].strip() if names else cpu
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{os.cpu_count()}-core {cpu}, {torch.get_num_threads()} torch threads{gpu}"


def provenance(command: str, seconds: float | None = None, **extra) -> dict:
    """How a published results file was made: the command, the commit (and whether the code had
    uncommitted changes), the date and the machine (biotune/tables.py stamps its tables with it)."""
    commit, dirty = code_version()
    return {"command": command, "commit": commit, "dirty": dirty,
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": machine(), "seconds": seconds, **extra}


def run_metadata(config: cfg.Config) -> dict:
    """Git commit and dirty flag, package versions, device: stored with every run. With Ray the
    runs train on the workers' devices, which each per-seed record names (its ``worker``)."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    if config.executor.kind == "ray":
        device, device_label = config.train.device, "the Ray workers' (see each run's worker)"
    else:
        device = training_device(config.executor, config.train)
        if device.type == "cuda":  # the GPUs the runs are placed on, not the driver's current one
            import torch

            gpus = list(dict.fromkeys(slot.gpu for slot in places(config.executor, config.train)))
            device_label = f"{torch.cuda.get_device_name(device)}; GPU {', '.join(gpus)} (CUDA_VISIBLE_DEVICES ids)"
        else:
            device_label = platform.processor() or platform.machine()
    commit, dirty = code_version()
    return {
        "results_version": RESULTS_VERSION,  # a run of another version is not reused (store.py)
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_label,
        "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run_dir(config: cfg.Config, run_id: str) -> Path:
    return make_folder(Path(config.results_dir) / run_id, "the run's folder", "--results-dir DIR")


def make_folder(path: Path, what: str, flag: str) -> Path:
    """``path``, created if need be; a folder that cannot be made is one line naming it and the fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise cfg.ConfigError(f"cannot create {path}, {what} ({error.strerror}); pass {flag} with a folder "
                              "you can write to") from None
    return path


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=str))


def start_run(config: cfg.Config, store: RunStore, *, kind: str, method: str, run_id: str | None = None,
               **meta_extra) -> tuple[str, Path]:
    run_id = run_id or new_run_id(method, config.data.dataset)
    meta = run_metadata(config) | meta_extra
    store.create_run(run_id, kind=kind, method=method, config=config.to_dict(), meta=meta)
    folder = run_dir(config, run_id)
    write_json(folder / "config.json", config.to_dict())
    write_json(folder / "meta.json", meta)
    return run_id, folder


# ---------------------------------------------------------------------------------------------
# A stored run taken up again


def resumed_config(run_id: str, store: str | Path | None) -> tuple[cfg.Config, RunStore]:
    store_obj = RunStore(store)
    run = store_obj.run(run_id)
    if run["kind"] != "search":
        raise ValueError(f"run {run_id} is a {run['kind']} run; only searches can be resumed")
    if run["status"] == "finished":
        log.info("run %s already finished; its outputs are rewritten from the store", run_id)
    return cfg.from_dict(run["config"]), store_obj


def split_executor_settings(overrides: list[str] | dict | None) -> tuple[dict, dict]:
    """The executor's settings (``executor.*``; the old ``run.*`` with a deprecation warning) apart
    from the other overrides: a stored run's config may change them (they do not change results),
    nothing else."""
    nested = cfg.renamed(cfg.parse_overrides(overrides or []), "override")
    settings = nested.pop("executor", {})
    if not isinstance(settings, dict):
        raise cfg.ConfigError(f"executor must be a mapping of keys, got {settings!r}")
    return settings, nested


def with_executor_settings(config: cfg.Config, settings: dict) -> cfg.Config:
    """``config`` with other executor settings; another executor drops the stored settings it
    cannot use (serial: the workers; serial and process: the GPU share)."""
    if settings.get("kind") == "serial":
        settings = {"workers": 1, **settings}
    if settings.get("kind") in ("serial", "process"):
        settings = {"gpus_per_run": 0.0, **settings}
    return cfg.validate(cfg.merge(config, {"executor": settings}, "override")) if settings else config


FLAGS = {"dataset": "--dataset", "model": "--model", "preset": "--preset", "config_file": "--config",
         "results_dir": "--results-dir", "store": "--store"}


def refuse_changes_on_resume(command: str, stored: cfg.Config, overrides: dict, **given) -> None:
    """A stored run (``--resume RUN``, ``final RUN``) goes on with its stored config exactly;
    anything else given would be ignored, so it is refused, named as it was typed. Its own
    results folder given again is no change; another one is refused with the stored one named."""
    overrides = dict(overrides)
    folder = overrides.pop("results_dir", None)
    if folder is not None and Path(folder).resolve() != Path(stored.results_dir).resolve():
        raise cfg.ConfigError(
            f"{command}: --results-dir {folder} is not the folder this run writes to ({stored.results_dir}, "
            f"where its checkpoint and outputs are); repeat --results-dir {stored.results_dir}, or leave the flag out")
    typed = [f"{FLAGS[name]} {value}" for name, value in given.items() if value not in (None, [], {})]
    typed += [f"{FLAGS.get(key, '--' + key)} {value}" for key, value in cfg.flat_overrides(overrides).items()]
    if typed:
        raise cfg.ConfigError(
            f"{command} goes on with the run's stored config; it takes no {', '.join(typed)} (only the executor's "
            "--executor, --workers, --gpus, --runs-per-gpu and --executor.* settings may change). To change the config, "
            "start a new run.")
