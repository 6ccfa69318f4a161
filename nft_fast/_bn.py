"""BatchNorm bookkeeping shared by every masked BN (mirrors ``nn.modules.batchnorm._BatchNorm.forward``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch


def bn_forward_args(bn) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], bool, float]:
    """Count the batch and return ``(running_mean, running_var, use_batch_stats, momentum)``."""
    eaf = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        eaf = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_stats = not bn.training or bn.track_running_stats
    return (bn.running_mean if use_stats else None, bn.running_var if use_stats else None, bn_training, eaf)


def norm_act(norm: torch.nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
             relu: bool = True) -> torch.Tensor:
    """``relu(norm(x) + residual)`` (each part optional). A masked BatchNorm runs it as one
    fused op (one pass on the triton backend); hooks on ``norm`` keep the plain call so they fire."""
    fused = getattr(norm, "forward_fused", None)
    if fused is not None and not (norm._forward_hooks or norm._forward_pre_hooks):
        return fused(x, residual, relu)
    y = norm(x)
    if residual is not None:
        y = y + residual
    return torch.nn.functional.relu(y) if relu else y


def bn_buffers(model: torch.nn.Module) -> List[torch.Tensor]:
    """Every BatchNorm buffer of ``model`` (running mean/var, batch counter)."""
    return [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


@contextmanager
def kept(buffers: List[torch.Tensor]) -> Iterator[None]:
    """Restore ``buffers`` to their values at entry when the block exits (BN statistics left
    untouched by extra train-mode forwards). Exit after any backward through those forwards:
    batch_norm saves the running buffers for its backward."""
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)
