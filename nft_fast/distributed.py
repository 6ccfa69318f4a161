"""Data-parallel purification on ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

Every rank holds the model and the masks and reads the same global batch (the same sampler,
transforms and MixUp draw as one process), then computes the forward and backward of its own
contiguous shard of rows. BatchNorm layers in training use the statistics of the global batch
(:func:`sync_batch_norm`: one all-reduce of per-channel sums forward, one backward), and the
flat mask-gradient buffer, with the step's loss values appended, is all-reduced once per
step, so every rank applies the same update and N ranks reproduce one process's result.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

__all__ = ["World", "world", "is_writer", "from_env", "synced", "active_world", "sync_batch_norm", "all_reduce_sum"]


@dataclass(frozen=True)
class World:
    """The process group a purification runs on: ``size`` ranks, this one being ``rank``."""

    rank: int
    size: int
    group: Optional[object] = None  # None: the default group
    backend: str = ""


def world(group=None) -> Optional[World]:
    """The initialised process group (``group``, else the default one) when it has more than
    one rank; None for a single process (plain purification)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    if size < 2:
        return None
    return World(dist.get_rank(group), size, group, str(dist.get_backend(group)))


def is_writer(group=None) -> bool:
    """True on the rank that writes outputs: rank 0, or the only process."""
    w = world(group)
    return w is None or w.rank == 0


def _launched() -> bool:
    """True when a launcher such as ``torchrun`` started several processes (``WORLD_SIZE`` > 1)."""
    size = os.environ.get("WORLD_SIZE", "1")
    return size.isdigit() and int(size) > 1


@contextlib.contextmanager
def from_env(backend: str = "gloo") -> Iterator[Optional[World]]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), the default process group for
    the block (initialised here unless it already is, and destroyed on exit if initialised
    here); yields its :class:`World`, or None for a single process."""
    if not _launched() or not dist.is_available():
        yield world()
        return
    own = not dist.is_initialized()
    if own:
        dist.init_process_group(backend)
    try:
        yield world()
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(t: Tensor, w: World) -> Tensor:
    """``t`` summed over the ranks, in place (returned for chaining)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=w.group)
    return t


_state = threading.local()


def active_world() -> Optional[World]:
    """The world of the enclosing :func:`synced` block, or None."""
    return getattr(_state, "world", None)


@contextlib.contextmanager
def synced(model: nn.Module, w: World) -> Iterator[None]:
    """Inside the block, every BatchNorm of ``model`` in training mode normalises with the
    statistics of the global batch (the masked ones through :func:`nft_fast.ops.masked_batch_norm`,
    plain ones through a temporary forward); outside it nothing changes."""
    plain = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not hasattr(m, "neuron_mask") and "forward" not in m.__dict__]
    for m in plain:
        m.forward = _plain_forward.__get__(m)
    prev, _state.world = active_world(), w
    try:
        yield
    finally:
        _state.world = prev
        for m in plain:
            del m.forward


def _plain_forward(self: nn.Module, x: Tensor) -> Tensor:
    from ._bn import bn_forward_args

    w = active_world()
    if w is None or not self.training:  # the module's own forward
        return type(self).forward(self, x)
    rm, rv, _, eaf = bn_forward_args(self)  # in training: batch statistics, whatever the buffers
    ones = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
    return sync_batch_norm(x, rm, rv, self.weight, self.bias, ones, eaf, self.eps, None, False, w)


class _SyncBN(torch.autograd.Function):
    # Big tensors stay in their (fp32) dtype, every sum over them accumulates in float64 (as the
    # fused kernels do): per-rank mean and variance in two passes (torch.var_mean is many times
    # slower on CPU), combined across ranks on C-sized float64 vectors.
    @staticmethod
    def forward(ctx, x, weight, bias, mask, residual, running_mean, running_var, momentum, eps, relu, w):
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        C = x.shape[1]
        count = x.numel() // C
        xc = x if x.dtype in (torch.float32, torch.float64) else x.float()
        m = xc.sum(dims, dtype=torch.float64) / count
        var_l = (xc - m.to(xc.dtype).view(shape)).square_().sum(dims, dtype=torch.float64) / count
        stats = torch.cat([m * count, (var_l.double() + m * m) * count, m.new_full((1,), count)])
        all_reduce_sum(stats, w)
        n = float(stats[-1])
        mean = stats[:C] / n
        var = (stats[C:2 * C] / n - mean * mean).clamp_min(0)
        rstd = (var + eps).rsqrt()
        g = (mask if weight is None else weight * mask).double()
        scale = (g * rstd).to(xc.dtype)
        centred = xc - mean.to(xc.dtype).view(shape)
        y = centred * scale.view(shape)
        if bias is not None:
            y = y + bias.to(xc.dtype).view(shape)
        y = y.to(x.dtype)
        if residual is not None:
            y = y + residual
        if relu:
            y = torch.relu(y)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # .data: earlier graphs that saved the buffers stay valid
                running_mean.data.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.data.lerp_((var * n / max(n - 1.0, 1.0)).to(running_var.dtype), momentum)
        ctx.save_for_backward(centred, rstd.to(xc.dtype), scale, weight, mask, y if relu else None)
        ctx.meta = (dims, shape, n, relu, residual is not None, w)
        return y

    @staticmethod
    def backward(ctx, dy):
        centred, rstd, scale, weight, mask, y = ctx.saved_tensors
        dims, shape, n, relu, has_res, w = ctx.meta
        if relu:
            dy = dy * (y > 0)
        dyc = dy if dy.dtype == centred.dtype else dy.to(centred.dtype)
        sum_dy = dyc.sum(dims, dtype=torch.float64)
        sum_dyx = (centred * dyc).sum(dims, dtype=torch.float64) * rstd.double()  # sum of dy * x_hat
        dmask = (sum_dyx if weight is None else weight.double() * sum_dyx).to(mask.dtype)
        dweight = None if weight is None else (mask.double() * sum_dyx).to(weight.dtype)
        dbias = sum_dy.to(dy.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            both = all_reduce_sum(torch.cat([sum_dy, sum_dyx]), w)  # the global batch's sums
            C = scale.numel()
            k_dy = (scale.double() * both[:C] / n).to(centred.dtype)
            k_x = (scale.double() * rstd.double() * both[C:] / n).to(centred.dtype)
            dx = (dyc * scale.view(shape) - centred * k_x.view(shape) - k_dy.view(shape)).to(dy.dtype)
        return (dx, dweight, dbias, dmask, dy if has_res else None, None, None, None, None, None, None)


def sync_batch_norm(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor],
                    bias: Optional[Tensor], mask: Tensor, momentum: float, eps: float, residual: Optional[Tensor],
                    relu: bool, w: World) -> Tensor:
    """Masked BatchNorm in training with the statistics of the global batch: ``act((gamma * m) *
    x_hat + beta [+ residual])``, ``x_hat`` normalised by the mean and biased variance over every
    rank's rows (float64 sums), the running statistics updated with the global mean and unbiased
    variance. The gradients of ``gamma``, ``beta`` and ``m`` are this rank's share (summed over
    ranks by the caller, e.g. the mask-gradient all-reduce); the input gradient is exact."""
    return _SyncBN.apply(x, weight, bias, mask, residual, running_mean, running_var, momentum, eps, relu, w)
