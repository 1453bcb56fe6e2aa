"""A small convolutional network for 8x8 digit images: the only code a PyTorch user writes.

fedmq builds it with ``make_cnn(num_classes=...)`` from the data (``--trainer-config
module=examples/pytorch-cnn/model.py:make_cnn``) and trains it with ``fedmq.torch:TorchTrainer``.
"""

from __future__ import annotations

from torch import nn


def make_cnn(num_classes: int = 10, channels: int = 16) -> nn.Module:
    """Two 3x3 convolutions, a 2x2 max-pool and two dense layers: 1x8x8 -> ``num_classes`` logits."""
    return nn.Sequential(
        nn.Conv2d(1, channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(2 * channels * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )
