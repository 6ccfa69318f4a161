"""Plain supervised training (used to build backdoored models for demos and tests)."""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import layout
from .._loop import progress_bar


def train_classifier(model: nn.Module, data: Dataset, epochs: int = 4, batch_size: int = 64, lr: float = 0.05,
                     momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, progress: bool = True) -> nn.Module:
    """SGD with cosine LR over ``epochs``; trains every parameter of ``model`` in place."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    bar = progress_bar(epochs * len(loader), "train", progress)
    # channels_last convolutions are faster on CPU and GPU (the state dict is unaffected).
    channels_last = layout.wants_channels_last(model)
    if channels_last:
        layout.to_channels_last(model, restride_1x1=True)  # also guards against the oneDNN AVX2 bug
    else:
        layout.guard_convs(model)
    device = next(model.parameters()).device
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                x = layout.like_model(x, channels_last)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()
    return model
