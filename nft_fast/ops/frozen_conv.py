"""Convolutions with a frozen weight that keep only the weight for backward.

Autograd's convolution saves its input for the weight gradient even when the weight is
frozen. NFT trains masks on a frozen network, so every unmasked convolution would hold its
whole input activation for nothing: :func:`frozen_conv` saves only the weight and computes
only the data gradient (and the bias gradient, a cheap channel sum, if the bias trains).
:func:`freeze_convs` switches a model's eligible ``nn.Conv{1,2,3}d`` modules to it in place.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

_IntOrSeq = Union[int, Sequence[int]]


def _tuple(v: _IntOrSeq, n: int) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"frozen_conv: expected {n} values, got {v}")
    return v


def _input_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class _FrozenConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        # F.conv*d rather than aten.convolution: autocast applies to it as to the plain module.
        y = _CONV_FN[len(stride)](x, weight, bias, stride, padding, dilation, groups)
        # Only the weight (a parameter, alive anyway) and the input's metadata are kept.
        ctx.save_for_backward(weight)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.x_shape, ctx.x_format, ctx.x_dtype = tuple(x.shape), _input_format(x), x.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        (weight,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        dx = db = None
        if ctx.needs_input_grad[0]:
            # The convolution reads only the input's shape here (as torch.nn.grad.conv*_input does).
            x_meta = dy.new_empty(1).expand(ctx.x_shape)
            # Under autocast the forward ran in a lower precision: dy has that dtype, the weight not.
            w = weight if weight.dtype == dy.dtype else weight.to(dy.dtype)
            dx = torch.ops.aten.convolution_backward(
                dy, x_meta, w, None, stride, padding, dilation, False, [0] * len(stride), groups,
                [True, False, False])[0].to(ctx.x_dtype)
            # Autograd's conv gives a channels_last input a channels_last gradient (the backend
            # picks it from the weight's layout too, and so it does here).
            if ctx.x_format != torch.contiguous_format and not dx.is_contiguous(memory_format=ctx.x_format):
                dx = dx.contiguous(memory_format=ctx.x_format)
        if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy.sum(dim=[d for d in range(dy.dim()) if d != 1], dtype=torch.float32).to(ctx.b_dtype)
        return dx, None, db, None, None, None, None


def frozen_conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: _IntOrSeq = 1, padding: _IntOrSeq = 0,
    dilation: _IntOrSeq = 1, groups: int = 1,
) -> Tensor:
    """``F.conv{1,2,3}d(x, weight, bias, ...)`` for a frozen ``weight``, saving only the weight.

    ``x`` is [N, C, *spatial] with 1-3 spatial dims (unbatched input is not supported);
    ``padding`` is numeric (zeros). Raises ValueError if ``weight`` requires grad.
    """
    if weight.requires_grad:
        raise ValueError("frozen_conv: the weight requires grad; frozen_conv never computes a weight "
                         "gradient (freeze it with weight.requires_grad_(False), or use the plain convolution)")
    nd = weight.dim() - 2
    if nd not in (1, 2, 3) or x.dim() != nd + 2:
        raise ValueError(f"frozen_conv: expected a batched {nd}d input [N, C, ...] of {nd + 2} dims "
                         f"for weight {tuple(weight.shape)}, got {tuple(x.shape)}")
    if isinstance(padding, str):
        raise ValueError("frozen_conv: string padding is not supported; give it as numbers")
    conf = (_tuple(stride, nd), _tuple(padding, nd), _tuple(dilation, nd), int(groups))
    trains_bias = bias is not None and bias.requires_grad
    if not (torch.is_grad_enabled() and (x.requires_grad or trains_bias)):
        # No autograd node at all: the plain op saves nothing either.
        return _CONV_FN[nd](x, weight, bias, *conf)
    return _FrozenConv.apply(x, weight, bias, *conf)


def _numeric_padding(m: nn.Module) -> Optional[Tuple[int, ...]]:
    """The module's padding as numbers, or None if it cannot be symmetric zeros padding."""
    if not isinstance(m.padding, str):
        return tuple(m.padding)
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    # 'same' (stride 1): symmetric only when every dilation * (k - 1) is even.
    total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
    return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None


class _FrozenConvMixin:
    """``forward`` through :func:`frozen_conv`; parameters, buffers and ``state_dict`` unchanged."""

    def forward(self, input: Tensor) -> Tensor:
        return frozen_conv(input, self.weight, self.bias, self.stride, _numeric_padding(self), self.dilation,
                           self.groups)


class FrozenConv1d(_FrozenConvMixin, nn.Conv1d):
    pass


class FrozenConv2d(_FrozenConvMixin, nn.Conv2d):
    pass


class FrozenConv3d(_FrozenConvMixin, nn.Conv3d):
    pass


_FROZEN = {nn.Conv1d: FrozenConv1d, nn.Conv2d: FrozenConv2d, nn.Conv3d: FrozenConv3d}
_THAWED = {v: k for k, v in _FROZEN.items()}


def _eligible(m: nn.Module) -> bool:
    # Exact classes only: a user subclass may override forward, and masked convolutions
    # (holding a neuron_mask) have their own forward.
    return (type(m) in _FROZEN and m.padding_mode == "zeros" and not m.weight.requires_grad
            and "neuron_mask" not in m._parameters and _numeric_padding(m) is not None)


def freeze_convs(model: nn.Module) -> int:
    """Switch every eligible ``nn.Conv{1,2,3}d`` of ``model`` to :func:`frozen_conv`, in place.

    Eligible: exactly ``nn.Conv1d/2d/3d`` (not transposed, not a subclass), ``padding_mode``
    'zeros', a weight that does not require grad, no ``neuron_mask`` parameter, and padding
    that is numeric, 'valid' or a symmetric 'same'. Returns how many modules were switched.
    """
    n = 0
    for m in model.modules():
        if _eligible(m):
            m.__class__ = _FROZEN[type(m)]
            n += 1
    return n


def thaw_convs(model: nn.Module) -> int:
    """Undo :func:`freeze_convs`: switch every frozen convolution back to its torch class."""
    n = 0
    for m in model.modules():
        if type(m) in _THAWED:
            m.__class__ = _THAWED[type(m)]
            n += 1
    return n
