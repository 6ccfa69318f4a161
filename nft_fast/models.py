"""Architectures shipped with nft_fast: a small model zoo for backdoor purification.

Every builder takes ``(num_classes, in_channels, width, image_size)``. ``width`` is the
channel width of the first stage (64 in the standard networks); every channel count
scales by ``width / 64`` (8-16 suits CPU runs). ``in_channels=1`` takes grey images such
as Fashion-MNIST; all image nets run on 28x28 and 32x32 inputs (global average pooling
before the head), ``r3d18`` on ``(B, C, T, H, W)`` clips.

Key names follow the code each network usually comes from, so its checkpoints load:
the NFT/ANP/BackdoorBench CIFAR code for ``resnet18``/``resnet50``/``preactresnet18``,
torchvision for ``*_imagenet``/``vgg16_bn``/``mobilenetv2``/``r3d18`` and timm for ``vit``.
Deviations for small inputs are noted on each class.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _checks
from ._bn import norm_act

__all__ = [
    "build", "ARCHS", "input_dims", "state_bytes", "default_exclude", "infer_kwargs", "resnet18",
    "resnet18_imagenet", "resnet50", "resnet50_imagenet", "preactresnet18", "preactresnet18_backdoorbench",
    "ResNet", "BasicBlock", "Bottleneck", "PreActBlock", "VGG", "VGG16_CFG", "MobileNetV2",
    "InvertedResidual", "R3D", "BasicBlock3d", "ViT", "ViTBlock", "Attention", "vit_patch_size", "vit_dim",
    "MLP", "NormLayer",
]

NormLayer = Callable[[int], nn.Module]


def _scale(c: int, width: int) -> int:
    """``c`` channels of the width-64 network scaled to ``width`` (at least 1)."""
    return max(1, round(c * width / 64))


# --------------------------------------------------------------------------- ResNets

class _Residual(nn.Module):
    """``relu(residual(x) + shortcut(x))`` for the post-activation blocks (2D and 3D).

    The projection shortcut is registered as ``shortcut`` (CIFAR code) or ``downsample``
    (torchvision); it is an empty ``nn.Sequential`` (no state_dict keys) when it is the identity.
    """

    def _add_shortcut(self, cin: int, cout: int, stride, norm: NormLayer, name: str,
                      conv: Type[nn.Module] = nn.Conv2d) -> None:
        sc = nn.Sequential()
        if stride != 1 or cin != cout:
            sc = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))
        self._shortcut_name = name
        setattr(self, name, sc)

    def pre_norm(self, x: torch.Tensor) -> Tuple[torch.Tensor, nn.Module]:
        """The input of the residual branch's last norm, and that norm."""
        raise NotImplementedError

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        z, norm = self.pre_norm(x)
        return norm(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu(norm(z) + shortcut): one fused op when the norm is masked
        z, norm = self.pre_norm(x)
        return norm_act(norm, z, getattr(self, self._shortcut_name)(x))


class BasicBlock(_Residual):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm_layer: Optional[NormLayer] = None,
                 shortcut_name: str = "shortcut") -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self._add_shortcut(in_planes, planes, stride, norm_layer, shortcut_name)

    def pre_norm(self, x: torch.Tensor) -> Tuple[torch.Tensor, nn.Module]:
        return self.conv2(norm_act(self.bn1, self.conv1(x))), self.bn2


class Bottleneck(_Residual):
    """1x1 -> 3x3 (stride) -> 1x1 (x4), stride on the 3x3 conv (torchvision v1.5 and kuangliu CIFAR)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm_layer: Optional[NormLayer] = None,
                 shortcut_name: str = "shortcut") -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = norm_layer(4 * planes)
        self._add_shortcut(in_planes, 4 * planes, stride, norm_layer, shortcut_name)

    def pre_norm(self, x: torch.Tensor) -> Tuple[torch.Tensor, nn.Module]:
        out = norm_act(self.bn1, self.conv1(x))
        out = norm_act(self.bn2, self.conv2(out))
        return self.conv3(out), self.bn3


class PreActBlock(nn.Module):
    """Pre-activation block: ``conv2(relu(bn2(conv1(relu(bn1 x))))) + shortcut``; the 1x1 conv
    shortcut (no BN) takes ``relu(bn1 x)`` and exists only when the shape changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm_layer: Optional[NormLayer] = None,
                 shortcut_name: str = "shortcut") -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.bn1 = norm_layer(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            setattr(self, shortcut_name, nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False)))
        self._shortcut_name = shortcut_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # relu(bn(.)) as one fused op when the norm is masked (the sum feeds no norm: unfused)
        out = norm_act(self.bn1, x)
        sc = getattr(self, self._shortcut_name)(out) if hasattr(self, self._shortcut_name) else x
        out = self.conv2(norm_act(self.bn2, self.conv1(out)))
        return out + sc


