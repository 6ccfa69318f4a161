"""The reference NFT (the authors' algorithm, as published): the oracle every fast path is tested against.

Plain, readable PyTorch with the names of the authors' scripts, so code written
against them runs here. It reproduces the behaviour of the official code, minus its
known defects (uninitialised counters, unused norms in the training loss, unseeded
torch/numpy RNGs, hard-coded ``num_classes`` and ``.cuda()``). Like the official code
it leaves ``requires_grad=True`` on every weight; only the masks are optimised.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from types import SimpleNamespace
from typing import Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ._bn import bn_forward_args
from .models import resnet18 as _resnet18

__all__ = [
    "Masked_BN1d", "Masked_BN2d", "Masked_BN3d", "Masked_LayerNorm", "ResNet18",
    "Regularization", "mask_clip", "mixup_data", "mixup_criterion", "nft_step",
    "NFT_Train", "NFT_Test", "load_model", "run_nft", "mask_params",
]


class _MaskedBN:
    def _init_mask(self) -> None:
        self.neuron_mask = nn.Parameter(torch.ones(self.num_features))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        rm, rv, bn_training, eaf = bn_forward_args(self)
        # The mask scales the BN weight only: y = (gamma * m) * x_hat + beta.
        return F.batch_norm(input, rm, rv, self.weight * self.neuron_mask, self.bias, bn_training, eaf, self.eps)


class Masked_BN2d(_MaskedBN, nn.BatchNorm2d):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        nn.BatchNorm2d.__init__(self, num_features, eps, momentum, affine, track_running_stats)
        self._init_mask()


class Masked_BN1d(_MaskedBN, nn.BatchNorm1d):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        nn.BatchNorm1d.__init__(self, num_features, eps, momentum, affine, track_running_stats)
        self._init_mask()


class Masked_BN3d(_MaskedBN, nn.BatchNorm3d):
    """Not in the official code (its models are 2D); same rule, for video nets."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True) -> None:
        nn.BatchNorm3d.__init__(self, num_features, eps, momentum, affine, track_running_stats)
        self._init_mask()


class Masked_LayerNorm(nn.LayerNorm):
    """Not in the official code; the same mask-on-gamma rule for LayerNorm (ViTs)."""

    def __init__(self, normalized_shape, eps: float = 1e-5) -> None:
        super().__init__(normalized_shape, eps)
        self.neuron_mask = nn.Parameter(torch.ones(self.normalized_shape))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight * self.neuron_mask, self.bias, self.eps)


def ResNet18(num_classes: int = 10, norm_layer=Masked_BN2d, in_channels: int = 3, width: int = 64) -> nn.Module:
    """The reference CIFAR ResNet-18: stem ``bn1`` plain, the 19 other BNs masked."""
    return _resnet18(num_classes, norm_layer, in_channels, width)


def mask_params(model: nn.Module) -> List[nn.Parameter]:
    """Mask parameters in ``named_parameters()`` order (layer l = index l-1)."""
    return [p for n, p in model.named_parameters() if "neuron_mask" in n]


def Regularization(model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L1, L2, Linf)`` of ``1 - m`` over all masks. NFT's loss uses L1 only."""
    d = torch.cat([(1 - p).reshape(-1) for p in mask_params(model)])
    return d.abs().sum(), d.pow(2).sum().sqrt(), d.abs().max()


def _l1(model: nn.Module) -> torch.Tensor:
    return sum(torch.sum(torch.abs(1 - p)) for p in mask_params(model))


def mask_clip(args, model: nn.Module) -> None:
    """Clamp the masks of layer l into ``[alpha * exp(-beta * l), 1]`` (the schedule mu)."""
    alpha = getattr(args, "floor_alpha", 0.8)
    beta = getattr(args, "floor_beta", 0.5)
    with torch.no_grad():
        for l, p in enumerate(mask_params(model), start=1):
            p.clamp_(alpha * math.exp(-beta * l), 1.0)


def _draw_lam(alpha: float, rng: Optional[np.random.Generator]) -> float:
    rng = rng if rng is not None else np.random.default_rng()
    return float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0


def mixup_data(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, rng: Optional[np.random.Generator] = None,
               generator: Optional[torch.Generator] = None):
    """MixUp: ``lam ~ Beta(alpha, alpha)`` per batch, partner ``x[perm]``. Returns ``(x_mix, y_a, y_b, lam)``."""
    lam = _draw_lam(alpha, rng)
    index = torch.randperm(x.size(0), generator=generator).to(x.device)
    mixed_x = lam * x + (1 - lam) * x[index, :]
    return mixed_x, y, y[index], lam


def mixup_criterion(criterion, pred: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)


def nft_step(model: nn.Module, criterion, mask_opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
             lam: float, perm: torch.Tensor, samples_per_class: float, reg_coef: float = 1e-3,
             floor_alpha: float = 0.8, floor_beta: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """One NFT step with a given ``lam`` and ``perm``; returns ``(output, total_loss)``."""
    mixed_x = lam * x + (1 - lam) * x[perm, :]
    output = model(mixed_x)
    loss = mixup_criterion(criterion, output, y, y[perm], lam)
    total = loss + reg_coef * _l1(model) / samples_per_class
    mask_opt.zero_grad()
    total.backward()
    mask_opt.step()
    mask_clip(SimpleNamespace(floor_alpha=floor_alpha, floor_beta=floor_beta), model)
    return output, total


def NFT_Train(model: nn.Module, criterion, mask_opt: torch.optim.Optimizer, data_loader: Iterable,
              samples_per_class: float, reg_coef: float = 1e-3, mixup_alpha: float = 1.0, floor_alpha: float = 0.8,
              floor_beta: float = 0.5, rng: Optional[np.random.Generator] = None,
              generator: Optional[torch.Generator] = None, device=None) -> Tuple[float, float]:
    """One round of NFT over ``data_loader``; returns ``(mean total loss, MixUp training accuracy)``."""
    model.train()
    total_loss, total_correct, n = 0.0, 0.0, 0
    for x, y in data_loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        lam = _draw_lam(mixup_alpha, rng)
        perm = torch.randperm(x.size(0), generator=generator).to(x.device)
        output, total = nft_step(model, criterion, mask_opt, x, y, lam, perm, samples_per_class, reg_coef,
                                 floor_alpha, floor_beta)
        pred = output.argmax(1)
        total_correct += (lam * (pred == y).sum() + (1 - lam) * (pred == y[perm]).sum()).item()
        total_loss += total.item() * x.size(0)
        n += x.size(0)
    return total_loss / max(n, 1), total_correct / max(n, 1)


def NFT_Test(model: nn.Module, criterion, data_loader: Iterable, device=None) -> Tuple[float, float]:
    """``(mean loss, accuracy)`` in eval mode."""
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in data_loader:
            if device is not None:
                x, y = x.to(device), y.to(device)
            out = model(x)
            total_loss += criterion(out, y).item() * x.size(0)
            correct += (out.argmax(1) == y).sum().item()
            n += x.size(0)
    return total_loss / max(n, 1), correct / max(n, 1)


def load_model(net: nn.Module, orig_state_dict: dict) -> nn.Module:
    """Load an unmasked checkpoint into a masked ``net``: every mask starts at 1."""
    if "state_dict" in orig_state_dict:
        orig_state_dict = orig_state_dict["state_dict"]
    new_state_dict = OrderedDict()
    missing = []
    for k, v in net.state_dict().items():
        if k in orig_state_dict:
            new_state_dict[k] = orig_state_dict[k]
        elif "neuron_mask" in k:
            new_state_dict[k] = torch.ones_like(v)
        else:
            missing.append(k)
    if missing:
        raise KeyError(f"load_model: checkpoint lacks {len(missing)} keys, e.g. {missing[:5]}")
    net.load_state_dict(new_state_dict)
    return net


def run_nft(model: nn.Module, clean_set: Dataset, num_classes: int, steps: int = 1000, rounds: int = 5,
            batch_size: int = 128, lr: float = 0.05, momentum: float = 0.95, eta_min: float = 0.02,
            mixup_alpha: float = 1.0, reg_coef: float = 1e-3, floor_alpha: float = 0.8, floor_beta: float = 0.5,
            seed: int = 0, test_loader=None, device=None) -> List[dict]:
    """The whole reference loop: rounds of ``steps/rounds`` steps, each round drawing
    ``steps/rounds * batch_size`` samples with replacement; cosine LR per round."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # data-augmentation transforms draw from the global RNG
    samples_per_class = len(clean_set) / num_classes
    mask_opt = torch.optim.SGD(mask_params(model), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(mask_opt, T_max=rounds, eta_min=eta_min)
    criterion = nn.CrossEntropyLoss()
    history = []
    for r in range(rounds):
        sampler = RandomSampler(clean_set, replacement=True, num_samples=steps // rounds * batch_size, generator=gen)
        loader = DataLoader(clean_set, batch_size=batch_size, sampler=sampler)
        lr_r = mask_opt.param_groups[0]["lr"]
        loss, acc = NFT_Train(model, criterion, mask_opt, loader, samples_per_class, reg_coef, mixup_alpha,
                              floor_alpha, floor_beta, rng, gen, device)
        sched.step()
        entry = {"round": r + 1, "lr": lr_r, "loss": loss, "train_acc": acc}
        if test_loader is not None:
            entry["test_loss"], entry["acc"] = NFT_Test(model, criterion, test_loader, device)
        history.append(entry)
    return history
