"""Which GPU a training run uses and how much of its memory: the executors' placement policy.

``places`` tells an executor (executors.py) where its runs go: ``executor.workers`` runs at
once (one for the serial executor), round robin over ``executor.gpus`` (every visible GPU when
unset), at most ``executor.runs_per_gpu`` on each. A worker process is pinned to its GPU before CUDA starts
(``CUDA_VISIBLE_DEVICES``: it sees that GPU alone, as cuda:0); serial runs take the first GPU in
this process. Runs sharing a GPU each get 1/runs_per_gpu of its memory as a hard ceiling
(``torch.cuda.set_per_process_memory_fraction``), and ``device_memory_budget`` tells code that
sizes an allocation what is left of that share, so k processes deciding at once do not each
count the whole free memory as theirs.

``resolve_device`` also says loudly when torch cannot use this machine's NVIDIA GPU (a wheel
built for a newer driver): ``auto`` would otherwise train on the CPU, days instead of hours.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, ExecutorConfig, TrainConfig

log = logging.getLogger(__name__)

DOCS = 'docs/usage.md, section "A GPU box: the torch build and --gpus"'
ADVICE = ("lower train.batch_size / train.eval_batch_size, the runs per GPU (--runs-per-gpu, or run_many's jobs), "
          "or data.image_size")


@dataclass(frozen=True)
class Slot:
    """A place for training runs: a GPU (``gpu``: its id as CUDA_VISIBLE_DEVICES names it;
    ``index``: its torch index in the process that trains) and the share of its memory they may take."""

    gpu: str
    index: int
    share: float = 1.0


_here: Slot | None = None  # this process's place, once an executor gave it one


def here() -> Slot | None:
    """Where this process's training runs go (None: nowhere in particular, torch's defaults)."""
    return _here


def pin(slot: Slot) -> None:
    """Place this fresh worker process on ``slot``'s GPU for good, before CUDA starts: it then
    sees that GPU alone, as cuda:0. (Were CUDA started already, the index names it instead.)"""
    global _here
    if torch.cuda.is_initialized():
        _here = slot
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpu
    _here = Slot(slot.gpu, 0, slot.share)


@contextlib.contextmanager
def placed(slot: Slot | None):
    """This process's runs go to ``slot`` for the duration (serial runs, a Ray task); None keeps
    the place it has."""
    global _here
    previous, _here = _here, slot or _here
    try:
        yield
    finally:
        _here = previous


def resolve_device(name: str = "auto") -> torch.device:
    """``train.device`` as a torch device. ``auto`` is CUDA where torch can use it, else the CPU,
    with a warning (once) where an NVIDIA GPU is present that torch cannot use. In a process
    placed on a GPU, CUDA means that GPU, and its memory share is enforced there."""
    if name == "auto":
        if not torch.cuda.is_available():
            _warn_unusable_gpu()
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = _unusable_nvidia_gpu()
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here"
                             + (f": {why}; install the torch build for this driver ({DOCS})" if why else "")
                             + "; use device=cpu or auto")
        if _here is not None:
            device = torch.device("cuda", _here.index)
            if _here.share < 1:
                torch.cuda.set_per_process_memory_fraction(_here.share, device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but Apple's MPS is not available here; use device=cpu or auto")
    return device


def training_device(executor: ExecutorConfig, train: TrainConfig) -> torch.device:
    """The device runs of this config train on here; refuses the CPU where ``executor.require_gpu``
    (the paper preset) and ``train.device=auto`` found no GPU: days of CPU by accident."""
    device = resolve_device(train.device)
    if device.type == "cpu" and train.device == "auto" and executor.require_gpu:
        raise ConfigError(_refusal(_unusable_nvidia_gpu() or "torch sees no CUDA GPU here"))
    return device


def _refusal(why: str) -> str:
    return (f"this preset trains on a GPU (executor.require_gpu=true; the paper preset takes days on a CPU), but "
            f"train.device=auto found none: {why}. Run it where torch sees a GPU (an NVIDIA GPU it cannot use "
            f"needs the torch build for its driver: {DOCS}), or run on the CPU on purpose with --train.device cpu")


def places(executor: ExecutorConfig, train: TrainConfig) -> list[Slot]:
    """Where the serial or process executor's runs go: ``executor.workers`` places (one for
    serial) round robin over the GPUs asked for, ``executor.runs_per_gpu`` on each, each with
    1/runs_per_gpu of the memory (of this process's own share, where it has one). Empty where runs train on the
    CPU. Fails, before anything trains, where the GPUs asked for cannot hold the runs."""
    device = training_device(executor, train)
    if device.type != "cuda":
        if executor.gpus is not None or executor.runs_per_gpu > 1:
            raise ConfigError(f"executor.gpus={executor.gpus} and executor.runs_per_gpu={executor.runs_per_gpu} place "
                              f"training runs on GPUs, but they train on {device} here (train.device={train.device}); "
                              "drop --gpus and --runs-per-gpu, or train on a GPU")
        return []
    asked = executor.gpus if executor.gpus is not None else [device.index] if device.index is not None else \
        list(range(torch.cuda.device_count()))
    ids = physical_ids(asked)
    at_once = 1 if executor.kind == "serial" else executor.workers
    room = len(asked) * executor.runs_per_gpu
    if at_once > room:
        per_gpu = math.ceil(at_once / len(asked))
        raise ConfigError(f"executor.workers={at_once} training runs at once, but {len(asked)} GPU(s) x "
                          f"executor.runs_per_gpu={executor.runs_per_gpu} hold {room}: pass --runs-per-gpu {per_gpu} "
                          f"(each run then gets 1/{per_gpu} of a GPU's memory), more GPUs (--gpus), or --workers {room}")
    share = (_here.share if _here is not None else 1.0) / executor.runs_per_gpu
    order = [position for _ in range(executor.runs_per_gpu) for position in range(len(asked))][:at_once]
    return [Slot(ids[position], asked[position], share) for position in order]


def physical_ids(asked: list[int]) -> list[str]:
    """The CUDA_VISIBLE_DEVICES ids of torch's GPU indices ``asked`` in this process (a child
    process given them sees just those); an index torch does not see is an error."""
    visible = torch.cuda.device_count()
    missing = [index for index in asked if index >= visible]
    if missing:
        where = f" (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})" if "CUDA_VISIBLE_DEVICES" in os.environ else ""
        raise ConfigError(f"executor.gpus={asked}: there is no GPU {missing[0]} here; torch sees {visible} "
                          f"GPU(s){where}, indices 0-{visible - 1}: pick among them, or take all of them "
                          "(--gpus all: executor.gpus unset)")
    named = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return [named[index] if index < len(named) else str(index) for index in asked]


def runs_per_gpu_for(jobs: int, gpus: list[int] | None) -> int:
    """Runs per GPU that let ``jobs`` runs go at once on ``gpus`` (every visible GPU when None);
    1 where there is none (CPU runs, or a Ray cluster whose driver has none)."""
    count = len(gpus) if gpus is not None else torch.cuda.device_count() if torch.cuda.is_available() else 0
    return math.ceil(jobs / count) if count else 1


def ray_gpus_per_run(executor: ExecutorConfig, train: TrainConfig, cluster_gpus: float) -> float:
    """GPUs each Ray task asks for: ``executor.gpus_per_run``, else 1/runs_per_gpu where the runs
    may use a GPU and the cluster has one. Refuses what cannot be met (the CPU where
    ``executor.require_gpu``; runs per GPU without a GPU), as ``training_device`` does here."""
    if executor.gpus_per_run or train.device not in ("auto", "cuda"):
        return executor.gpus_per_run
    if cluster_gpus:
        return 1 / executor.runs_per_gpu
    if executor.runs_per_gpu > 1:
        raise ConfigError(f"executor.runs_per_gpu={executor.runs_per_gpu}, but no node of this Ray cluster has a "
                          "GPU; drop --runs-per-gpu or start a node with GPUs")
    if executor.require_gpu and train.device == "auto":
        raise ConfigError(_refusal("no node of this Ray cluster has a GPU"))
    return 0.0


def device_memory_budget(device: torch.device) -> int:
    """Bytes this process may still take on CUDA ``device``: what is free there plus what torch's
    cache holds for it unused, within its share of the device (1/runs_per_gpu where runs share
    it) less what it has allocated. A share counts before its runs allocate, so processes
    sizing an allocation at the same moment do not each count the whole free memory as theirs."""
    free, total = torch.cuda.mem_get_info(device)
    allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    share = _here.share if _here is not None else 1.0
    return max(0, int(min(free + reserved - allocated, share * total - allocated)))


# what CUDA, cuBLAS and cuDNN say when an allocation fails outside torch's caching allocator too
# ("CUDA error: out of memory", CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_ALLOC_FAILED)
OUT_OF_MEMORY = re.compile(r"out of memory|ALLOC_FAILED", re.IGNORECASE)


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU out-of-memory: an infrastructure failure (batch size, runs per GPU), never a fitness."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and bool(OUT_OF_MEMORY.search(str(error))))


def free_cached_memory() -> None:
    """Return what a failed run left to the device: its tensors (once unreachable) and torch's cache."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@functools.cache
