"""Modules that do not fit the digits images, for the bad-input tests of test_examples."""

from __future__ import annotations

from torch import nn


def mlp(num_classes: int = 10) -> nn.Module:
    """Takes 64-vectors: images of 1 x 8 x 8 do not fit."""
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))


def seven_classes() -> nn.Module:
    """Outputs 7 scores whatever the data's classes."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
