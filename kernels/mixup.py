"""Triton kernels of the MixUp ops (see ``nft_fast/ops/mixup.py`` for the semantics).

* ``mixup_batch``: ``out = lam * x + (1 - lam) * x[perm]`` in one pass, reading ``x``
  through its strides and writing ``out`` in the dtype/memory format the caller allocated.
* ``mixup_ce_fwd``: per row, the two-label cross-entropy loss and its logit gradient in one
  pass; the row losses are reduced deterministically (per-program partials, then one sum).
* ``mixup_ce_bwd``: ``dlogits * grad_output``.

``lam`` is either a Python float (kernel scalar) or a 1-element tensor read inside the
kernel, so the same launch can be captured in a CUDA graph and replayed with fresh values.
All arithmetic is fp32.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

_INT32_MAX = 2**31 - 1
_TILE = 2048  # elements per program: ~16 per thread at 4 warps
_MAX_BLOCK_K = 4096  # rows up to this many classes are loaded once; longer rows loop


def _device_ctx(device: torch.device):
    # Triton launches on the current CUDA device; make it the tensors' one.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ----------------------------------------------------------------------------- mixup_batch


@triton.jit
def _mixup_batch_kernel(
    x_ptr, perm_ptr, lam_ptr, lam_val, oml_val, out_ptr,
    B, D0, D1, sxb, sx0, sx1, sob, so0, so1, n_t0, n_t1,
    LAM_FROM_PTR: tl.constexpr, WIDE: tl.constexpr, BLOCK0: tl.constexpr, BLOCK1: tl.constexpr,
):
    # One program = one (sample, tile) of the per-sample [D0, D1] index space.
    pid = tl.program_id(0)
    n_tiles = n_t0 * n_t1
    b = pid // n_tiles
    t = pid % n_tiles
    t0 = t // n_t1
    t1 = t % n_t1
    src = tl.load(perm_ptr + b).to(tl.int64)
    tl.device_assert((src >= 0) & (src < B), "mixup_batch: perm index out of range")
    src = tl.minimum(tl.maximum(src, 0), B - 1)  # never read outside x, even without asserts
    if LAM_FROM_PTR:
        lam_raw = tl.load(lam_ptr)
        lam = lam_raw.to(tl.float32)
        oml = (1.0 - lam_raw).to(tl.float32)  # 1 - lam in lam's own dtype, like torch
    else:
        lam = lam_val
        oml = oml_val  # 1 - lam computed in double on the host, like torch

    offs0 = t0 * BLOCK0 + tl.arange(0, BLOCK0)
    offs1 = t1 * BLOCK1 + tl.arange(0, BLOCK1)
    mask = (offs0 < D0)[:, None] & (offs1 < D1)[None, :]
    if WIDE:  # per-sample extent beyond int32
        offs0 = offs0.to(tl.int64)
        offs1 = offs1.to(tl.int64)
    in_off = offs0[:, None] * sx0 + offs1[None, :] * sx1
    a = tl.load(x_ptr + b.to(tl.int64) * sxb + in_off, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(x_ptr + src * sxb + in_off, mask=mask, other=0.0).to(tl.float32)
    res = lam * a + oml * c
    out_off = b.to(tl.int64) * sob + offs0[:, None] * so0 + offs1[None, :] * so1
    tl.store(out_ptr + out_off, res.to(out_ptr.dtype.element_ty), mask=mask)


def _collapse(shape, in_strides, out_strides):
    """Per-sample dims (all but dim 0) as ``[(size, in_stride, out_stride)]``, size-1 dims
    dropped and logically adjacent dims merged wherever both layouts allow it."""
    merged = []
    for s, si, so in zip(shape[1:], in_strides[1:], out_strides[1:]):
        if s == 1:
            continue
        if merged:
            s0, i0, o0 = merged[-1]
            if i0 == si * s and o0 == so * s:
                merged[-1] = (s0 * s, si, so)
                continue
        merged.append((s, si, so))
    return merged


def mixup_batch(
    x: torch.Tensor, perm: torch.Tensor, lam: float, lam_t: Optional[torch.Tensor],
    dtype: torch.dtype, memory_format: torch.memory_format,
) -> torch.Tensor:
    """``lam * x + (1 - lam) * x[perm]`` as a new ``dtype`` tensor in ``memory_format``.

    ``lam_t`` (1 element, read in-kernel) overrides ``lam`` when given. No validation here.
    """
    out = torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=memory_format)
    if out.numel() == 0:
        return out
    dims = _collapse(x.shape, x.stride(), out.stride())
    if len(dims) > 2:
        # An exotic view (e.g. a permuted or sliced tensor) that no 2-D tile covers:
        # one copy into the output layout makes it collapsible.
        x = x.contiguous(memory_format=memory_format)
        dims = _collapse(x.shape, x.stride(), out.stride())
    dims = [(1, 0, 0)] * (2 - len(dims)) + dims
    (D0, sx0, so0), (D1, sx1, so1) = dims
    extent = max((D0 - 1) * sx0 + (D1 - 1) * sx1, (D0 - 1) * so0 + (D1 - 1) * so1)

    B = x.shape[0]
    BLOCK0 = min(_np2(D0), 64)
    BLOCK1 = min(_np2(D1), max(_TILE // BLOCK0, 1))
    n_t0, n_t1 = triton.cdiv(D0, BLOCK0), triton.cdiv(D1, BLOCK1)
    one_minus = 1.0 - float(lam)
    with _device_ctx(x.device):
        _mixup_batch_kernel[(B * n_t0 * n_t1,)](
            x, perm, lam_t if lam_t is not None else x, float(lam), one_minus, out,
            B, D0, D1, x.stride(0), sx0, sx1, out.stride(0), so0, so1, n_t0, n_t1,
            LAM_FROM_PTR=lam_t is not None, WIDE=extent > _INT32_MAX,
            BLOCK0=BLOCK0, BLOCK1=BLOCK1, num_warps=4,
        )
    return out


# ------------------------------------------------------------------------- mixup cross-entropy


@triton.jit
def _mixup_ce_fwd_kernel(
    z_ptr, y_ptr, perm_ptr, lam_ptr, lam_val, oml_val, dz_ptr, part_ptr, loss_ptr,
    B, K, szb, szk, inv_B,
    LAM_FROM_PTR: tl.constexpr, ONE_BLOCK: tl.constexpr, FINAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program = BLOCK_M rows. Row loss: lse - lam*z[y] - (1-lam)*z[y[perm]];
    # dz = (softmax - lam*onehot(y) - (1-lam)*onehot(y[perm])) / B, stored in fp32.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rows_ld = tl.minimum(rows, B - 1)  # out-of-range rows recompute row B-1; never stored
    lab = tl.load(y_ptr + rows_ld).to(tl.int64)
    src = tl.load(perm_ptr + rows_ld).to(tl.int64)
    tl.device_assert((src >= 0) & (src < B), "mixup_ce: perm index out of range")
    src = tl.minimum(tl.maximum(src, 0), B - 1)
    lab_p = tl.load(y_ptr + src).to(tl.int64)
    tl.device_assert((lab >= 0) & (lab < K) & (lab_p >= 0) & (lab_p < K), "mixup_ce: label out of range")
    if LAM_FROM_PTR:
        lam_raw = tl.load(lam_ptr)
        lam = lam_raw.to(tl.float32)
        oml = (1.0 - lam_raw).to(tl.float32)
    else:
        lam = lam_val
        oml = oml_val

    row_ptr = z_ptr + rows_ld.to(tl.int64) * szb
    # The two target logits (masked so a bad label cannot read outside the row).
    z_y = tl.load(row_ptr + lab * szk, mask=(lab >= 0) & (lab < K), other=0.0).to(tl.float32)
    z_yp = tl.load(row_ptr + lab_p * szk, mask=(lab_p >= 0) & (lab_p < K), other=0.0).to(tl.float32)
    dz_row = dz_ptr + rows.to(tl.int64) * K
    cols = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        cmask = cols < K
        m2 = rmask[:, None] & cmask[None, :]
        z = tl.load(row_ptr[:, None] + cols[None, :] * szk, mask=cmask[None, :], other=float("-inf"))
        z = z.to(tl.float32)
        mx = tl.max(z, 1)
        e = tl.exp(z - mx[:, None])
        s = tl.sum(e, 1)
        hot = tl.where(cols[None, :] == lab[:, None], lam, 0.0) + tl.where(cols[None, :] == lab_p[:, None], oml, 0.0)
        g = (e / s[:, None] - hot) * inv_B
        tl.store(dz_row[:, None] + cols[None, :], g, mask=m2)
    else:
        # Online max/sum over K in blocks, then a second pass for the gradient.
        mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ck = k0 + cols
            z = tl.load(row_ptr[:, None] + ck[None, :] * szk, mask=(ck < K)[None, :], other=float("-inf"))
            z = z.to(tl.float32)
            mx_new = tl.maximum(mx, tl.max(z, 1))
            s = s * tl.exp(mx - mx_new) + tl.sum(tl.exp(z - mx_new[:, None]), 1)
            mx = mx_new
        inv_s = 1.0 / s
        for k0 in range(0, K, BLOCK_K):
            ck = k0 + cols
            cmask = ck < K
            z = tl.load(row_ptr[:, None] + ck[None, :] * szk, mask=cmask[None, :], other=float("-inf"))
            z = z.to(tl.float32)
            hot = tl.where(ck[None, :] == lab[:, None], lam, 0.0) + tl.where(ck[None, :] == lab_p[:, None], oml, 0.0)
            g = (tl.exp(z - mx[:, None]) * inv_s[:, None] - hot) * inv_B
            tl.store(dz_row[:, None] + ck[None, :], g, mask=rmask[:, None] & cmask[None, :])
    row_loss = mx + tl.log(s) - lam * z_y - oml * z_yp
    part = tl.sum(tl.where(rmask, row_loss, 0.0), 0)
    if FINAL:  # a single program: it owns the whole sum
        tl.store(loss_ptr, (part * inv_B).to(loss_ptr.dtype.element_ty))
    else:
        tl.store(part_ptr + pid, part)


@triton.jit
def _sum_scale_kernel(in_ptr, n, scale, out_ptr, BLOCK: tl.constexpr):
    # Single program, fixed reduction order: deterministic.
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, n, BLOCK):
        o = i + tl.arange(0, BLOCK)
        acc += tl.load(in_ptr + o, mask=o < n, other=0.0)
    tl.store(out_ptr, (tl.sum(acc, 0) * scale).to(out_ptr.dtype.element_ty))


def mixup_ce_fwd(
    logits: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam: float,
    lam_t: Optional[torch.Tensor], block_k: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, dlogits)``: the mean mixup CE (fp32 for half logits, else logits' dtype) and
    its fp32 gradient w.r.t. ``logits`` [B, K] for a unit upstream gradient.

    ``block_k`` forces the class-block size (tests use it to exercise the looped path).
    """
    B, K = logits.shape
    loss_dtype = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    loss = torch.empty((), dtype=loss_dtype, device=logits.device)
    dz = torch.empty((B, K), dtype=torch.float32, device=logits.device)
    BLOCK_K = min(_np2(K), _MAX_BLOCK_K) if block_k is None else _np2(block_k)
    BLOCK_K = max(BLOCK_K, 16)
    BLOCK_M = min(max(_TILE // BLOCK_K, 1), _np2(B))
    n_prog = triton.cdiv(B, BLOCK_M)
    part = torch.empty((n_prog,), dtype=torch.float32, device=logits.device)
    one_minus = 1.0 - float(lam)
    with _device_ctx(logits.device):
        _mixup_ce_fwd_kernel[(n_prog,)](
            logits, y, perm, lam_t if lam_t is not None else logits, float(lam), one_minus,
            dz, part, loss, B, K, logits.stride(0), logits.stride(1), 1.0 / B,
            LAM_FROM_PTR=lam_t is not None, ONE_BLOCK=K <= BLOCK_K, FINAL=n_prog == 1,
            BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=8 if BLOCK_M * BLOCK_K > _TILE else 4,
        )
        if n_prog > 1:
            _sum_scale_kernel[(1,)](part, n_prog, 1.0 / B, loss, BLOCK=min(_np2(n_prog), 1024))
    return loss, dz


@triton.jit
def _scale_kernel(g_ptr, d_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr).to(tl.float32)
    d = tl.load(d_ptr + offs, mask=m, other=0.0)
    tl.store(out_ptr + offs, (d * g).to(out_ptr.dtype.element_ty), mask=m)


def mixup_ce_bwd(grad: torch.Tensor, dlogits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dlogits * grad`` (``grad``: the loss's 1-element upstream gradient) as ``dtype``."""
    out = torch.empty(dlogits.shape, dtype=dtype, device=dlogits.device)
    n = dlogits.numel()
    if n == 0:
        return out
    BLOCK = 1024
    with _device_ctx(dlogits.device):
        _scale_kernel[(triton.cdiv(n, BLOCK),)](grad, dlogits, out, n, BLOCK=BLOCK, num_warps=4)
    return out
