"""How an image becomes the model's input: `Preprocess`, the recipe, and `resize_to_input`, the one
resize of the library. The load and the per-batch resize call the same function, so both give the
same pixels."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to `resize_size`, center-crop `image_size`, scale to [0, 1], normalise."""

    image_size: int
    resize_size: int
    interpolation: str  # "bilinear" or "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', not {self.interpolation!r}")
        if not 1 <= self.image_size <= self.resize_size:
            raise ValueError(f"need 1 <= image_size <= resize_size, got {self.image_size} and {self.resize_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0; got {self.mean}, {self.std}")

    def at_size(self, image_size: int) -> Preprocess:
        """Same recipe at another input size; the resize/crop ratio (e.g. 232/224) is kept."""
        resize_size = round(image_size * self.resize_size / self.image_size)
        return replace(self, image_size=image_size, resize_size=resize_size)


def resize_to_input(images: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """Shorter side to resize_size (antialiased), then center-crop, for a uint8 batch (N, C, H, W)
    on any device or a PIL image. Images smaller than the input (MNIST, CIFAR) go straight to the
    input size, so upsampling never crops their borders (as the paper does, docs/data.md).
    A batch is resized in float32 on every device: torchvision's uint8 kernel is CPU-only and its
    bicubic differs by up to 24 levels, so a CPU and a GPU would give different pixels.
    """
    height, width = TF.get_size(images)
    target = preprocess.image_size if min(height, width) < preprocess.image_size else preprocess.resize_size
    interpolation = _INTERPOLATIONS[preprocess.interpolation]
    if isinstance(images, torch.Tensor):
        resized = TF.resize(images.float(), [target], antialias=True, interpolation=interpolation)
        images = resized.round_().clamp_(0, 255).to(torch.uint8)
    else:
        images = TF.resize(images, [target], antialias=True, interpolation=interpolation)
    return TF.center_crop(images, [preprocess.image_size])