def _warn_unusable_gpu() -> None:
    why = _unusable_nvidia_gpu()
    if why:
        log.warning("%s: train.device=auto trains on the CPU (days instead of hours). Install the torch build for "
                    "this driver: %s", why, DOCS)


@functools.cache
def _unusable_nvidia_gpu() -> str | None:
    """Why torch cannot use this machine's NVIDIA GPU; None where it can, where there is none,
    or where GPUs are hidden on purpose (CUDA_VISIBLE_DEVICES empty or -1, e.g. a Ray CPU task)."""
    if torch.cuda.is_available() or os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return None
    driver = nvidia_driver()
    if driver is None:
        return None
    version, cuda = driver
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    supports = f", which runs CUDA {cuda} at most" if cuda else ""
    return f"torch {torch.__version__} ({build}) cannot use this machine's NVIDIA GPU (driver {version}{supports})"


def nvidia_driver() -> tuple[str, str | None] | None:
    """The NVIDIA driver's version and the newest CUDA it runs (None if unknown), from nvidia-smi
    or /proc/driver/nvidia/version; None on a machine without the driver."""
    smi, proc = shutil.which("nvidia-smi"), Path("/proc/driver/nvidia/version")
    if smi:
        try:
            text = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        version, cuda = re.search(r"Driver Version:\s*([\d.]+)", text), re.search(r"CUDA Version:\s*([\d.]+)", text)
        if version:
            return version.group(1), cuda.group(1) if cuda else None
    if proc.is_file():
        version = re.search(r"Kernel Module\s+([\d.]+)", proc.read_text(errors="replace"))
        return (version.group(1) if version else "unknown"), None
    return ("unknown", None) if smi else None
