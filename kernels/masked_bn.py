"""Triton kernels of the masked BatchNorm (+ residual add + ReLU), forward and backward.

``y = act((gamma * m) * x_hat + beta [+ residual])`` over an input seen as ``(N, C, S)``
(``S`` = the flattened spatial dims), read through strides, so NCHW and channels_last
(1d/2d/3d) need no copy. Rows are the ``M = N * S`` positions of one channel.

Forward: a split Welford reduction (each program merges the tiles of a chunk of rows into
per-channel ``(mean, M2)``; a second kernel Chan-merges the chunks, writes ``mean``/``rstd``
and updates the running statistics), then one elementwise pass. Backward: one split
reduction of ``sum(dz)`` and ``sum(dz * x_hat)`` (``dz = dy * [y > 0]`` with ReLU), a
finalize that also emits the mask / weight / bias gradients, and one elementwise pass for
the input (and residual) gradient. Everything accumulates in fp32; only the input, the
output (with ReLU; the next layer saves it anyway) and per-channel statistics are saved.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _row_offsets(r, S, sn, ss):
    n = r // S
    return n.to(tl.int64) * sn + (r - n * S).to(tl.int64) * ss


@triton.jit
def _stats_partial_kernel(x_ptr, pmean_ptr, pm2_ptr, M, C, S, sn, sc, ss, rows_per_prog,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    coff = cols.to(tl.int64) * sc
    start = pid_r * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    # Shift by the chunk's first row: tile sums of x - K stay small when |mean| >> std.
    K = tl.load(x_ptr + _row_offsets(start, S, sn, ss) + coff, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    count = 0.0
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        off = _row_offsets(rows, S, sn, ss)[:, None] + coff[None, :]
        m = rmask[:, None] & cmask[None, :]
        x = tl.where(m, tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32) - K[None, :], 0.0)
        nb = tl.minimum(end - r0, BLOCK_R).to(tl.float32)
        bmean = tl.sum(x, axis=0) / nb
        d = tl.where(m, x - bmean[None, :], 0.0)
        bm2 = tl.sum(d * d, axis=0)
        # Chan et al.: merge the tile's (nb, bmean, bm2) into the chunk's (count, mean, m2).
        tot = count + nb
        delta = bmean - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + bm2 + delta * delta * (count * nb / tot)
        count = tot
    tl.store(pmean_ptr + pid_r * C + cols, mean + K, mask=cmask)
    tl.store(pm2_ptr + pid_r * C + cols, m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr, uvar_ptr,
                           P, M, C, rows_per_prog, eps, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    count = 0.0
    for p in range(0, P):
        nb = tl.minimum(M - p * rows_per_prog, rows_per_prog).to(tl.float32)
        bmean = tl.load(pmean_ptr + p * C + cols, mask=cmask, other=0.0)
        bm2 = tl.load(pm2_ptr + p * C + cols, mask=cmask, other=0.0)
        tot = count + nb
        delta = bmean - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + bm2 + delta * delta * (count * nb / tot)
        count = tot
    var = m2 / count
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=cmask)
    tl.store(uvar_ptr + cols, m2 / tl.maximum(count - 1.0, 1.0), mask=cmask)  # for the running variance


@triton.jit
def _apply_kernel(x_ptr, y_ptr, res_ptr, mean_ptr, rstd_ptr, w_ptr, m_ptr, b_ptr,
                  M, C, S, sn, sc, ss, yn, yc, ys, rn, rc, rs,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    m = rmask[:, None] & cmask[None, :]
    c64 = cols.to(tl.int64)
    x = tl.load(x_ptr + _row_offsets(rows, S, sn, ss)[:, None] + c64[None, :] * sc, mask=m, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
    g = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = g * rstd
    # (x - mean) * scale, not x * scale - mean * scale: the latter cancels catastrophically
    # when |mean| >> std.
    y = (x - mean[None, :]) * scale[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + _row_offsets(rows, S, rn, rs)[:, None] + c64[None, :] * rc, mask=m, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as torch's relu (tl.maximum drops it)
    tl.store(y_ptr + _row_offsets(rows, S, yn, ys)[:, None] + c64[None, :] * yc, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_partial_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, rstd_ptr, psum_ptr, psumx_ptr,
                        M, C, S, sn, sc, ss, dn, dc, ds, yn, yc, ys, rows_per_prog,
                        RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    c64 = cols.to(tl.int64)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
    start = pid_r * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    s_dz = tl.zeros((BLOCK_C,), tl.float32)
    s_dzx = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < end)[:, None] & cmask[None, :]
        dz = tl.load(dy_ptr + _row_offsets(rows, S, dn, ds)[:, None] + c64[None, :] * dc, mask=m, other=0.0).to(tl.float32)
        if RELU:
            y = tl.load(y_ptr + _row_offsets(rows, S, yn, ys)[:, None] + c64[None, :] * yc, mask=m, other=0.0)
            dz = tl.where(y > 0, dz, 0.0)
        x = tl.load(x_ptr + _row_offsets(rows, S, sn, ss)[:, None] + c64[None, :] * sc, mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        s_dz += tl.sum(dz, axis=0)
        s_dzx += tl.sum(dz * xhat, axis=0)
    tl.store(psum_ptr + pid_r * C + cols, s_dz, mask=cmask)
    tl.store(psumx_ptr + pid_r * C + cols, s_dzx, mask=cmask)


@triton.jit
def _bwd_finalize_kernel(psum_ptr, psumx_ptr, sum_ptr, sumx_ptr, w_ptr, m_ptr, dw_ptr, db_ptr, dm_ptr,
                         P, C, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s_dz = tl.zeros((BLOCK_C,), tl.float32)
    s_dzx = tl.zeros((BLOCK_C,), tl.float32)
    for p in range(0, P):
        s_dz += tl.load(psum_ptr + p * C + cols, mask=cmask, other=0.0)
        s_dzx += tl.load(psumx_ptr + p * C + cols, mask=cmask, other=0.0)
    tl.store(sum_ptr + cols, s_dz, mask=cmask)
    tl.store(sumx_ptr + cols, s_dzx, mask=cmask)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    mk = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    # d(gamma*m) = sum(dz * x_hat): the mask gradient is gamma times it, the weight's m times it.
    tl.store(dm_ptr + cols, (w * s_dzx).to(dm_ptr.dtype.element_ty), mask=cmask)
    tl.store(dw_ptr + cols, (mk * s_dzx).to(dw_ptr.dtype.element_ty), mask=cmask)
    tl.store(db_ptr + cols, s_dz.to(db_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd_dx_kernel(dy_ptr, x_ptr, y_ptr, mean_ptr, rstd_ptr, w_ptr, m_ptr, sum_ptr, sumx_ptr, dx_ptr, dres_ptr,
                   M, C, S, sn, sc, ss, dn, dc, ds, yn, yc, ys, on, oc, os, qn, qc, qs, inv_m,
                   RELU: tl.constexpr, BATCH_STATS: tl.constexpr, WRITE_DX: tl.constexpr, WRITE_DRES: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    m = (rows < M)[:, None] & cmask[None, :]
    c64 = cols.to(tl.int64)
    dz = tl.load(dy_ptr + _row_offsets(rows, S, dn, ds)[:, None] + c64[None, :] * dc, mask=m, other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + _row_offsets(rows, S, yn, ys)[:, None] + c64[None, :] * yc, mask=m, other=0.0)
        dz = tl.where(y > 0, dz, 0.0)
    if WRITE_DRES:
        tl.store(dres_ptr + _row_offsets(rows, S, qn, qs)[:, None] + c64[None, :] * qc, dz.to(dres_ptr.dtype.element_ty), mask=m)
    if WRITE_DX:
        rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
        g = (tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
             * tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32))
        if BATCH_STATS:
            mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
            x = tl.load(x_ptr + _row_offsets(rows, S, sn, ss)[:, None] + c64[None, :] * sc, mask=m, other=0.0).to(tl.float32)
            xhat = (x - mean[None, :]) * rstd[None, :]
            mdz = tl.load(sum_ptr + cols, mask=cmask, other=0.0) * inv_m
            mdzx = tl.load(sumx_ptr + cols, mask=cmask, other=0.0) * inv_m
            dx = (g * rstd)[None, :] * (dz - mdz[None, :] - xhat * mdzx[None, :])
        else:
            dx = (g * rstd)[None, :] * dz
        tl.store(dx_ptr + _row_offsets(rows, S, on, os)[:, None] + c64[None, :] * oc, dx.to(dx_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def ncs_strides(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """``(stride_n, stride_c, stride_s)`` when ``t``'s spatial dims flatten to one stride
    (NCHW / channels_last / any dense layout with spatial dims in order), else ``None``."""
    if t.dim() <= 2:
        return (t.stride(0), t.stride(1) if t.dim() == 2 else 1, 1)
    dims = [(n, st) for n, st in zip(t.shape[2:], t.stride()[2:]) if n > 1]  # size-1 dims: any stride
    for (_, st), (n2, st2) in zip(dims, dims[1:]):
        if st != st2 * n2:
            return None
    return (t.stride(0), t.stride(1), dims[-1][1] if dims else 1)


def as_ncs(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """``t`` (or a contiguous copy when its layout cannot be read as (N, C, S)) and its strides."""
    st = ncs_strides(t)
    if st is None:
        t = t.contiguous()
        st = ncs_strides(t)
    return t, st


def _num_programs_target(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def tile(C: int, channels_contiguous: bool) -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_C): wide in channels when they are contiguous (channels_last), tall in
    rows otherwise (NCHW), about 2-4K elements a tile."""
    cp2 = triton.next_power_of_2(C)
    if channels_contiguous:
        bc = min(cp2, 64)
        return max(16, 2048 // bc), bc
    bc = min(cp2, 4)
    return 512, bc


def _split(M: int, C: int, block_r: int, block_c: int, device: torch.device) -> Tuple[int, int]:
    """Rows per program and number of row chunks so that ~4 programs per SM are busy."""
    c_blocks = triton.cdiv(C, block_c)
    want = max(1, _num_programs_target(device) // c_blocks)
    rows_per_prog = max(block_r, triton.cdiv(triton.cdiv(M, want), block_r) * block_r)
    return rows_per_prog, triton.cdiv(M, rows_per_prog)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
            residual: Optional[torch.Tensor], running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
            training: bool, eps: float, relu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd, unbiased_var)``: batch statistics when ``training`` (the caller updates
    the running statistics from ``mean``/``unbiased_var``), else the running statistics."""
    x, (sn, sc, ss) = as_ncs(x)
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // max(N * C, 1)
    M = N * S
    y = torch.empty_like(x)  # same layout as x (dense)
    yn, yc, ys = ncs_strides(y)
    bl_r, bl_c = tile(C, sc == 1 and C > 1)
    mean = torch.empty(C, device=x.device, dtype=torch.float32)
    rstd = torch.empty(C, device=x.device, dtype=torch.float32)
    uvar = torch.empty(C if training else 0, device=x.device, dtype=torch.float32)
    if training:
        rows_per_prog, P = _split(M, C, bl_r, bl_c, x.device)
        pmean = torch.empty((P, C), device=x.device, dtype=torch.float32)
        pm2 = torch.empty_like(pmean)
        _stats_partial_kernel[(P, triton.cdiv(C, bl_c))](x, pmean, pm2, M, C, S, sn, sc, ss, rows_per_prog,
                                                         BLOCK_R=bl_r, BLOCK_C=bl_c)
        fb = min(triton.next_power_of_2(C), 256)
        _stats_finalize_kernel[(triton.cdiv(C, fb),)](pmean, pm2, mean, rstd, uvar, P, M, C, rows_per_prog,
                                                      float(eps), BLOCK_C=fb)
    else:
        mean.copy_(running_mean)
        torch.rsqrt(running_var.float() + eps, out=rstd)
    if residual is not None:
        if ncs_strides(residual) is None:
            residual = residual.contiguous()
        rn, rc, rs = ncs_strides(residual)
    else:
        rn = rc = rs = 0
    grid = (triton.cdiv(M, bl_r), triton.cdiv(C, bl_c))
    _apply_kernel[grid](x, y, residual if residual is not None else x, mean, rstd, weight, mask,
                        bias if bias is not None else weight, M, C, S, sn, sc, ss, yn, yc, ys, rn, rc, rs,
                        HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu,
                        BLOCK_R=bl_r, BLOCK_C=bl_c)
    return y, mean, rstd, uvar


def backward(dy: torch.Tensor, x: torch.Tensor, y: Optional[torch.Tensor], weight: torch.Tensor, mask: torch.Tensor,
             mean: torch.Tensor, rstd: torch.Tensor, training: bool, relu: bool, need_dx: bool, need_dres: bool
             ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dresidual, dweight, dbias, dmask)``; dx / dresidual are None unless asked."""
    x, (sn, sc, ss) = as_ncs(x)
    dy, (dn, dc, ds) = as_ncs(dy)
    if relu:
        y, (yn, yc, ys) = as_ncs(y)
    else:
        y, yn, yc, ys = x, 0, 0, 0
    N, C = x.shape[0], x.shape[1]
    S = x.numel() // max(N * C, 1)
    M = N * S
    bl_r, bl_c = tile(C, sc == 1 and C > 1)
    rows_per_prog, P = _split(M, C, bl_r, bl_c, x.device)
    psum = torch.empty((P, C), device=x.device, dtype=torch.float32)
    psumx = torch.empty_like(psum)
    _bwd_partial_kernel[(P, triton.cdiv(C, bl_c))](dy, x, y, mean, rstd, psum, psumx, M, C, S, sn, sc, ss,
                                                   dn, dc, ds, yn, yc, ys, rows_per_prog,
                                                   RELU=relu, BLOCK_R=bl_r, BLOCK_C=bl_c)
    s_dz = torch.empty(C, device=x.device, dtype=torch.float32)
    s_dzx = torch.empty_like(s_dz)
    dw, db, dm = torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(mask)
    fb = min(triton.next_power_of_2(C), 256)
    _bwd_finalize_kernel[(triton.cdiv(C, fb),)](psum, psumx, s_dz, s_dzx, weight, mask, dw, db, dm, P, C, BLOCK_C=fb)
    dx = torch.empty_like(x) if need_dx else None
    dres = torch.empty_like(x) if need_dres else None
    if need_dx or need_dres:
        on, oc, os_ = ncs_strides(dx) if dx is not None else (0, 0, 0)
        qn, qc, qs = ncs_strides(dres) if dres is not None else (0, 0, 0)
        grid = (triton.cdiv(M, bl_r), triton.cdiv(C, bl_c))
        _bwd_dx_kernel[grid](dy, x, y, mean, rstd, weight, mask, s_dz, s_dzx,
                             dx if dx is not None else s_dz, dres if dres is not None else s_dz,
                             M, C, S, sn, sc, ss, dn, dc, ds, yn, yc, ys, on, oc, os_, qn, qc, qs, 1.0 / M,
                             RELU=relu, BATCH_STATS=training, WRITE_DX=need_dx, WRITE_DRES=need_dres,
                             BLOCK_R=bl_r, BLOCK_C=bl_c)
    return dx, dres, dw, db, dm
