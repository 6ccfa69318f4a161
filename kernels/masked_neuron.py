"""Triton kernels for the norm-free mask sites: ``y = (W x) * m + b`` on Linear and Conv outputs.

Linear: a tiled GEMM with the mask and bias in the epilogue (it also writes the pre-mask
``z = x W^T`` that ``dm`` needs), a second GEMM for ``dx = (dy * m) W`` with the mask applied
while ``dy`` is loaded, and a split column reduction for ``dm = sum_rows(dy * z)`` and
``db = sum_rows(dy)`` (fp32 partials per row block, summed afterwards: deterministic, and no
weight-sized gradient is ever formed).

Conv: the convolution stays cuDNN's; these kernels are its per-channel epilogue
``y = z * m[c] + b[c]`` and the epilogue's backward, on a tensor viewed as (N, C, S) through
its strides (NCHW, channels_last, 1d/2d/3d alike).

Launchers take and return torch tensors and do no autograd. Accumulation is fp32; inputs may
be fp32, bf16 or fp16.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# Programs a split reduction aims for: a few waves on a large GPU (132 SMs on an H100).
_TARGET_PROGRAMS = 1024


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _clamp_pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _pow2(n)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 GEMMs follow torch's own setting, so the Triton path rounds like F.linear does.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------
# Linear
# --------------------------------------------------------------------------------------------


@triton.jit
def _linear_fwd_kernel(
    x_ptr, w_ptr, m_ptr, b_ptr, y_ptr, z_ptr,
    M, N, K,
    sxm, sxk, swn, swk, sym, syn, szm, szn,
    HAS_BIAS: tl.constexpr, WRITE_Z: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    # Grouped launch order: GROUP_M row blocks share the W tiles they stream through L2.
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    row_ok = rm < M
    col_ok = rn < N
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :] * sxk  # [BM, BK]
    w_ptrs = w_ptr + rn[None, :] * swn + rk[:, None] * swk  # [BK, BN] tile of W^T
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = rk < K - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BK * sxk
        w_ptrs += BK * swk

    # Epilogue. z is rounded to the input dtype first, as F.linear's output would be.
    z = acc.to(x_ptr.dtype.element_ty)
    m = tl.load(m_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
    y = z.to(tl.float32) * m[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    rm64 = rm[:, None].to(tl.int64)
    tl.store(y_ptr + rm64 * sym + rn[None, :] * syn, y.to(y_ptr.dtype.element_ty), mask=ok)
    if WRITE_Z:
        tl.store(z_ptr + rm64 * szm + rn[None, :] * szn, z, mask=ok)


@triton.jit
def _linear_dx_kernel(
    dy_ptr, w_ptr, m_ptr, dx_ptr,
    M, N, K,
    sdm, sdn, swn, swk, sxm, sxk,
    PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    # dx[M, K] = (dy * m)[M, N] @ W[N, K]; the reduction runs over N.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_k = tl.cdiv(K, BK)
    in_group = GROUP_M * num_pid_k
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_k = (pid % in_group) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    rn = tl.arange(0, BN)
    row_ok = rm < M
    col_ok = rk < K
    dy_ptrs = dy_ptr + rm[:, None].to(tl.int64) * sdm + rn[None, :] * sdn  # [BM, BN]
    w_ptrs = w_ptr + rn[:, None] * swn + rk[None, :] * swk  # [BN, BK]
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n_ok = rn < N - n0
        d = tl.load(dy_ptrs, mask=row_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        m = tl.load(m_ptr + n0 + rn, mask=n_ok, other=0.0).to(tl.float32)
        # Mask in the prologue; rounded to W's dtype like autograd's grad of F.linear's output.
        a = (d * m[None, :]).to(w_ptr.dtype.element_ty)
        b = tl.load(w_ptrs, mask=n_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        dy_ptrs += BN * sdn
        w_ptrs += BN * swn
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(dx_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :] * sxk, acc.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _linear_colsum_kernel(
    dy_ptr, z_ptr, pm_ptr, pb_ptr,
    M, N, rows_per_prog,
    sdm, sdn, szm, szn,
    NEED_DM: tl.constexpr, NEED_DB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    # Program (s, j) sums rows [s * rows_per_prog, (s + 1) * rows_per_prog) of column block j
    # and writes one fp32 partial row; the partials are summed over s afterwards.
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    col_ok = rn < N
    row0 = pid_s * rows_per_prog
    acc_m = tl.zeros((BM, BN), dtype=tl.float32)
    acc_b = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(0, rows_per_prog, BM):
        rm = row0 + i + tl.arange(0, BM)
        ok = (rm < M)[:, None] & col_ok[None, :]
        rm64 = rm[:, None].to(tl.int64)
        d = tl.load(dy_ptr + rm64 * sdm + rn[None, :] * sdn, mask=ok, other=0.0).to(tl.float32)
        if NEED_DM:
            z = tl.load(z_ptr + rm64 * szm + rn[None, :] * szn, mask=ok, other=0.0).to(tl.float32)
            acc_m += d * z
        if NEED_DB:
            acc_b += d
    out = pid_s.to(tl.int64) * N + rn
    if NEED_DM:
        tl.store(pm_ptr + out, tl.sum(acc_m, axis=0), mask=col_ok)
    if NEED_DB:
        tl.store(pb_ptr + out, tl.sum(acc_b, axis=0), mask=col_ok)


def _gemm_blocks(rows: int, cols: int, red: int, elem_size: int) -> Tuple[int, int, int, int]:
    bm = _clamp_pow2(rows, 16, 128)
    bn = _clamp_pow2(cols, 16, 128)
    # 3 pipeline stages of (bm + bn) x bk operands stay within ~100 KB of shared memory.
    bk = _clamp_pow2(red, 16, 64 if elem_size <= 2 else 32)
    warps = 8 if bm * bn >= 128 * 128 else 4
    return bm, bn, bk, warps


def linear_fwd(
    x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor,
    out_dtype: torch.dtype, write_z: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``y = (x2 @ W^T) * m + b`` for a 2-D ``x2`` [M, K]; also ``z = x2 @ W^T`` if ``write_z``."""
    M, K = x2.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=out_dtype, device=x2.device)
    z = torch.empty((M, N), dtype=x2.dtype, device=x2.device) if write_z else None
    if M == 0 or N == 0:
        return y, z
    if K == 0:  # an empty sum: z = 0
        y.copy_(torch.zeros_like(y) if bias is None else bias.to(out_dtype).expand(M, N))
        if z is not None:
            z.zero_()
        return y, z
    bm, bn, bk, warps = _gemm_blocks(M, N, K, x2.element_size())
    zz = z if z is not None else y
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _linear_fwd_kernel[grid](
        x2, weight, mask, bias if bias is not None else mask, y, zz,
        M, N, K,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        y.stride(0), y.stride(1), zz.stride(0), zz.stride(1),
        HAS_BIAS=bias is not None, WRITE_Z=z is not None, PRECISION=_dot_precision(x2.dtype),
        BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=3,
    )
    return y, z


