"""A tiny CNN for tests and the smoke preset: the whole pipeline runs in seconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn


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
