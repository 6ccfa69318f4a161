"""Architectures shipped with nft_fast: a small model zoo for backdoor purification.

Every builder takes ``(num_classes, in_channels, width, image_size)``. ``width`` is the
channel width of the first stage (64 in the standard networks); every channel count
scales by ``width / 64`` (8-16 suits CPU runs). ``in_channels=1`` takes grey images such
as Fashion-MNIST; all image nets run on 28x28 and 32x32 inputs (global average pooling
before the head), ``r3d18`` on ``(B, C, T, H, W)`` clips.

Key names follow the code each network usually comes from, so its checkpoints load:
the NFT/ANP CIFAR code for ``resnet18``/``resnet50``; ``preactresnet18`` keeps a final BN and
ReLU, so BackdoorBench's and WaNet's checkpoints load into ``preactresnet18_backdoorbench``;
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
    # the families of docs/model-families.md
    "VIDEO_ARCHS", "LayerNorm2d", "Permute", "SqueezeExcitation", "CNBlock", "ConvNeXt", "EncoderBlock", "Encoder",
    "VisionTransformer", "ShiftedWindowAttention", "SwinTransformerBlock", "PatchMerging", "SwinTransformer",
    "MBBlock", "MobileNetV3", "EfficientNet", "SepInceptionBlock3D", "S3D", "group_norm", "resnet18_gn",
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

def _video_conv(kind: str, cin: int, cout: int, mid: int, stride: int) -> nn.Module:
    """torchvision's video conv builders: ``"3d"`` 3x3x3 (``Conv3DSimple``), ``"2d"`` 1x3x3 with no
    temporal stride (``Conv3DNoTemporal``), ``"2plus1d"`` a 1x3x3 conv to ``mid`` channels, BN, ReLU
    and a 3x1x1 conv (``Conv2Plus1D``: keys ``0``, ``1``, ``3``)."""
    if kind == "3d":
        return nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
    if kind == "2d":
        return nn.Conv3d(cin, cout, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False)
    return nn.Sequential(nn.Conv3d(cin, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
                         nn.BatchNorm3d(mid), nn.ReLU(),
                         nn.Conv3d(mid, cout, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False))


class BasicBlock3d(_Residual):
    """torchvision ``video.resnet.BasicBlock`` keys: ``conv1.{0,1}``, ``conv2.{0,1}``, ``downsample.{0,1}``;
    ``conv`` picks the convolution (:func:`_video_conv`; ``"2plus1d"`` makes ``conv1.0`` / ``conv2.0``
    a (2+1)D pair with ``midplanes`` channels between, as torchvision computes them)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, conv: str = "3d") -> None:
        super().__init__()
        mid = (cin * cout * 27) // (cin * 9 + 3 * cout)
        self.conv1 = nn.Sequential(_video_conv(conv, cin, cout, mid, stride), nn.BatchNorm3d(cout), nn.ReLU())
        self.conv2 = nn.Sequential(_video_conv(conv, cout, cout, mid, 1), nn.BatchNorm3d(cout))
        ds_stride = (1, stride, stride) if conv == "2d" and stride != 1 else stride
        self._add_shortcut(cin, cout, ds_stride, nn.BatchNorm3d, "downsample", nn.Conv3d)

    def pre_norm(self, x: torch.Tensor) -> Tuple[torch.Tensor, nn.Module]:
        # conv1 = (conv, bn, relu) for torchvision's keys; relu(bn(.)) runs as one fused op
        return self.conv2[0](norm_act(self.conv1[1], self.conv1[0](x))), self.conv2[1]


