"""Native images to the stored uint8 tensors, once per load: small arrays kept at their size, others
resized in batches, image files decoded on threads. The memory checks here refuse, before
allocating, what this machine cannot hold."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from .dataset import RawSplit, Split
from .preprocess import Preprocess, resize_to_input


def to_split(raw: RawSplit, preprocess: Preprocess, store_at: str, desc: str) -> Split:
    if not isinstance(raw.images, np.ndarray):
        images = _decode_files(raw.images, preprocess, desc)
    elif _keeps_native(raw.images, preprocess, store_at):  # gray stays one channel: to_input broadcasts it
        images = torch.tensor(_channels_first(raw.images))
    else:
        images = _resize_arrays(raw.images, preprocess, desc)
    return Split(images, torch.as_tensor(raw.labels, dtype=torch.int64))


def _keeps_native(images: np.ndarray, preprocess: Preprocess, store_at: str) -> bool:
    """Arrays strictly smaller than the input are upsampled straight to it (`resize_to_input`),
    so storing them as they are and resizing each batch gives the same pixels for less memory."""
    return store_at == "native" and max(images.shape[1:3]) < preprocess.image_size


def _channels_first(images: np.ndarray) -> np.ndarray:
    """(N, H, W) gray or (N, H, W, 3) colour -> (N, 1 or 3, H, W)."""
    return images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)


def _resize_arrays(images: np.ndarray, preprocess: Preprocess, desc: str) -> torch.Tensor:
    """Same-sized images resized in batches of at most 256 MB as float32: all 70000 Fashion-MNIST
    images take seconds."""
    size = preprocess.image_size
    batch = max(1, min(2048, 2**28 // (4 * 3 * size * size)))
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for start in tqdm(range(0, len(images), batch), desc=desc, leave=False, unit="batch", delay=2):
        chunk = torch.tensor(_channels_first(images[start:start + batch]))
        out[start:start + batch] = resize_to_input(chunk, preprocess)  # one gray channel broadcasts to 3
    return out


def _decode_files(files: list[Path], preprocess: Preprocess, desc: str) -> torch.Tensor:
    """Decode and resize image files once, on threads (PIL releases the GIL while decoding)."""
    size = preprocess.image_size
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        images = pool.map(partial(_load_image, preprocess=preprocess), files)
        for i, image in enumerate(tqdm(images, total=len(files), desc=desc, leave=False, unit="img", delay=2)):
            out[i] = image
    finally:  # on an error or Ctrl-C, drop the queued files instead of decoding them all first
        pool.shutdown(cancel_futures=True)
    return out


def _load_image(path: Path, preprocess: Preprocess) -> torch.Tensor:
    with open_image(path) as image:
        # JPEG only: decode at a reduced scale that is still >= the resize target, much faster
        # on camera-size photos (ISIC); other formats ignore it.
        image.draft("RGB", (preprocess.resize_size, preprocess.resize_size))
        image = image.convert("RGB")
    return TF.pil_to_tensor(resize_to_input(image, preprocess))


@contextmanager
def open_image(path: Path):
    """Image.open whose failures, while opening or decoding inside the block, name the file."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {path} ({err}); remove or replace the file") from err


# ---------------------------------------------------------------------------------------------
# Memory checks


def _stored_bytes(split: RawSplit, preprocess: Preprocess, store_at: str) -> int:
    if isinstance(split.images, np.ndarray) and _keeps_native(split.images, preprocess, store_at):
        return split.images[:1].nbytes * len(split)
    return len(split) * 3 * preprocess.image_size ** 2


def available_memory() -> int:
    """Bytes this machine can still give (Linux's MemAvailable; elsewhere its physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(splits: dict[str, RawSplit], preprocess: Preprocess, store_at: str, title: str) -> None:
    """Refuse, before allocating, a dataset whose stored images would not fit in memory."""
    needed = sum(_stored_bytes(split, preprocess, store_at) for split in splits.values())
    available = available_memory()
    if needed > 0.9 * available:
        raise ValueError(
            f"{title} at {preprocess.image_size} px would take {needed / 2**30:.1f} GiB as uint8 "
            f"({', '.join(f'{len(s)} {n}' for n, s in splits.items())} images), more than the "
            f"{available / 2**30:.1f} GiB this machine has available; lower data.image_size, keep small "
            "images at their native size (data.store_at native), or take fewer images (data.max_train)")


def check_batch_fits(preprocess: Preprocess, batch_size: int) -> None:
    """Refuse an input size whose batches alone (float32 at the model input) exceed this machine's
    memory: a typo such as --data.image_size 100000 should cost a second, not an allocation error."""
    needed, available = 4 * 3 * batch_size * preprocess.image_size ** 2, available_memory()
    if needed > available:
        raise ValueError(
            f"one batch of {batch_size} images at {preprocess.image_size} px takes {needed / 2**30:.1f} GiB "
            f"as float32, more than the {available / 2**30:.1f} GiB this machine has available; "
            "lower data.image_size (default: the model's input size) or train.batch_size")
