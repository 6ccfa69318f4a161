"""Small models of the kinds users bring: torchvision-style ResNet, 3D-conv video net,
ViT-style transformer, and a plain nn.Sequential. Each takes ``norm`` factories so the
same network can be built with reference masked norms (``nft_fast.reference``)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class TVBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + idt)


class TVResNet(nn.Module):
    """torchvision.models.resnet layout: 7x7 stem, max-pool, stages, avgpool, fc."""

    def __init__(self, num_classes=5, width=8, norm=nn.BatchNorm2d, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(TVBasicBlock(width, width, 1, norm), TVBasicBlock(width, width, 1, norm))
        self.layer2 = nn.Sequential(TVBasicBlock(width, 2 * width, 2, norm), TVBasicBlock(2 * width, 2 * width, 1, norm))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Video3D(nn.Module):
    """R3D-style: Conv3d + BatchNorm3d stages on (B, C, T, H, W) clips."""

    def __init__(self, num_classes=4, width=6, norm=nn.BatchNorm3d):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(3, width, 3, 1, 1, bias=False), norm(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv3d(width, 2 * width, 3, 2, 1, bias=False), norm(2 * width), nn.ReLU(),
                                   nn.Conv3d(2 * width, 2 * width, 3, 1, 1, bias=False), norm(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(F.adaptive_avg_pool3d(x, 1).flatten(1))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim, heads, norm):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = norm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """timm-style ViT: patch conv, cls token, pre-norm blocks, final LayerNorm, head."""

    def __init__(self, num_classes=5, dim=16, depth=2, heads=2, patch=4, image=16, norm=nn.LayerNorm):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, norm) for _ in range(depth)])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def user_sequential(num_classes=4, norm2d=nn.BatchNorm2d, norm1d=nn.BatchNorm1d):
    """A user's nn.Sequential mixing normed and norm-free layers (12x12 single-channel input)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), norm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 24), norm1d(24), nn.ReLU(),
        nn.Linear(24, 16), nn.ReLU(),
        nn.Linear(16, num_classes),
    )


def toy_backdoor(seed: int = 0):
    """A width-4 ResNet-18 trained on 12x12 toy images with a BadNets backdoor to class 0
    (rate 0.3, 5 epochs: learnt on every seed and thread count tried).

    Returns ``(model, (x_clean, y_clean), test_loader, poison_loader)``; the poison loader
    yields ``(x, y_true)`` of non-target test images (evaluate with ``target=0``)."""
    from torch.utils.data import DataLoader, TensorDataset

    from nft_fast.harness import datasets as D
    from nft_fast import models
    from nft_fast.harness.attacks import BadNets
    from nft_fast.harness.train import train_classifier

    xtr, ytr = D.toy_images(1200, num_classes=4, size=12, seed=0)
    attack = BadNets(target=0, num_classes=4)
    xtr, ytr, _ = attack.poison_train(xtr, ytr, rate=0.3)
    torch.manual_seed(seed)
    model = models.build("resnet18", num_classes=4, in_channels=1, width=4, image_size=12)
    train_classifier(model, TensorDataset(xtr, ytr), epochs=5, batch_size=32, lr=0.05, progress=False)
    xc, yc = D.toy_images(100, num_classes=4, size=12, seed=1)
    xte, yte = D.toy_images(400, num_classes=4, size=12, seed=2)
    keep = yte != 0
    test = DataLoader(TensorDataset(xte, yte), batch_size=200)
    poison = DataLoader(TensorDataset(attack.apply(xte[keep]), yte[keep]), batch_size=200)
    return model, (xc, yc), test, poison
