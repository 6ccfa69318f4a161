"""Triton kernels for the masked LayerNorm ``y = (w * m) * x_hat + b`` over the last dim D.

Inputs are viewed as ``[N, D]`` (N rows = product of the leading dims). Two code paths:

* fused (``next_pow2(D) <= MAX_FUSED_BLOCK_D``, the ViT case): a program holds a tile of
  ``ROWS`` whole rows in registers, so x and dy are read once per pass;
* looped (large D, e.g. a flattened multi-dim normalized shape): rows are walked in
  chunks of ``BLOCK_D`` columns, statistics in separate passes over the chunks.

Backward per-feature sums ``sum_rows(dy * x_hat)`` and ``sum_rows(dy)`` are a split
reduction: each program of the backward grid owns a contiguous group of rows and writes
its partial sums to row ``pid`` of a ``[G, D]`` fp32 buffer; ``_reduce_kernel`` sums the
G partials and applies the mask/weight products. No atomics, so results are deterministic.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# Largest power-of-two row width kept whole in registers; wider rows take the looped path.
# Module-level so tests can lower it to exercise the looped kernels on small shapes.
MAX_FUSED_BLOCK_D = 8192
# Column chunk of the looped path.
LOOPED_BLOCK_D = 1024
# Elements per program tile (rows * padded columns) the launchers aim for.
_TILE_ELEMS = 4096

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _gamma(W, M, cols, cmask):
    """Effective gamma ``weight * mask`` in fp32 for columns ``cols``."""
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    return w * tl.load(M + cols, mask=cmask, other=0.0).to(tl.float32)


@triton.jit
def _fwd_fused_kernel(
    X, W, M, B, Y, MEAN, RSTD, N, D, eps,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    mask2 = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]

    x = tl.load(X + offs, mask=mask2, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask2, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)

    g = _gamma(W, M, cols, cmask)
    y = xc * rstd[:, None] * g[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask2)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _fwd_looped_kernel(
    X, W, M, B, Y, MEAN, RSTD, N, D, eps,
    HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < N
    base = rows.to(tl.int64)[:, None] * D
    # Two passes (mean, then centred second moment) for the same stability as the fused path.
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask2 = rmask[:, None] & (cols < D)[None, :]
        acc += tl.load(X + base + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / D
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        mask2 = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(X + base + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
        xc = tl.where(mask2, x - mean[:, None], 0.0)
        acc += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / D + eps)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask2 = rmask[:, None] & cmask[None, :]
        x = tl.load(X + base + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
        g = _gamma(W, M, cols, cmask)
        y = (x - mean[:, None]) * rstd[:, None] * g[None, :]
        if HAS_BIAS:
            y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + base + cols[None, :], y.to(Y.dtype.element_ty), mask=mask2)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _bwd_fused_kernel(
    DY, X, W, M, MEAN, RSTD, DX, P1, P2, N, D, rows_per_prog,
    NEED_DX: tl.constexpr, NEED_DG: tl.constexpr, NEED_DB: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows [pid*rows_per_prog, +rows_per_prog): dx, and partial column sums into P1/P2[pid]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if NEED_DX:
        g = _gamma(W, M, cols, cmask)
    acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < row_end
        mask2 = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        dy = tl.load(DY + offs, mask=mask2, other=0.0).to(tl.float32)
        if NEED_DX or NEED_DG:
            x = tl.load(X + offs, mask=mask2, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            # Padded rows/cols load x = 0 and dy = 0, so x_hat there is finite and dy*x_hat is 0.
            xhat = tl.where(mask2, (x - mean[:, None]) * rstd[:, None], 0.0)
            if NEED_DG:
                acc1 += tl.sum(dy * xhat, axis=0)
            if NEED_DX:
                wdy = dy * g[None, :]
                c1 = tl.sum(xhat * wdy, axis=1) / D
                c2 = tl.sum(wdy, axis=1) / D
                dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask2)
        if NEED_DB:
            acc2 += tl.sum(dy, axis=0)
    if NEED_DG:
        tl.store(P1 + pid * D + cols, acc1, mask=cmask)
    if NEED_DB:
        tl.store(P2 + pid * D + cols, acc2, mask=cmask)


@triton.jit
def _bwd_dx_looped_kernel(
    DY, X, W, M, MEAN, RSTD, DX, N, D,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < N
    base = rows.to(tl.int64)[:, None] * D
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    a1 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    a2 = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask2 = rmask[:, None] & cmask[None, :]
        dy = tl.load(DY + base + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
        x = tl.load(X + base + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
        g = _gamma(W, M, cols, cmask)
        wdy = dy * g[None, :]
        a1 += tl.where(mask2, (x - mean[:, None]) * rstd[:, None], 0.0) * wdy
        a2 += wdy
    c1 = tl.sum(a1, axis=1) / D
    c2 = tl.sum(a2, axis=1) / D
    for c0 in range(0, D, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        mask2 = rmask[:, None] & cmask[None, :]
        dy = tl.load(DY + base + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
        x = tl.load(X + base + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
        g = _gamma(W, M, cols, cmask)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dx = (dy * g[None, :] - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + base + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask2)


@triton.jit
def _bwd_partial_looped_kernel(
    DY, X, MEAN, RSTD, P1, P2, N, D, rows_per_prog,
    NEED_DG: tl.constexpr, NEED_DB: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (G, column chunks): partial column sums of one row group over one column chunk."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, N)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < row_end
        mask2 = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        dy = tl.load(DY + offs, mask=mask2, other=0.0).to(tl.float32)
        if NEED_DG:
            x = tl.load(X + offs, mask=mask2, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            acc1 += tl.sum(dy * (x - mean[:, None]) * rstd[:, None], axis=0)
        if NEED_DB:
            acc2 += tl.sum(dy, axis=0)
    if NEED_DG:
        tl.store(P1 + pid * D + cols, acc1, mask=cmask)
    if NEED_DB:
        tl.store(P2 + pid * D + cols, acc2, mask=cmask)


@triton.jit
def _reduce_kernel(
    P1, P2, W, M, DW, DM, DB, G, D,
    NEED_DW: tl.constexpr, NEED_DM: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the [G, D] partials over G; dweight = m * s1, dmask = w * s1, dbias = s2."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < D
    acc1 = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        mask2 = (gs < G)[:, None] & cmask[None, :]
        offs = gs.to(tl.int64)[:, None] * D + cols[None, :]
        if NEED_DW or NEED_DM:
            acc1 += tl.load(P1 + offs, mask=mask2, other=0.0)
        if NEED_DB:
            acc2 += tl.load(P2 + offs, mask=mask2, other=0.0)
    if NEED_DW or NEED_DM:
        s1 = tl.sum(acc1, axis=0)
        if NEED_DW:
            m = tl.load(M + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(DW + cols, (m * s1).to(DW.dtype.element_ty), mask=cmask)
        if NEED_DM:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(DM + cols, (w * s1).to(DM.dtype.element_ty), mask=cmask)
    if NEED_DB:
        tl.store(DB + cols, tl.sum(acc2, axis=0), mask=cmask)


# --------------------------------------------------------------------------- launchers


def _check_device(*ts: torch.Tensor) -> None:
    dev = ts[0].device
    for t in ts:
        if t.device != dev:
            raise ValueError(f"masked_layer_norm: all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise ValueError(
                f"masked_layer_norm (triton): tensors on {dev} need a CUDA device, "
                "or TRITON_INTERPRET=1 set before triton is imported"
            )


def _check_2d(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor]) -> int:
    if x.dim() != 2:
        raise ValueError(f"masked_layer_norm: x must be [N, D], got shape {tuple(x.shape)}")
    d = x.shape[1]
    if d == 0:
        raise ValueError("masked_layer_norm: the normalized size D must be > 0")
    for name, t in (("x", x), ("weight", weight), ("mask", mask), ("bias", bias)):
        if t is None:
            continue
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"masked_layer_norm: {name} must be float32/bfloat16/float16, got {t.dtype}")
        if name != "x" and tuple(t.shape) != (d,):
            raise ValueError(f"masked_layer_norm: {name} must have shape ({d},), got {tuple(t.shape)}")
    return d


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        # Cached by torch after the first call: no synchronisation.
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, so the per-program row loop is exercised


def _fused(d: int) -> bool:
    return triton.next_power_of_2(d) <= MAX_FUSED_BLOCK_D


def _row_tile(n: int, block_d: int, min_programs: int) -> int:
    """Rows per tile: about _TILE_ELEMS elements, but not so many that the grid starves."""
    rows = max(1, _TILE_ELEMS // block_d)
    rows = min(rows, triton.next_power_of_2(max(n, 1)))
    while rows > 1 and triton.cdiv(n, rows) < min_programs:
        rows //= 2
    return rows


def _warps(elems: int) -> int:
    # ~16 fp32 elements per thread and tensor: 4096-element tiles -> 8 warps.
    return max(1, min(16, elems // 512))


def masked_ln_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of ``x`` [N, D] with gamma ``weight * mask``: returns (y, mean, rstd), stats fp32 [N]."""
    d = _check_2d(x, weight, mask, bias)
    _check_device(*(t for t in (x, weight, mask, bias) if t is not None))
    x, weight, mask = x.contiguous(), weight.contiguous(), mask.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n = x.shape[0]
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    mean = torch.empty((n,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n,), dtype=torch.float32, device=x.device)
    if n == 0:
        return y, mean, rstd
    b = bias if bias is not None else weight  # never read when HAS_BIAS is False
    if _fused(d):
        block_d = triton.next_power_of_2(d)
        rows = _row_tile(n, block_d, _num_sms(x.device))
        _fwd_fused_kernel[(triton.cdiv(n, rows),)](
            x, weight, mask, b, y, mean, rstd, n, d, float(eps),
            HAS_BIAS=bias is not None, ROWS=rows, BLOCK_D=block_d, num_warps=_warps(rows * block_d),
        )
    else:
        block_d = min(LOOPED_BLOCK_D, triton.next_power_of_2(d))
        rows = _row_tile(n, block_d, _num_sms(x.device))
        _fwd_looped_kernel[(triton.cdiv(n, rows),)](
            x, weight, mask, b, y, mean, rstd, n, d, float(eps),
            HAS_BIAS=bias is not None, ROWS=rows, BLOCK_D=block_d, num_warps=_warps(rows * block_d),
        )
    return y, mean, rstd


