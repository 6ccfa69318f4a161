"""Masked LayerNorm: ``y = (gamma * m) * x_hat + beta`` over the normalised shape."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import register, resolve


def masked_layer_norm_torch(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    return F.layer_norm(x, normalized_shape, weight * mask, bias, eps)


register("masked_ln", "torch", masked_layer_norm_torch)


def masked_layer_norm(x: torch.Tensor, normalized_shape: Sequence[int], weight: torch.Tensor, bias: Optional[torch.Tensor],
                      mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Dispatching entry point: ``layer_norm(x, normalized_shape, weight * mask, bias, eps)``."""
    return resolve("masked_ln", x.device)(x, normalized_shape, weight, bias, mask, eps)


# --------------------------------------------------------------------------- triton backend
# Custom ops work on [N, D] views (the wrapper flattens leading dims and the normalized
# dims), so torch.compile(fullgraph=True) sees two opaque ops with fake implementations.


@torch.library.custom_op("nft_fast::masked_ln_fwd", mutates_args=())
def masked_ln_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [N, D] -> (y [N, D] in x's dtype, mean [N] fp32, rstd [N] fp32)."""
    from nft_fast.kernels import masked_layer_norm as K

    return K.masked_ln_forward(x, weight, bias, mask, eps)


@masked_ln_fwd.register_fake
def _(x, weight, bias, mask, eps):
    n, d = x.shape
    return (
        x.new_empty((n, d)),
        x.new_empty((n,), dtype=torch.float32),
        x.new_empty((n,), dtype=torch.float32),
    )


@torch.library.custom_op("nft_fast::masked_ln_bwd", mutates_args=())
def masked_ln_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
    need_dx: bool, need_dweight: bool, need_dmask: bool, need_dbias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dmask, dbias); a gradient not asked for is an empty tensor. dbias is fp32."""
    from nft_fast.kernels import masked_layer_norm as K

    out = K.masked_ln_backward(dy, x, weight, mask, mean, rstd, need_dx, need_dweight, need_dmask, need_dbias)
    empty = x.new_empty((0,))
    return tuple(t if t is not None else empty.clone() for t in out)  # type: ignore[return-value]


@masked_ln_bwd.register_fake
def _(dy, x, weight, mask, mean, rstd, need_dx, need_dweight, need_dmask, need_dbias):
    d = x.shape[1]
    return (
        x.new_empty(tuple(x.shape) if need_dx else (0,)),
        weight.new_empty((d,) if need_dweight else (0,)),
        mask.new_empty((d,) if need_dmask else (0,)),
        x.new_empty((d,) if need_dbias else (0,), dtype=torch.float32),
    )


def _ln_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, mask, _eps = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mask, mean, rstd)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mask, mean, rstd = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dm = ctx.needs_input_grad[:4]
    need_db = need_db and ctx.bias_dtype is not None
    dx, dw, dm, db = masked_ln_bwd(dy, x, weight, mask, mean, rstd, need_dx, need_dw, need_dm, need_db)
    return (
        dx if need_dx else None,
        dw if need_dw else None,
        db.to(ctx.bias_dtype) if need_db else None,
        dm if need_dm else None,
        None,
    )


masked_ln_fwd.register_autograd(_ln_backward, setup_context=_ln_setup_context)


def masked_layer_norm_triton(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Triton masked LayerNorm, same semantics as :func:`masked_layer_norm_torch`.

    A multi-dim ``normalized_shape`` is handled by flattening the trailing dims of ``x``
    (and ``weight``/``mask``/``bias``) into one dim D.
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(s) for s in normalized_shape)
    k = len(shape)
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        raise ValueError(f"masked_layer_norm: input shape {tuple(x.shape)} does not end with normalized_shape {shape}")
    if weight is None or mask is None:
        raise ValueError("masked_layer_norm: weight and mask are required (elementwise_affine LayerNorm)")
    for name, t in (("weight", weight), ("mask", mask), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"masked_layer_norm: {name} shape {tuple(t.shape)} != normalized_shape {shape}")
    d = 1
    for s in shape:
        d *= s
    y, _mean, _rstd = masked_ln_fwd(
        x.reshape(-1, d), weight.reshape(d), bias.reshape(d) if bias is not None else None, mask.reshape(d), float(eps),
    )
    return y.view(x.shape)


register("masked_ln", "triton", masked_layer_norm_triton)
