"""Plain supervised training (used to build backdoored models for demos and tests)."""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .. import layout, resume
from .._loop import progress_bar


def train_classifier(model: nn.Module, data: Dataset, epochs: int = 4, batch_size: int = 64, lr: float = 0.05,
                     momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, progress: bool = True,
                     checkpoint=None) -> nn.Module:
    """SGD with cosine LR over ``epochs``; trains every parameter of ``model`` in place.

    ``checkpoint`` (e.g. a :class:`nft_fast.resume.StateFolder`) saves the training state after
    every epoch (:func:`nft_fast.resume.capture_training`); a state ``checkpoint.load()`` returns
    is continued from, with the same weights at the end, bit for bit, as an uninterrupted run."""
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
    saved = checkpoint.load() if checkpoint is not None else None
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start = 0
        if saved is not None:
            start = resume.restore_training(saved, model, opt, sched, g)
            bar.update(start * len(loader))
            t0 -= saved.meta["seconds"]
        for epoch in range(start, epochs):
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
            if checkpoint is not None:
                checkpoint.save(resume.capture_training(epoch + 1, epochs, model, opt, sched, g,
                                                        time.perf_counter() - t0))
    bar.close()
    model.eval()
    return model