def masked_ln_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
    need_dx: bool, need_dweight: bool, need_dmask: bool, need_dbias: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients (dx, dweight, dmask, dbias) of :func:`masked_ln_forward`; None where not asked.

    dx is in x's dtype, dweight/dmask in weight's/mask's dtype, dbias float32.
    """
    d = _check_2d(x, weight, mask, None)
    if dy.shape != x.shape:
        raise ValueError(f"masked_layer_norm: dy shape {tuple(dy.shape)} != x shape {tuple(x.shape)}")
    n = x.shape[0]
    if mean.shape != (n,) or rstd.shape != (n,) or mean.dtype != torch.float32 or rstd.dtype != torch.float32:
        raise ValueError("masked_layer_norm: mean and rstd must be float32 of shape (N,)")
    _check_device(dy, x, weight, mask, mean, rstd)
    dy, x, weight, mask = dy.contiguous(), x.contiguous(), weight.contiguous(), mask.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    dev = x.device
    dx = torch.empty((n, d), dtype=x.dtype, device=dev) if need_dx else None
    dw = torch.empty((d,), dtype=weight.dtype, device=dev) if need_dweight else None
    dm = torch.empty((d,), dtype=mask.dtype, device=dev) if need_dmask else None
    db = torch.empty((d,), dtype=torch.float32, device=dev) if need_dbias else None
    need_dg = need_dweight or need_dmask
    if n == 0:
        for t in (dw, dm, db):
            if t is not None:
                t.zero_()
        return dx, dw, dm, db
    if not (need_dx or need_dg or need_dbias):
        return dx, dw, dm, db

    sms = _num_sms(dev)
    fused = _fused(d)
    block_d = triton.next_power_of_2(d) if fused else min(LOOPED_BLOCK_D, triton.next_power_of_2(d))
    rows = _row_tile(n, block_d, sms)
    # Row groups for the split reduction: a few per SM; each program loops over its group.
    tiles = triton.cdiv(n, rows)
    tiles_per_prog = triton.cdiv(tiles, 4 * sms)
    rows_per_prog = tiles_per_prog * rows
    groups = triton.cdiv(n, rows_per_prog)
    p1 = torch.empty((groups, d), dtype=torch.float32, device=dev) if need_dg else None
    p2 = torch.empty((groups, d), dtype=torch.float32, device=dev) if need_dbias else None
    dummy = mean  # placeholder pointer for buffers a constexpr flag says are never touched
    warps = _warps(rows * block_d)

    if fused:
        _bwd_fused_kernel[(groups,)](
            dy, x, weight, mask, mean, rstd,
            dx if dx is not None else dummy, p1 if p1 is not None else dummy, p2 if p2 is not None else dummy,
            n, d, rows_per_prog,
            NEED_DX=need_dx, NEED_DG=need_dg, NEED_DB=need_dbias, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
        )
    else:
        if need_dx:
            _bwd_dx_looped_kernel[(tiles,)](
                dy, x, weight, mask, mean, rstd, dx, n, d, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
            )
        if need_dg or need_dbias:
            _bwd_partial_looped_kernel[(groups, triton.cdiv(d, block_d))](
                dy, x, mean, rstd, p1 if p1 is not None else dummy, p2 if p2 is not None else dummy,
                n, d, rows_per_prog,
                NEED_DG=need_dg, NEED_DB=need_dbias, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
            )

    if need_dg or need_dbias:
        block_n = min(64, triton.next_power_of_2(d))
        block_g = max(1, min(64, triton.next_power_of_2(groups)))
        _reduce_kernel[(triton.cdiv(d, block_n),)](
            p1 if p1 is not None else dummy, p2 if p2 is not None else dummy, weight, mask,
            dw if dw is not None else dummy, dm if dm is not None else dummy, db if db is not None else dummy,
            groups, d,
            NEED_DW=need_dweight, NEED_DM=need_dmask, NEED_DB=need_dbias,
            BLOCK_G=block_g, BLOCK_N=block_n, num_warps=4,
        )
    return dx, dw, dm, db
