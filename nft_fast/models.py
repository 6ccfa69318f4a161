"""Architectures shipped with nft_fast (the reference CIFAR ResNet-18 and small nets).

``width`` scales every channel count (64 is the paper's network; 8-16 suits CPU runs);
``in_channels=1`` takes grey images such as Fashion-MNIST.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

NormLayer = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm_layer: Optional[NormLayer] = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), norm_layer(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR-layout ResNet (3x3 stem, no max-pool) as in the NFT/ANP reference code.

    The stem BN ``bn1`` is always a plain ``nn.BatchNorm2d`` (the reference never masks it);
    ``norm_layer`` builds every BN inside the residual stages.
    """

    def __init__(self, num_blocks=(2, 2, 2, 2), num_classes: int = 10, norm_layer: Optional[NormLayer] = None,
                 in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], 1, norm_layer)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2, norm_layer)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2, norm_layer)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2, norm_layer)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int, norm_layer) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, norm_layer))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # The reference uses avg_pool2d(out, 4), which equals this on 32x32 (and 28x28) inputs.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, norm_layer: Optional[NormLayer] = None, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, norm_layer, in_channels, width)


class MLP(nn.Module):
    """A norm-free multilayer perceptron (masks only with ``neurons=True``)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64, image_size: int = 28) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 4 * width)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


# name -> (builder(num_classes, in_channels, width, image_size), default exclude for attach_masks)
ARCHS: Dict[str, Tuple[Callable[..., nn.Module], Tuple[str, ...]]] = {
    "resnet18": (lambda num_classes, in_channels, width, image_size: resnet18(num_classes, None, in_channels, width), ("bn1",)),
    "mlp": (lambda num_classes, in_channels, width, image_size: MLP(num_classes, in_channels, width, image_size), ()),
}


def build(arch: str, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 32) -> nn.Module:
    """Build a plain (unmasked) model by name."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    return ARCHS[arch][0](num_classes, in_channels, width, image_size)


def default_exclude(arch: str) -> Tuple[str, ...]:
    return ARCHS[arch][1]


def infer_kwargs(arch: str, state: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Read ``num_classes``/``in_channels``/``width``/``image_size`` of ``arch`` off a state dict
    (missing keys are left to the strict load, which names them)."""
    out: Dict[str, int] = {}
    if arch == "resnet18":
        if "conv1.weight" in state and state["conv1.weight"].dim() == 4:
            out["width"], out["in_channels"] = state["conv1.weight"].shape[:2]
        if "linear.weight" in state:
            out["num_classes"] = state["linear.weight"].shape[0]
    elif arch == "mlp":
        if "fc1.weight" in state and "fc2.weight" in state:
            out["width"] = state["fc1.weight"].shape[0] // 4
            out["num_classes"] = state["fc2.weight"].shape[0]
    return {k: int(v) for k, v in out.items()}
