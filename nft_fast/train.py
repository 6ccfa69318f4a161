"""Plain supervised training (used to build backdoored models for demos and tests)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import layout


def train_classifier(model: nn.Module, data: Dataset, epochs: int = 4, batch_size: int = 64, lr: float = 0.05,
                     momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, progress: bool = True) -> nn.Module:
    """SGD with cosine LR over ``epochs``; trains every parameter of ``model`` in place."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * len(loader), desc="train", unit="step", dynamic_ncols=True, disable=None)
    # channels_last convolutions are faster on CPU and GPU (the state dict is unaffected).
    channels_last = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if channels_last:
        model.to(memory_format=torch.channels_last)
    layout.guard_convs(model)  # every weight trains: keep clear of the oneDNN bug (nft_fast.layout)
    device = next(model.parameters()).device
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return model