class ResNet(nn.Module):
    """2D ResNet; ``stem`` picks the layout (``width`` = channels of ``layer1``'s input):

    * ``"cifar"``: 3x3 stride-1 ``conv1`` + ``bn1``, no max-pool, head ``linear``, block
      shortcuts ``shortcut`` (the NFT/ANP reference code);
    * ``"imagenet"``: torchvision layout, 7x7 stride-2 ``conv1`` + ``bn1`` + 3x3/2 max-pool,
      head ``fc``, shortcuts ``downsample``;
    * ``"preact"``: PreActResNet, 3x3 ``conv1`` without BN, final ``bn`` + ReLU, head ``linear``
      (``final_norm=False``: no final ``bn`` and ReLU, as the PreActResNet-18 of BackdoorBench and WaNet).

    The stem BN ``bn1`` is always a plain ``nn.BatchNorm2d`` (the reference never masks it);
    ``norm_layer`` builds every other BN.
    """

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10,
                 norm_layer: Optional[NormLayer] = None, in_channels: int = 3, width: int = 64,
                 block: type = BasicBlock, stem: str = "cifar", final_norm: bool = True) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet", "preact"):
            raise ValueError(f"unknown ResNet stem {stem!r}")
        self.stem_type, self.block, self.in_planes = stem, block, width
        self.final_norm = stem == "preact" and final_norm
        k, s = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv1 = nn.Conv2d(in_channels, width, k, s, k // 2, bias=False)
        if stem != "preact":
            self.bn1 = nn.BatchNorm2d(width)
        sc = "downsample" if stem == "imagenet" else "shortcut"
        self.layer1 = self._make_layer(width, num_blocks[0], 1, norm_layer, sc)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2, norm_layer, sc)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2, norm_layer, sc)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2, norm_layer, sc)
        if self.final_norm:
            self.bn = (norm_layer or nn.BatchNorm2d)(self.in_planes)
        self._head_name = "fc" if stem == "imagenet" else "linear"
        setattr(self, self._head_name, nn.Linear(self.in_planes, num_classes))

    def _make_layer(self, planes: int, n: int, stride: int, norm_layer, shortcut_name: str = "shortcut") -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(self.block(self.in_planes, planes, s, norm_layer, shortcut_name))
            self.in_planes = planes * self.block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.stem_type != "preact":
            out = norm_act(self.bn1, out)
        if self.stem_type == "imagenet":
            out = F.max_pool2d(out, 3, 2, 1)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.final_norm:
            out = norm_act(self.bn, out)
        # The reference uses avg_pool2d(out, 4), which equals this on 32x32 (and 28x28) inputs.
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return getattr(self, self._head_name)(out)


def resnet18(num_classes: int = 10, norm_layer: Optional[NormLayer] = None, in_channels: int = 3, width: int = 64) -> ResNet:
    """The reference CIFAR ResNet-18 (``nft_fast.reference.ResNet18`` builds on it)."""
    return ResNet((2, 2, 2, 2), num_classes, norm_layer, in_channels, width)


def resnet18_imagenet(num_classes: int = 10, norm_layer: Optional[NormLayer] = None, in_channels: int = 3,
                      width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, norm_layer, in_channels, width, BasicBlock, "imagenet")


def resnet50(num_classes: int = 10, norm_layer: Optional[NormLayer] = None, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, norm_layer, in_channels, width, Bottleneck, "cifar")


