"""ResNet-18 in the two forms the paper's suites use.

- ``resnet18_cifar``: the CIFAR variant of kuangliu/pytorch-cifar and
  weiaicunzai/pytorch-cifar100 (the authors' code bases): 3x3 stem convolution with
  stride 1, no max-pool, four stages of two BasicBlocks (64, 128, 256, 512 channels),
  global average pool, linear head. 11,173,962 parameters with 10 classes.
- ``resnet18``: torchvision's ImageNet ResNet-18 (7x7 stride-2 stem, max-pool), for
  Tiny-ImageNet. With ``preset=paper`` the head has 1000 outputs, as the authors kept
  torchvision's ImageNet head (the 200 labels use the first 200 logits).

Both are written without in-place operations on the outputs of convolutions, BatchNorm
or linear layers: per-sample gradient hooks (Opacus) see those outputs, and autograd
refuses an in-place change of a tensor a backward hook holds. torchvision's own
BasicBlock does ``out += identity``, so ``resnet18`` uses torchvision's ``ResNet`` class
with an out-of-place block; the parameters and their names are torchvision's. Both work
in channels_last memory format.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock
from torchvision.models.resnet import ResNet

IMAGENET_CLASSES = 1000


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected when needed) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool)."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_planes = 64
        for i, (planes, n_blocks) in enumerate(
            zip((64, 128, 256, 512), blocks_per_stage, strict=True)
        ):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n_blocks):
                blocks.append(BasicBlock(in_planes, planes, stride if b == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        # adaptive pooling = kuangliu's avg_pool2d(4) at 32 px, and any other size works
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class OutOfPlaceBasicBlock(TorchvisionBasicBlock):
    """torchvision's BasicBlock with ``out + identity`` instead of ``out += identity``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _check_input(input_shape: tuple[int, ...], name: str) -> int:
    if len(input_shape) != 3:
        raise ValueError(f"{name} needs image inputs (C, H, W); got input_shape={input_shape}")
    return int(input_shape[0])


def build_resnet18_cifar(
    num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]
) -> nn.Module:
    """Model builder ``resnet18_cifar``: ResNet-18 with the CIFAR stem."""
    channels = _check_input(input_shape, "resnet18_cifar")
    return ResNetCifar((2, 2, 2, 2), num_classes=num_classes, in_channels=channels)


def build_resnet18(
    num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]
) -> nn.Module:
    """Model builder ``resnet18``: torchvision's ResNet-18 (randomly initialised).

    The head has ``num_classes`` outputs, or 1000 under the paper preset (the authors'
    Tiny-ImageNet runs kept the ImageNet head): ``preset=paper``, or an empty preset with
    ``dataset=tinyimagenet``, whose default preset is ``paper``.
    """
    channels = _check_input(input_shape, "resnet18")
    preset = str(options.get("preset") or "")
    paper = preset == "paper" or (not preset and options.get("dataset") == "tinyimagenet")
    head = max(num_classes, IMAGENET_CLASSES) if paper else num_classes
    model = ResNet(OutOfPlaceBasicBlock, [2, 2, 2, 2], num_classes=head)
    if channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # see the module docstring
    return model