def linear_dx(dy2: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``dx = (dy2 * m) @ W`` for ``dy2`` [M, N]; the result has W's dtype."""
    M, N = dy2.shape
    K = weight.shape[1]
    dx = torch.empty((M, K), dtype=weight.dtype, device=dy2.device)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    bm, bk, bn, warps = _gemm_blocks(M, K, N, weight.element_size())
    grid = (triton.cdiv(M, bm) * triton.cdiv(K, bk),)
    _linear_dx_kernel[grid](
        dy2, weight, mask, dx,
        M, N, K,
        dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1), dx.stride(0), dx.stride(1),
        PRECISION=_dot_precision(weight.dtype),
        BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=3,
    )
    return dx


def linear_colsums(
    dy2: torch.Tensor, z2: Optional[torch.Tensor], need_dm: bool, need_db: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """fp32 ``dm = sum_rows(dy2 * z2)`` and ``db = sum_rows(dy2)`` (each only if asked)."""
    M, N = dy2.shape
    dev = dy2.device
    if not (need_dm or need_db):
        return None, None
    if need_dm and z2 is None:
        raise ValueError("masked_linear backward: dm needs the saved pre-mask output z")
    if M == 0 or N == 0:
        zero = torch.zeros(N, dtype=torch.float32, device=dev)
        return (zero if need_dm else None), (zero.clone() if need_db else None)
    bn = _clamp_pow2(N, 16, 128)
    bm = max(1, min(32, 4096 // bn))
    n_col = triton.cdiv(N, bn)
    splits = max(1, min(triton.cdiv(M, bm), triton.cdiv(_TARGET_PROGRAMS, n_col)))
    rows = triton.cdiv(triton.cdiv(M, splits), bm) * bm
    splits = triton.cdiv(M, rows)
    pm = torch.empty((splits, N), dtype=torch.float32, device=dev) if need_dm else None
    pb = torch.empty((splits, N), dtype=torch.float32, device=dev) if need_db else None
    zz = z2 if need_dm else dy2
    _linear_colsum_kernel[(splits, n_col)](  # (a stand-in pointer for an output not asked for)
        dy2, zz, pm if pm is not None else pb, pb if pb is not None else pm,
        M, N, rows,
        dy2.stride(0), dy2.stride(1), zz.stride(0), zz.stride(1),
        NEED_DM=need_dm, NEED_DB=need_db, BM=bm, BN=bn, num_warps=4,
    )
    return (pm.sum(0) if pm is not None else None), (pb.sum(0) if pb is not None else None)


# --------------------------------------------------------------------------------------------
# Per-channel epilogue of a convolution, on (N, C, S) strided views
# --------------------------------------------------------------------------------------------


def ncs_strides(t: torch.Tensor) -> Optional[Tuple[int, int, int]]:
    """Strides (n, c, s) of ``t`` [N, C, *spatial] seen as (N, C, S), or None if the spatial
    dims cannot be flattened into one strided axis (true of NCHW and channels_last)."""
    if t.dim() < 2:
        return None
    dims = [(t.size(d), t.stride(d)) for d in range(2, t.dim()) if t.size(d) != 1]
    for (_, s_outer), (n_inner, s_inner) in zip(dims, dims[1:]):
        if s_outer != s_inner * n_inner:
            return None
    return t.stride(0), t.stride(1), (dims[-1][1] if dims else 1)


def _ncs(t: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    st = ncs_strides(t)
    if st is None:  # an exotic layout: work on a contiguous copy
        t = t.contiguous()
        st = ncs_strides(t)
    return t, st


def _channel_blocks(C: int, S: int, c_fastest: bool) -> Tuple[int, int, int]:
    if c_fastest:  # channels_last: a tile runs along C in memory
        bc = _clamp_pow2(C, 1, 128)
        bs = _clamp_pow2(S, 1, max(1, 4096 // bc))
    else:  # NCHW: a tile runs along S in memory
        bs = _clamp_pow2(S, 1, 1024)
        bc = _clamp_pow2(C, 1, max(1, 4096 // bs))
    warps = 8 if bc * bs >= 4096 else 4
    return bc, bs, warps


@triton.jit
def _channel_fwd_kernel(
    z_ptr, m_ptr, b_ptr, y_ptr,
    C, S, s_blocks,
    szn, szc, szs, syn, syc, sys,
    HAS_BIAS: tl.constexpr, BC: tl.constexpr, BS: tl.constexpr,
):
    pid0 = tl.program_id(0)
    n = (pid0 // s_blocks).to(tl.int64)
    rs = (pid0 % s_blocks) * BS + tl.arange(0, BS)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = rc < C
    ok = c_ok[:, None] & (rs < S)[None, :]
    z = tl.load(z_ptr + n * szn + rc[:, None] * szc + rs[None, :] * szs, mask=ok, other=0.0)
    m = tl.load(m_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    y = z.to(tl.float32) * m[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + n * syn + rc[:, None] * syc + rs[None, :] * sys, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _channel_bwd_kernel(
    dy_ptr, z_ptr, m_ptr, dz_ptr, pm_ptr, pb_ptr,
    C, S, s_groups, s_per_prog,
    sdn, sdc, sds, szn, szc, szs, sgn, sgc, sgs,
    NEED_DZ: tl.constexpr, NEED_DM: tl.constexpr, NEED_DB: tl.constexpr,
    BC: tl.constexpr, BS: tl.constexpr,
):
    # Program (n * s_groups + g, j): channels block j of sample n, spatial range g. It writes
    # dz = dy * m there and one fp32 partial row of dm and db (indexed by program_id(0)).
    pid0 = tl.program_id(0)
    n = (pid0 // s_groups).to(tl.int64)
    s_start = (pid0 % s_groups) * s_per_prog
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = rc < C
    m = tl.load(m_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)
    acc_m = tl.zeros((BC, BS), dtype=tl.float32)
    acc_b = tl.zeros((BC, BS), dtype=tl.float32)
    for s0 in range(s_start, s_start + s_per_prog, BS):
        rs = s0 + tl.arange(0, BS)
        ok = c_ok[:, None] & (rs < S)[None, :]
        d = tl.load(dy_ptr + n * sdn + rc[:, None] * sdc + rs[None, :] * sds, mask=ok, other=0.0).to(tl.float32)
        if NEED_DZ:
            tl.store(dz_ptr + n * sgn + rc[:, None] * sgc + rs[None, :] * sgs,
                     (d * m[:, None]).to(dz_ptr.dtype.element_ty), mask=ok)
        if NEED_DM:
            z = tl.load(z_ptr + n * szn + rc[:, None] * szc + rs[None, :] * szs, mask=ok, other=0.0)
            acc_m += d * z.to(tl.float32)
        if NEED_DB:
            acc_b += d
    out = pid0.to(tl.int64) * C + rc
    if NEED_DM:
        tl.store(pm_ptr + out, tl.sum(acc_m, axis=1), mask=c_ok)
    if NEED_DB:
        tl.store(pb_ptr + out, tl.sum(acc_b, axis=1), mask=c_ok)


def channel_fwd(z: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """``y = z * m[c] + b[c]`` for ``z`` [N, C, *spatial]; ``y`` has ``empty_like(z)``'s layout."""
    y = torch.empty_like(z, dtype=out_dtype)
    if z.numel() == 0:
        return y
    N, C = z.shape[0], z.shape[1]
    S = z.numel() // (N * C)
    zv, (szn, szc, szs) = _ncs(z)
    yst = ncs_strides(y)
    yw = y if yst is not None else torch.empty_like(zv, dtype=out_dtype)
    syn, syc, sys = ncs_strides(yw)
    bc, bs, warps = _channel_blocks(C, S, c_fastest=szc == 1 and szs != 1)
    s_blocks = triton.cdiv(S, bs)
    _channel_fwd_kernel[(N * s_blocks, triton.cdiv(C, bc))](
        zv, mask, bias if bias is not None else mask, yw,
        C, S, s_blocks, szn, szc, szs, syn, syc, sys,
        HAS_BIAS=bias is not None, BC=bc, BS=bs, num_warps=warps,
    )
    if yw is not y:
        y.copy_(yw)
    return y


def channel_bwd(
    dy: torch.Tensor, z: Optional[torch.Tensor], mask: torch.Tensor,
    dz_dtype: torch.dtype, dz_format: torch.memory_format,
    need_dz: bool, need_dm: bool, need_db: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass over ``dy``: ``dz = dy * m[c]`` (in ``dz_dtype`` and ``dz_format``, z's own), and
    fp32 ``dm = sum(dy * z)``, ``db = sum(dy)`` per channel, each only if asked."""
    if need_dm and z is None:
        raise ValueError("masked_channel backward: dm needs the saved pre-mask output z")
    N, C = dy.shape[0], dy.shape[1]
    dev = dy.device
    dz = torch.empty(dy.shape, dtype=dz_dtype, device=dev, memory_format=dz_format) if need_dz else None
    if not (need_dz or need_dm or need_db):
        return None, None, None
    S = dy.numel() // (N * C) if N * C else 0
    if dy.numel() == 0:
        zero = torch.zeros(C, dtype=torch.float32, device=dev)
        return dz, (zero if need_dm else None), (zero.clone() if need_db else None)
    dyv, (sdn, sdc, sds) = _ncs(dy)
    zv, (szn, szc, szs) = _ncs(z) if need_dm else (dyv, (sdn, sdc, sds))
    dzw = dz
    if dz is not None and ncs_strides(dz) is None:
        dzw = torch.empty_like(dz, memory_format=torch.contiguous_format)
    sgn, sgc, sgs = ncs_strides(dzw) if dzw is not None else (sdn, sdc, sds)
    bc, bs, warps = _channel_blocks(C, S, c_fastest=sdc == 1 and sds != 1)
    n_c = triton.cdiv(C, bc)
    # Spread each sample's S over enough programs to fill the GPU, in whole tiles.
    s_tiles = triton.cdiv(S, bs)
    groups = max(1, min(s_tiles, triton.cdiv(_TARGET_PROGRAMS, N * n_c)))
    s_per_prog = triton.cdiv(s_tiles, groups) * bs
    groups = triton.cdiv(S, s_per_prog)
    rows = N * groups
    pm = torch.empty((rows, C), dtype=torch.float32, device=dev) if need_dm else None
    pb = torch.empty((rows, C), dtype=torch.float32, device=dev) if need_db else None
    # Outputs not asked for get a harmless stand-in pointer (their stores are compiled out).
    _channel_bwd_kernel[(rows, n_c)](
        dyv, zv, mask, dzw if dzw is not None else dyv,
        pm if pm is not None else mask, pb if pb is not None else mask,
        C, S, groups, s_per_prog,
        sdn, sdc, sds, szn, szc, szs, sgn, sgc, sgs,
        NEED_DZ=need_dz, NEED_DM=need_dm, NEED_DB=need_db, BC=bc, BS=bs, num_warps=warps,
    )
    if dzw is not dz:
        dz.copy_(dzw)
    return dz, (pm.sum(0) if pm is not None else None), (pb.sum(0) if pb is not None else None)