def resnet50_imagenet(num_classes: int = 10, norm_layer: Optional[NormLayer] = None, in_channels: int = 3,
                      width: int = 64) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, norm_layer, in_channels, width, Bottleneck, "imagenet")


def preactresnet18(num_classes: int = 10, norm_layer: Optional[NormLayer] = None, in_channels: int = 3,
                   width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, norm_layer, in_channels, width, PreActBlock, "preact")


def preactresnet18_backdoorbench(num_classes: int = 10, norm_layer: Optional[NormLayer] = None, in_channels: int = 3,
                                 width: int = 64) -> ResNet:
    """BackdoorBench's (and WaNet's) PreActResNet-18: no final BN and ReLU before the pooling;
    same key names as :func:`preactresnet18` less ``bn.*``."""
    return ResNet((2, 2, 2, 2), num_classes, norm_layer, in_channels, width, PreActBlock, "preact", final_norm=False)


# --------------------------------------------------------------------------- VGG

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """torchvision ``vgg*_bn`` ``features`` (conv with bias + BN + ReLU, 2x2 max-pools).

    Small-input changes: max-pools use ``ceil_mode=True`` (28x28 would otherwise shrink to
    0x0 at the fifth pool; identical on 32x32), and the 4096-wide classifier is replaced by
    adaptive average pooling to 1x1 and a single ``classifier = Linear(512w, num_classes)``
    (as the CIFAR VGGs do).
    """

    def __init__(self, cfg: Sequence = VGG16_CFG, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        layers, c = [], in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                v = _scale(v, width)
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# --------------------------------------------------------------------------- MobileNetV2

def _make_divisible(v: float, divisor: int) -> int:
    """torchvision's channel rounding (nearest multiple of ``divisor``, never below 90% of ``v``)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision ``Conv2dNormActivation`` keys: ``0`` conv, ``1`` BN, ``2`` ReLU6."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
    """1x1 expand (skipped for ratio 1) -> 3x3 depthwise -> 1x1 linear projection; identity residual
    when the shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [_conv_bn_act(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [_conv_bn_act(hidden, hidden, 3, stride, hidden), nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision key names (``features.0`` .. ``features.18``, ``classifier.1``).

    CIFAR strides (as kuangliu/pytorch-cifar): the first conv and the second stage have
    stride 1, so 32x32 inputs end at 4x4. Channels (including the last 1280) scale by
    ``width / 64``, rounded to multiples of 8 when ``width >= 32``, else to >= 1.
    """

    # (expansion t, channels c, repeats n, first stride s)
    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        div = 8 if width >= 32 else 1
        ch = lambda c: _make_divisible(c * width / 64, div)  # noqa: E731
        c = ch(32)
        layers = [_conv_bn_act(in_channels, c, 3, 1)]
        for t, cout, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(c, ch(cout), s if i == 0 else 1, t))
                c = ch(cout)
        layers.append(_conv_bn_act(c, ch(1280), 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch(1280), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# --------------------------------------------------------------------------- R3D-18

class BasicBlock3d(_Residual):
    """torchvision ``video.resnet.BasicBlock`` keys: ``conv1.{0,1}``, ``conv2.{0,1}``, ``downsample.{0,1}``."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm3d(cout))
        self._add_shortcut(cin, cout, stride, nn.BatchNorm3d, "downsample", nn.Conv3d)

    def pre_norm(self, x: torch.Tensor) -> Tuple[torch.Tensor, nn.Module]:
        # conv1 = (conv, bn, relu) for torchvision's keys; relu(bn(.)) runs as one fused op
        return self.conv2[0](norm_act(self.conv1[1], self.conv1[0](x))), self.conv2[1]


class R3D(nn.Module):
    """R3D-18 (torchvision ``video.r3d_18`` layout) on ``(B, C, T, H, W)`` clips.

    Stem: 3x7x7 Conv3d, stride (1, 2, 2); for frames of ``image_size <= 32`` the spatial
    stride is 1 (as the CIFAR ResNets drop stem downsampling). Stages 2-4 stride 2 in
    time and space. A 4-D ``(B, C, H, W)`` input is taken as a one-frame clip.
    """

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64, image_size: int = 112) -> None:
        super().__init__()
        s = 1 if image_size <= 32 else 2
        self.stem = nn.Sequential(nn.Conv3d(in_channels, width, (3, 7, 7), (1, s, s), (1, 3, 3), bias=False),
                                  nn.BatchNorm3d(width), nn.ReLU())
        c = width
        for i, n in enumerate(num_blocks):
            cout = width * 2 ** i
            blocks = [BasicBlock3d(c if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c = cout
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(2)
        x = norm_act(self.stem[1], self.stem[0](x))  # stem = (conv, bn, relu), the last two fused
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(F.adaptive_avg_pool3d(x, 1).flatten(1))


# --------------------------------------------------------------------------- ViT

class Attention(nn.Module):
    """Multi-head self-attention with explicit ``qkv``/``proj`` Linear layers (timm names)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1 x)``, then ``x + mlp(norm2 x)``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, mlp_ratio * dim), act=nn.GELU(),
                                             fc2=nn.Linear(mlp_ratio * dim, dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def vit_patch_size(image_size: int) -> int:
    return 4 if image_size <= 32 else 16


def vit_dim(width: int, heads: int = 4) -> int:
    """Embedding dim ``3 * width`` rounded to a multiple of ``heads`` (192 at width 64, as ViT-Tiny)."""
    return max(heads, round(3 * width / heads) * heads)


class ViT(nn.Module):
    """A small timm-style ViT: ``patch_embed.proj`` conv, ``cls_token``, learned ``pos_embed``
    (one per patch of an ``image_size`` image, plus cls), pre-norm blocks, final ``norm``, ``head``
    on the cls token. Patch 4 for images <= 32, else 16."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 32,
                 depth: int = 6, heads: int = 4) -> None:
        super().__init__()
        dim, p = vit_dim(width, heads), vit_patch_size(image_size)
        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv2d(in_channels, dim, p, p)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // p) ** 2 + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# --------------------------------------------------------------------------- MLP

class MLP(nn.Module):
    """A norm-free multilayer perceptron (masks only with ``neurons=True``)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64, image_size: int = 28) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 4 * width)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


# --------------------------------------------------------------------------- registry

def _resnet(fn: Callable[..., ResNet]) -> Callable[..., nn.Module]:
    return lambda num_classes, in_channels, width, image_size: fn(num_classes, None, in_channels, width)


# name -> (builder(num_classes, in_channels, width, image_size), default exclude for attach_masks:
# the stem norm, which NFT leaves unmasked as the reference does for ResNet-18's ``bn1``)
ARCHS: Dict[str, Tuple[Callable[..., nn.Module], Tuple[str, ...]]] = {
    "resnet18": (_resnet(resnet18), ("bn1",)),
    "resnet18_imagenet": (_resnet(resnet18_imagenet), ("bn1",)),
    "resnet50": (_resnet(resnet50), ("bn1",)),
    "resnet50_imagenet": (_resnet(resnet50_imagenet), ("bn1",)),
    "preactresnet18": (_resnet(preactresnet18), ()),
    "preactresnet18_backdoorbench": (_resnet(preactresnet18_backdoorbench), ()),
    "vgg16_bn": (lambda num_classes, in_channels, width, image_size: VGG(VGG16_CFG, num_classes, in_channels, width),
                 ("features.1",)),
    "mobilenetv2": (lambda num_classes, in_channels, width, image_size: MobileNetV2(num_classes, in_channels, width),
                    ("features.0.1",)),
    "r3d18": (lambda num_classes, in_channels, width, image_size: R3D((2, 2, 2, 2), num_classes, in_channels, width, image_size),
              ("stem.1",)),
    "vit": (lambda num_classes, in_channels, width, image_size: ViT(num_classes, in_channels, width, image_size), ()),
    "mlp": (lambda num_classes, in_channels, width, image_size: MLP(num_classes, in_channels, width, image_size), ()),
}

# name -> (first layer weight [in_channels at dim 1], head weight [num_classes at dim 0],
#          weight whose dim 0 gives the width, width per output channel of that weight)
_INFER: Dict[str, Tuple[Optional[str], str, str, float]] = {
    "resnet18": ("conv1.weight", "linear.weight", "conv1.weight", 1.0),
    "resnet50": ("conv1.weight", "linear.weight", "conv1.weight", 1.0),
    "preactresnet18": ("conv1.weight", "linear.weight", "conv1.weight", 1.0),
    "preactresnet18_backdoorbench": ("conv1.weight", "linear.weight", "conv1.weight", 1.0),
    "resnet18_imagenet": ("conv1.weight", "fc.weight", "conv1.weight", 1.0),
    "resnet50_imagenet": ("conv1.weight", "fc.weight", "conv1.weight", 1.0),
    "vgg16_bn": ("features.0.weight", "classifier.weight", "features.0.weight", 1.0),
    # the last conv (1280 at width 64) pins the width down exactly despite the divisible-by-8 rounding
    "mobilenetv2": ("features.0.0.weight", "classifier.1.weight", "features.18.0.weight", 64 / 1280),
    "r3d18": ("stem.0.weight", "fc.weight", "stem.0.weight", 1.0),
    "vit": ("patch_embed.proj.weight", "head.weight", "patch_embed.proj.weight", 1 / 3),
    "mlp": (None, "fc2.weight", "fc1.weight", 1 / 4),
}


def input_dims(arch: str) -> int:
    """Dimensions of a batch the architecture takes: 5 (N, C, T, H, W) for the video net, else 4."""
    return 5 if arch == "r3d18" else 4


def state_bytes(arch: str, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 32) -> int:
    """Bytes of the parameters and buffers of ``build(arch, ...)``, counted on the meta device
    (nothing is allocated)."""
    with torch.device("meta"):
        m = ARCHS[arch][0](num_classes, in_channels, width, image_size)
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


def build(arch: str, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 32) -> nn.Module:
    """Build a plain (unmasked) model by name. The sizes must be positive integers, and the
    model must fit in the memory this machine has available (sized on the meta device first:
    a width read off a crafted checkpoint is refused, not allocated)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHS))}")
    sizes = dict(num_classes=num_classes, in_channels=in_channels, width=width, image_size=image_size)
    for name, v in sizes.items():
        _checks.positive_int(name, v, owner=f"{arch}")
    what = f"{arch} ({', '.join(f'{k} {v}' for k, v in sizes.items())})"
    try:
        nbytes = state_bytes(arch, **sizes)
    except (RuntimeError, ValueError, OverflowError) as e:  # e.g. a size overflowing int64
        raise ValueError(f"{what} cannot be built: {str(e).splitlines()[0][:200]}") from None
    _checks.fits_memory(nbytes, f"{what}: its weights")
    return ARCHS[arch][0](num_classes, in_channels, width, image_size)


def default_exclude(arch: str) -> Tuple[str, ...]:
    """Module names NFT leaves unmasked by default (the stem norm, where there is one)."""
    return ARCHS[arch][1]


def _shape(state: Dict[str, torch.Tensor], key: Optional[str]) -> Optional[Tuple[int, ...]]:
    t = state.get(key) if key else None
    return tuple(t.shape) if isinstance(t, torch.Tensor) and t.dim() >= 2 else None


def infer_kwargs(arch: str, state: Dict[str, torch.Tensor]) -> Dict[str, int]:
    """Read ``num_classes``/``in_channels``/``width`` (and ``image_size`` for ``vit``) of ``arch``
    off a state dict (missing keys are left to the strict load, which names them)."""
    if arch not in _INFER:
        return {}
    first, head, wkey, per_channel = _INFER[arch]
    out: Dict[str, int] = {}
    if _shape(state, first):
        out["in_channels"] = _shape(state, first)[1]
    if _shape(state, head):
        out["num_classes"] = _shape(state, head)[0]
    if _shape(state, wkey):
        out["width"] = max(1, round(_shape(state, wkey)[0] * per_channel))
    pos, patch = _shape(state, "pos_embed"), _shape(state, "patch_embed.proj.weight")
    if arch == "vit" and pos and len(pos) == 3 and patch and len(patch) == 4:
        side, p = math.isqrt(pos[1] - 1), patch[-1]
        # the smallest image size that rebuilds this patch grid (patch 16 is used only above 32)
        out["image_size"] = max(side * p, 33) if p == 16 else side * p
    return {k: int(v) for k, v in out.items()}