class R3D(nn.Module):
    """R3D-18 (torchvision ``video.r3d_18`` layout) on ``(B, C, T, H, W)`` clips.

    Stem: 3x7x7 Conv3d, stride (1, 2, 2); for frames of ``image_size <= 32`` the spatial
    stride is 1 (as the CIFAR ResNets drop stem downsampling). Stages 2-4 stride 2 in
    time and space. A 4-D ``(B, C, H, W)`` input is taken as a one-frame clip.

    ``kind`` gives torchvision's other video ResNets with the same keys: ``"mc3"`` (``mc3_18``:
    3x3x3 convs in ``layer1``, 1x3x3 convs without temporal stride in ``layer2``-``layer4``) and
    ``"r2plus1d"`` (``r2plus1d_18``: every conv a (2+1)D pair, and the stem a 1x7x7 conv to
    ``45 * width / 64`` channels, BN, ReLU, a 3x1x1 conv, BN, ReLU: keys ``stem.0/1/3/4``).
    """

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64, image_size: int = 112, kind: str = "r3d") -> None:
        super().__init__()
        if kind not in ("r3d", "mc3", "r2plus1d"):
            raise ValueError(f"unknown video ResNet kind {kind!r}")
        self.kind = kind
        s = 1 if image_size <= 32 else 2
        if kind == "r2plus1d":
            mid = _scale(45, width)
            self.stem = nn.Sequential(nn.Conv3d(in_channels, mid, (1, 7, 7), (1, s, s), (0, 3, 3), bias=False),
                                      nn.BatchNorm3d(mid), nn.ReLU(),
                                      nn.Conv3d(mid, width, (3, 1, 1), 1, (1, 0, 0), bias=False),
                                      nn.BatchNorm3d(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv3d(in_channels, width, (3, 7, 7), (1, s, s), (1, 3, 3), bias=False),
                                      nn.BatchNorm3d(width), nn.ReLU())
        c = width
        for i, n in enumerate(num_blocks):
            cout = width * 2 ** i
            conv = {"r3d": "3d", "r2plus1d": "2plus1d"}.get(kind, "3d" if i == 0 else "2d")
            blocks = [BasicBlock3d(c if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1, conv) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c = cout
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(2)
        if self.kind == "r2plus1d":
            x = norm_act(self.stem[4], self.stem[3](norm_act(self.stem[1], self.stem[0](x))))
        else:
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


# --------------------------------------------------------------------------- shared pieces (torchvision layouts)

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(B, C, H, W)`` tensors (torchvision's ``LayerNorm2d``:
    NCHW is permuted to NHWC around ``F.layer_norm``). Masked, it runs the masked LayerNorm op on
    the NHWC view (``nft_channels_first``)."""

    nft_channels_first = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


class Permute(nn.Module):
    """``x.permute(*dims)`` as a module (torchvision ``ops.misc.Permute``; no state)."""

    def __init__(self, dims: Sequence[int]) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def _conv_norm_act(cin: int, cout: int, k, stride=1, groups: int = 1, norm: NormLayer = nn.BatchNorm2d,
                   act: Optional[Callable[[], nn.Module]] = nn.ReLU, conv: Type[nn.Module] = nn.Conv2d,
                   padding=None, bias: bool = False) -> nn.Sequential:
    """torchvision ``Conv{2,3}dNormActivation`` keys: ``0`` conv, ``1`` norm, ``2`` activation (if any)."""
    if padding is None:
        padding = tuple(kk // 2 for kk in k) if isinstance(k, tuple) else k // 2
    layers = [conv(cin, cout, k, stride, padding, groups=groups, bias=bias), norm(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision ``ops.misc.SqueezeExcitation``: ``x * scale_act(fc2(act(fc1(avgpool x))))`` with
    1x1 convolutions ``fc1``/``fc2`` (with bias)."""

    def __init__(self, channels: int, squeeze: int, act: Callable[[], nn.Module] = nn.ReLU,
                 scale_act: Callable[[], nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = scale_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


# --------------------------------------------------------------------------- ConvNeXt

class CNBlock(nn.Module):
    """``x + layer_scale * block(x)``; ``block`` = 7x7 depthwise conv, NCHW -> NHWC, LayerNorm,
    Linear (4x), GELU, Linear, NHWC -> NCHW (torchvision keys ``block.0/2/3/5``, ``layer_scale``)."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute((0, 2, 3, 1)),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute((0, 3, 1, 2)))
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    """ConvNeXt with torchvision ``convnext_tiny`` keys: ``features.0`` stem (conv + LayerNorm2d),
    ``features.1/3/5/7`` stages of :class:`CNBlock`, ``features.2/4/6`` downsampling (LayerNorm2d +
    2x2/2 conv), ``classifier.0`` LayerNorm2d and ``classifier.2`` Linear. Stage widths
    ``96, 192, 384, 768`` scale by ``width / 64``. Small inputs (``image_size <= 32``) get a 2x2
    stem patch instead of 4x4 so that 28x28 images keep a 1x1 map at the last stage."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 224,
                 depths: Sequence[int] = (3, 3, 9, 3), layer_scale: float = 1e-6) -> None:
        super().__init__()
        d0, p = _scale(96, width), (4 if image_size > 32 else 2)
        dims = [d0 * 2 ** i for i in range(len(depths))]
        layers: list = [nn.Sequential(nn.Conv2d(in_channels, d0, p, p), LayerNorm2d(d0, eps=1e-6))]
        for i, n in enumerate(depths):
            layers.append(nn.Sequential(*[CNBlock(dims[i], layer_scale) for _ in range(n)]))
            if i + 1 < len(depths):
                layers.append(nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


# --------------------------------------------------------------------------- ViT (torchvision layout)

class EncoderBlock(nn.Module):
    """torchvision ``EncoderBlock``: ``ln_1``, ``self_attention`` (``nn.MultiheadAttention``: fused
    ``in_proj_weight``, ``out_proj``), ``ln_2``, ``mlp.0`` / ``mlp.3`` Linear layers."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.dropout(self.self_attention(y, y, y, need_weights=False)[0])
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """torchvision ``vision_transformer.Encoder``: ``pos_embedding`` added, ``layers`` of
    :class:`EncoderBlock` named ``encoder_layer_N``, final LayerNorm ``ln``."""

    def __init__(self, seq_length: int, depth: int, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict((f"encoder_layer_{i}", EncoderBlock(dim, heads, mlp_dim))
                                                for i in range(depth)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """ViT with torchvision ``vit_b_16`` keys (``conv_proj``, ``class_token``,
    ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_N``, ``encoder.ln``, ``heads.head``).
    Hidden size ``12 * width`` (768 at width 64), 12 heads, MLP ``4x``, 12 layers; patch 16, or 4
    for images <= 32."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 224,
                 depth: int = 12, heads: int = 12) -> None:
        super().__init__()
        dim, p = 12 * width, vit_patch_size(image_size)
        self.image_size, self.patch_size, self.hidden_dim = image_size, p, dim
        self.conv_proj = nn.Conv2d(in_channels, dim, p, p)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = Encoder((image_size // p) ** 2 + 1, depth, dim, heads, 4 * dim)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(dim, num_classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
        return self.heads(self.encoder(x)[:, 0])


# --------------------------------------------------------------------------- Swin

def _relative_position_index(window: int) -> torch.Tensor:
    """For every pair of positions (i, j) of a ``window x window`` window, the row of the
    ``(2 window - 1)^2``-row bias table that holds their offset."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()])  # 2, N
    rel = pos[:, :, None] - pos[:, None, :] + (window - 1)  # 2, N, N in [0, 2 window - 2]
    return (rel[0] * (2 * window - 1) + rel[1]).flatten()


class ShiftedWindowAttention(nn.Module):
    """Window multi-head self-attention with a learned relative position bias, on ``(B, H, W, C)``;
    windows shifted by ``shift`` (with the attention mask between wrapped regions) unless the
    window covers the (padded) map. ``qkv`` and ``proj`` run as modules (so neuron masks act)."""

    def __init__(self, dim: int, window: int, shift: int, heads: int) -> None:
        super().__init__()
        self.window, self.shift, self.num_heads = window, shift, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window))

    def _shift_mask(self, hp: int, wp: int, sh: int, sw: int, device) -> torch.Tensor:
        """(windows, N, N): -100 between positions that came from different regions before the roll."""
        w = self.window

        def regions(n: int, s: int) -> torch.Tensor:
            r = torch.zeros(n, dtype=torch.long, device=device)
            if s:
                r[n - w:n - s], r[n - s:] = 1, 2
            return r

        lab = regions(hp, sh)[:, None] * 3 + regions(wp, sw)[None, :]
        lab = lab.view(hp // w, w, wp // w, w).permute(0, 2, 1, 3).reshape(-1, w * w)
        return (lab[:, :, None] != lab[:, None, :]).float() * -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w_, c = x.shape
        w, heads = self.window, self.num_heads
        x = F.pad(x, (0, 0, 0, (-w_) % w, 0, (-h) % w))
        hp, wp = x.shape[1], x.shape[2]
        sh, sw = (self.shift if w < hp else 0), (self.shift if w < wp else 0)
        if sh or sw:
            x = torch.roll(x, (-sh, -sw), (1, 2))
        nh, nw, n = hp // w, wp // w, w * w
        win = x.reshape(b, nh, w, nw, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)
        q, k, v = self.qkv(win).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, heads).permute(2, 0, 1)
        attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + bias
        if sh or sw:
            attn = (attn.view(b, nh * nw, heads, n, n) + self._shift_mask(hp, wp, sh, sw, x.device)[None, :, None])
            attn = attn.view(-1, heads, n, n)
        out = self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c))
        out = out.view(b, nh, nw, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if sh or sw:
            out = torch.roll(out, (sh, sw), (1, 2))
        return out[:, :h, :w_].contiguous()


class SwinTransformerBlock(nn.Module):
    """``x + attn(norm1 x)``, ``x + mlp(norm2 x)`` on ``(B, H, W, C)`` (torchvision keys ``norm1``,
    ``attn.{qkv,proj,relative_position_*}``, ``norm2``, ``mlp.0`` / ``mlp.3``)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, window, shift, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbours concatenated (odd sizes padded), LayerNorm over ``4C``, Linear to ``2C``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-3], x.shape[-2]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class SwinTransformer(nn.Module):
    """Swin with torchvision ``swin_t`` keys: ``features.0`` (patch conv, permute, LayerNorm),
    ``features.1/3/5/7`` stages of :class:`SwinTransformerBlock` (every second block shifted by
    half a window), ``features.2/4/6`` :class:`PatchMerging`, ``norm``, ``head``. Embedding
    ``96 * width / 64``; ``gcd(stage width, h)`` heads for ``h = 3, 6, 12, 24`` (those at the
    standard widths); patch 4, window 7."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 224,
                 depths: Sequence[int] = (2, 2, 6, 2), heads: Sequence[int] = (3, 6, 12, 24), window: int = 7,
                 patch: int = 4) -> None:
        super().__init__()
        d0 = _scale(96, width)
        layers: list = [nn.Sequential(nn.Conv2d(in_channels, d0, patch, patch), Permute((0, 2, 3, 1)), nn.LayerNorm(d0))]
        for i, n in enumerate(depths):
            dim = d0 * 2 ** i
            nh = math.gcd(dim, heads[i])
            layers.append(nn.Sequential(*[SwinTransformerBlock(dim, nh, window, 0 if j % 2 == 0 else window // 2)
                                          for j in range(n)]))
            if i + 1 < len(depths):
                layers.append(PatchMerging(dim))
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(d0 * 2 ** (len(depths) - 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(d0 * 2 ** (len(depths) - 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.features(x)).permute(0, 3, 1, 2)
        return self.head(self.avgpool(x).flatten(1))


# --------------------------------------------------------------------------- MobileNetV3 / EfficientNet

def _divisible_by(width: int) -> int:
    """Channel rounding: torchvision's multiples of 8 from width 32 up, any count below."""
    return 8 if width >= 32 else 1


class MBBlock(nn.Module):
    """Inverted residual with Squeeze-Excitation (torchvision ``mobilenetv3.InvertedResidual`` and
    ``efficientnet.MBConv``): ``block`` = [1x1 expand], depthwise kxk, [SE], 1x1 project (no
    activation); identity residual when the shape is kept. Keys ``block.N.{0,1}`` and
    ``block.N.fc1/fc2``."""

    def __init__(self, cin: int, k: int, hidden: int, cout: int, squeeze: Optional[int], stride: int,
                 act: Callable[[], nn.Module], norm: NormLayer, se_act: Callable[[], nn.Module],
                 se_scale: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers = [_conv_norm_act(cin, hidden, 1, norm=norm, act=act)] if hidden != cin else []
        layers.append(_conv_norm_act(hidden, hidden, k, stride, hidden, norm=norm, act=act))
        if squeeze is not None:
            layers.append(SqueezeExcitation(hidden, squeeze, se_act, se_scale))
        layers.append(_conv_norm_act(hidden, cout, 1, norm=norm, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    """MobileNetV3-Small with torchvision ``mobilenet_v3_small`` keys (``features.0`` .. ``features.12``,
    ``classifier.0`` / ``classifier.3``): BN (eps 1e-3, momentum 0.01), hard-swish, SE with 1x1
    convs ``fc1`` / ``fc2`` and hard-sigmoid. Channels scale by ``width / 64`` (multiples of 8
    from width 32, as torchvision's ``width_mult``)."""

    # input, kernel, expanded, output, SE, activation (RE / HS), stride
    CFG = ((16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
           (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
           (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
           (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        div = _divisible_by(width)
        ch = lambda c: _make_divisible(c * width / 64, div)  # noqa: E731
        norm = lambda c: nn.BatchNorm2d(c, eps=0.001, momentum=0.01)  # noqa: E731
        layers = [_conv_norm_act(in_channels, ch(16), 3, 2, norm=norm, act=nn.Hardswish)]
        for cin, k, exp, cout, se, a, s in self.CFG:
            act = nn.Hardswish if a == "HS" else nn.ReLU
            layers.append(MBBlock(ch(cin), k, ch(exp), ch(cout), _make_divisible(ch(exp) // 4, div) if se else None, s,
                                  act, norm, nn.ReLU, nn.Hardsigmoid))
        last_in = ch(self.CFG[-1][3])
        layers.append(_conv_norm_act(last_in, 6 * last_in, 1, norm=norm, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, ch(1024)), nn.Hardswish(), nn.Dropout(dropout),
                                        nn.Linear(ch(1024), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


class EfficientNet(nn.Module):
    """EfficientNet-B0 with torchvision ``efficientnet_b0`` keys (``features.0`` stem, ``features.1``
    .. ``features.7`` stages of MBConv blocks ``features.S.I.block.N``, ``features.8`` head conv,
    ``classifier.1``): BN, SiLU, SE (``fc1`` / ``fc2``, SiLU, sigmoid) squeezing to a quarter of
    the block's input channels. Channels scale by ``width / 64`` (the head conv: 1280 at width 64)."""

    # expand ratio, kernel, stride, input, output, blocks
    CFG = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
           (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, dropout: float = 0.2,
                 depths: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        div = _divisible_by(width)
        ch = lambda c: _make_divisible(c * width / 64, div)  # noqa: E731
        layers = [_conv_norm_act(in_channels, ch(32), 3, 2, act=nn.SiLU)]
        for i, (t, k, s, cin, cout, n) in enumerate(self.CFG):
            n = depths[i] if depths is not None else n
            stage = []
            for j in range(n):
                c_in = ch(cin) if j == 0 else ch(cout)
                stage.append(MBBlock(c_in, k, _make_divisible(c_in * t, div), ch(cout), max(1, c_in // 4),
                                     s if j == 0 else 1, nn.SiLU, nn.BatchNorm2d, nn.SiLU, nn.Sigmoid))
            layers.append(nn.Sequential(*stage))
        layers.append(_conv_norm_act(ch(self.CFG[-1][4]), ch(1280), 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(ch(1280), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


# --------------------------------------------------------------------------- S3D

def _cna3d(cin: int, cout: int, k, stride=1, padding=None) -> nn.Sequential:
    """torchvision ``Conv3dNormActivation`` (BN eps 1e-3, momentum 1e-3, ReLU; no conv bias)."""
    return _conv_norm_act(cin, cout, k, stride, norm=lambda c: nn.BatchNorm3d(c, eps=0.001, momentum=0.001),
                          conv=nn.Conv3d, padding=padding)


def _temporal_separable(cin: int, cout: int, k: int, stride: int, padding: int) -> nn.Sequential:
    """(1, k, k) spatial conv then (k, 1, 1) temporal conv, each with BN + ReLU (keys ``0.*``, ``1.*``)."""
    return nn.Sequential(_cna3d(cin, cout, (1, k, k), (1, stride, stride), (0, padding, padding)),
                         _cna3d(cout, cout, (k, 1, 1), (stride, 1, 1), (padding, 0, 0)))


class SepInceptionBlock3D(nn.Module):
    """Four branches concatenated: 1x1x1; 1x1x1 + separable 3x3x3 (twice, different widths);
    3x3x3 max-pool + 1x1x1 (keys ``branch0`` .. ``branch3``)."""

    def __init__(self, cin: int, b0: int, b1m: int, b1: int, b2m: int, b2: int, b3: int, ceil: bool) -> None:
        super().__init__()
        self.branch0 = _cna3d(cin, b0, 1)
        self.branch1 = nn.Sequential(_cna3d(cin, b1m, 1), _temporal_separable(b1m, b1, 3, 1, 1))
        self.branch2 = nn.Sequential(_cna3d(cin, b2m, 1), _temporal_separable(b2m, b2, 3, 1, 1))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, 1, 1, ceil_mode=ceil), _cna3d(cin, b3, 1))
        self.out_channels = b0 + b1 + b2 + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)], 1)


class S3D(nn.Module):
    """S3D with torchvision ``video.s3d`` keys (``features.0`` .. ``features.15``, ``classifier.1``,
    a Conv3d head averaged over the remaining time and space) on ``(B, C, T, H, W)`` clips. Channels
    scale by ``width / 64``. Small-input changes: adaptive average pooling instead of the fixed
    (2, 7, 7) window, and for ``image_size <= 32`` max-pools with ``ceil_mode`` (short clips and
    small frames would otherwise shrink to 0)."""

    # b0, b1 mid, b1, b2 mid, b2, b3 of the inception blocks, "M" max-pools (kernel, stride, padding)
    CFG = ("M1", (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M2", (192, 96, 208, 16, 48, 64),
           (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
           (256, 160, 320, 32, 128, 128), "M3", (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))
    POOLS = {"M1": ((1, 3, 3), (1, 2, 2), (0, 1, 1)), "M2": (3, 2, 1), "M3": (2, 2, 0)}

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64, image_size: int = 224,
                 dropout: float = 0.2) -> None:
        super().__init__()
        c = lambda v: _scale(v, width)  # noqa: E731
        ceil = image_size <= 32
        layers = [_temporal_separable(in_channels, c(64), 7, 2, 3), nn.MaxPool3d(*self.POOLS["M1"], ceil_mode=ceil),
                  _cna3d(c(64), c(64), 1), _temporal_separable(c(64), c(192), 3, 1, 1)]
        cin = c(192)
        for item in self.CFG:
            if isinstance(item, str):
                layers.append(nn.MaxPool3d(*self.POOLS[item], ceil_mode=ceil))
            else:
                layers.append(SepInceptionBlock3D(cin, *[c(v) for v in item], ceil=ceil))
                cin = layers[-1].out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Conv3d(cin, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(2)
        return self.classifier(self.avgpool(self.features(x))).flatten(1)


# --------------------------------------------------------------------------- GroupNorm ResNet

def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups (32: the standard widths), or for narrow layers the largest
    divisor of ``channels`` up to half of them (two channels a group at least, where possible: a
    one-channel group on a 1x1 map normalises everything to 0)."""
    g = max(d for d in range(1, min(groups, max(1, channels // 2)) + 1) if channels % d == 0)
    return nn.GroupNorm(g, channels)


def resnet18_gn(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """torchvision-layout ResNet-18 (``resnet18(norm_layer=GroupNorm)``) with GroupNorm everywhere,
    the stem's ``bn1`` included: the ``resnet18_imagenet`` keys less the BN buffers."""
    m = ResNet((2, 2, 2, 2), num_classes, group_norm, in_channels, width, BasicBlock, "imagenet")
    m.bn1 = group_norm(width)  # same position in the module order, so the same key order
    return m


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
    # the families of docs/model-families.md (torchvision key layouts)
    "convnext_tiny": (lambda num_classes, in_channels, width, image_size: ConvNeXt(num_classes, in_channels, width,
                                                                                   image_size), ("features.0.1",)),
    "vit_b_16": (lambda num_classes, in_channels, width, image_size: VisionTransformer(num_classes, in_channels, width,
                                                                                       image_size), ()),
    "swin_t": (lambda num_classes, in_channels, width, image_size: SwinTransformer(num_classes, in_channels, width,
                                                                                   image_size), ("features.0.2",)),
    "mobilenet_v3_small": (lambda num_classes, in_channels, width, image_size: MobileNetV3(num_classes, in_channels,
                                                                                           width), ("features.0.1",)),
    "efficientnet_b0": (lambda num_classes, in_channels, width, image_size: EfficientNet(num_classes, in_channels,
                                                                                         width), ("features.0.1",)),
    "r2plus1d_18": (lambda num_classes, in_channels, width, image_size: R3D((2, 2, 2, 2), num_classes, in_channels, width,
                                                                            image_size, "r2plus1d"), ("stem.1", "stem.4")),
    "mc3_18": (lambda num_classes, in_channels, width, image_size: R3D((2, 2, 2, 2), num_classes, in_channels, width,
                                                                       image_size, "mc3"), ("stem.1",)),
    "s3d": (lambda num_classes, in_channels, width, image_size: S3D(num_classes, in_channels, width, image_size),
            ("features.0.0.1", "features.0.1.1")),
    "resnet18_gn": (lambda num_classes, in_channels, width, image_size: resnet18_gn(num_classes, in_channels, width),
                    ("bn1",)),
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
    "convnext_tiny": ("features.0.0.weight", "classifier.2.weight", "features.0.0.weight", 64 / 96),
    "vit_b_16": ("conv_proj.weight", "heads.head.weight", "conv_proj.weight", 1 / 12),
    "swin_t": ("features.0.0.weight", "head.weight", "features.0.0.weight", 64 / 96),
    # the widest layers pin the width down despite the divisible-by-8 rounding
    "mobilenet_v3_small": ("features.0.0.weight", "classifier.3.weight", "classifier.0.weight", 64 / 1024),
    "efficientnet_b0": ("features.0.0.weight", "classifier.1.weight", "features.8.0.weight", 64 / 1280),
    "r2plus1d_18": ("stem.0.weight", "fc.weight", "stem.3.weight", 1.0),
    "mc3_18": ("stem.0.weight", "fc.weight", "stem.0.weight", 1.0),
    "s3d": ("features.0.0.0.weight", "classifier.1.weight", "features.0.0.0.weight", 1.0),
    "resnet18_gn": ("conv1.weight", "fc.weight", "conv1.weight", 1.0),
}

VIDEO_ARCHS = ("r3d18", "r2plus1d_18", "mc3_18", "s3d")


def input_dims(arch: str) -> int:
    """Dimensions of a batch the architecture takes: 5 (N, C, T, H, W) for the video nets, else 4."""
    return 5 if arch in VIDEO_ARCHS else 4


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
    """Read ``num_classes``/``in_channels``/``width`` (and ``image_size`` for ``vit``/``vit_b_16``) of ``arch``
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
    pos_key, patch_key = {"vit_b_16": ("encoder.pos_embedding", "conv_proj.weight")}.get(
        arch, ("pos_embed", "patch_embed.proj.weight"))
    pos, patch = _shape(state, pos_key), _shape(state, patch_key)
    if arch in ("vit", "vit_b_16") and pos and len(pos) == 3 and patch and len(patch) == 4:
        side, p = math.isqrt(pos[1] - 1), patch[-1]
        # the smallest image size that rebuilds this patch grid (patch 16 is used only above 32)
        out["image_size"] = max(side * p, 33) if p == 16 else side * p
    return {k: int(v) for k, v in out.items()}
