"""MixUp ops (the mixed batch and the two-label CE), every backend against the torch oracle:
triton (on CPU under TRITON_INTERPRET=1, conftest), cpp (C++/OpenMP, fp32/bf16 CPU) and cuda
(csrc/cuda/mixup.cu, on a GPU or, without one, on the CPU emulator: NFT_FAST_CUDA_EMU=1, conftest).

The C++ and CUDA kernels' mixed batch is bit-equal to the oracle (same two rounded fp32 products,
one round to bf16); their CE loss and gradient match it within a few fp32 ulps (their own exp and
sums).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_fast
from nft_fast import ops
from nft_fast.ops import mixup as M
from tests.helpers.backends import per_backend, skip_unless
from tests.helpers.mixup_cases import (
    BATCH_DTYPES, BATCH_SHAPES, ce_close, ce_inputs, compile_fullgraph_check, loss_and_grad, same,
)

CPU = torch.device("cpu")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the cuda backend's tensors
HALF = (torch.float16, torch.bfloat16)
BF16 = torch.bfloat16

triton_only, cpp_only, cuda_only = skip_unless("triton"), skip_unless("cpp"), skip_unless("cuda")


def _tol(dtype):
    # bf16: the interpreter truncates fp32 -> bf16 where torch rounds to nearest: 1 ulp.
    return {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}[dtype]


def _lam(kind, device=CPU):
    return {"zero": 0.0, "one": 1.0, "rand": 0.3719, "tensor": torch.tensor(0.6283, device=device),
            "tensor1": torch.tensor([0.1875], dtype=torch.float64, device=device),
            "bf16": torch.tensor([0.3], dtype=BF16, device=device)}[kind]


def _fmt(ndim, channels_last):
    if channels_last and ndim in (4, 5):
        return torch.channels_last if ndim == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _layout(x, kind):
    if kind == "cl":  # channels-last input
        return x.contiguous(memory_format=_fmt(x.dim(), True))
    if kind == "view":  # a non-dense, non-standard view read through its strides
        return torch.cat([x, x], dim=-1)[..., ::2].transpose(1, 2)
    return x


def _cl(x):
    return x.contiguous(memory_format=M.channels_last_format(x.dim(), True))


# ================================================================================ every backend


# Every backend's entry point validates before dispatching to its kernels (the same messages).
@pytest.mark.parametrize("impl", [M.mixup_batch_torch, M.mixup_batch_triton, M.mixup_batch_cpp, M.mixup_batch_cuda])
def test_batch_bad_input(impl):
    x = torch.randn(5, 3, 4, 4)
    perm = torch.randperm(5)
    with pytest.raises(ValueError, match="perm has shape"):
        impl(x, torch.randperm(4), 0.5)
    with pytest.raises(ValueError, match="perm has shape"):
        impl(x, perm.view(5, 1), 0.5)
    with pytest.raises(ValueError, match="perm must be an int64"):
        impl(x, perm.float(), 0.5)
    with pytest.raises(ValueError, match="requires grad"):
        impl(x.requires_grad_(), perm, 0.5)
    x.requires_grad_(False)
    with pytest.raises(ValueError, match="one floating-point value"):
        impl(x, perm, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="lam must be a float"):
        impl(x, perm, "0.5")
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        impl(x, perm, 0.5, torch.int32)
    with pytest.raises(ValueError, match="rank >= 1"):
        impl(torch.tensor(1.0), perm, 0.5)


@pytest.mark.parametrize("impl", [M.mixup_cross_entropy_torch, M.mixup_cross_entropy_triton,
                                  M.mixup_cross_entropy_cpp, M.mixup_cross_entropy_cuda])
def test_ce_bad_input(impl):
    z, y, perm = ce_inputs(5, 4, seed=7)
    with pytest.raises(ValueError, match="perm has shape"):
        impl(z, y, torch.randperm(6), 0.5)
    with pytest.raises(ValueError, match="y must be an int64"):
        impl(z, y[:4], perm, 0.5)
    with pytest.raises(ValueError, match="y must be an int64"):
        impl(z, y.int(), perm, 0.5)
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        impl(z.view(5, 2, 2), y, perm, 0.5)
    with pytest.raises(ValueError, match="no gradient flows to lam"):
        impl(z, y, perm, torch.tensor(0.5, requires_grad=True))


def test_ce_oracle_is_the_formula():
    z, y, perm = ce_inputs(9, 13, seed=4)
    lam = 0.37
    rows = torch.logsumexp(z.double(), 1) - lam * z.double()[torch.arange(9), y] \
        - (1 - lam) * z.double()[torch.arange(9), y[perm]]
    torch.testing.assert_close(M.mixup_cross_entropy_torch(z, y, perm, lam).double(), rows.mean(),
                               rtol=1e-6, atol=1e-6)


# The C++ kernels' CE: the same cases on both, but for B = 2 (cpp only).
_CE_CASES = [(B, K, dtype) for dtype in (torch.float32, BF16) for K in (1, 10, 37, 1000) for B in (1, 2, 7, 33, 128)]


@per_backend("B,K,dtype", {"cpp": _CE_CASES, "cuda": [c for c in _CE_CASES if c[0] != 2]})
def test_ce_matches_oracle(backend, B, K, dtype):
    z, y, perm = (t.to(DEV if backend == "cuda" else CPU) for t in ce_inputs(B, K, seed=B * K, dtype=dtype))
    ce_close(loss_and_grad(getattr(M, f"mixup_cross_entropy_{backend}"), z, y, perm, 0.3719),
             loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3719), B, dtype)


# ======================================================================================= triton

# ------------------------------------------------------------------------------ mixup_batch


SHAPES = {3: (7, 5, 9), 4: (7, 3, 5, 6), 5: (7, 3, 2, 5, 3)}


@triton_only
@pytest.mark.parametrize("ndim", [3, 4, 5])
@pytest.mark.parametrize("layout", ["nc", "cl", "view"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_triton_batch_layouts_and_dtypes(ndim, layout, channels_last, dtype):
    g = torch.Generator().manual_seed(ndim)
    x = _layout(torch.randn(SHAPES[ndim], generator=g), layout)
    perm = torch.randperm(x.shape[0], generator=g)
    want = M.mixup_batch_torch(x, perm, 0.3719, dtype, channels_last)
    got = M.mixup_batch_triton(x, perm, 0.3719, dtype, channels_last)
    out_dtype = dtype or x.dtype
    assert got.dtype == want.dtype == out_dtype
    assert got.shape == x.shape
    fmt = _fmt(ndim, channels_last)
    assert got.is_contiguous(memory_format=fmt)
    assert got.stride() == torch.empty(x.shape, memory_format=fmt).stride()
    # The oracle's values, independently: fp32 mix, one rounding to the output dtype.
    ref = (0.3719 * x + (1 - 0.3719) * x[perm]).to(out_dtype)
    torch.testing.assert_close(want, ref, rtol=0, atol=0)
    rtol, atol = _tol(out_dtype)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@triton_only
@pytest.mark.parametrize("B", [1, 7, 130])
@pytest.mark.parametrize("lam", ["zero", "one", "rand", "tensor", "tensor1"])
def test_triton_batch_lam_values(B, lam):
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 3, 4, 5, generator=g)
    perm = torch.randperm(B, generator=g)
    lv = _lam(lam)
    got = M.mixup_batch_triton(x, perm, lv, channels_last=True)
    torch.testing.assert_close(got, M.mixup_batch_torch(x, perm, lv, channels_last=True), rtol=1e-6, atol=1e-6)
    if lam == "zero":
        assert torch.equal(got, x[perm])
    if lam == "one":
        assert torch.equal(got, x)


@triton_only
def test_triton_batch_tensor_lam_is_read_at_run_time():
    # The same lam tensor, updated in place, gives the new mix (what a CUDA graph replay needs).
    x = torch.randn(6, 11)
    perm = torch.randperm(6)
    lam = torch.tensor([0.25])
    a = M.mixup_batch_triton(x, perm, lam)
    lam.fill_(0.75)
    b = M.mixup_batch_triton(x, perm, lam)
    torch.testing.assert_close(a, 0.25 * x + 0.75 * x[perm], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, 0.75 * x + 0.25 * x[perm], rtol=1e-6, atol=1e-6)


@triton_only
@pytest.mark.parametrize("shape,layout,channels_last", [
    ((3, 70, 9, 7), "nc", True),  # a transpose with several tiles along both axes
    ((2, 70, 9, 7), "cl", False),
    ((2, 5000), "nc", False),  # several tiles along one axis
    ((9,), "nc", False),  # rank 1: one scalar per sample
    ((4, 3, 5, 2), "perm", True),  # not collapsible to 2 axes: copied first
])
def test_triton_batch_tiles_and_odd_ranks(shape, layout, channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    if layout == "perm":
        x = torch.randn(shape[0], shape[3], shape[1], shape[2], generator=g).permute(0, 2, 3, 1)
    else:
        x = _layout(x, layout)
    perm = torch.randperm(shape[0], generator=g)
    got = M.mixup_batch_triton(x, perm, 0.81, channels_last=channels_last)
    want = M.mixup_batch_torch(x, perm, 0.81, channels_last=channels_last)
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@triton_only
def test_triton_batch_half_input_mixed_in_fp32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, 4, 4, generator=g).to(torch.float16)
    perm = torch.randperm(7, generator=g)
    got = M.mixup_batch_triton(x, perm, 0.3, torch.float32, True)
    want = 0.3 * x.float() + 0.7 * x.float()[perm]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last)


@triton_only
def test_triton_batch_float64_falls_back_to_torch():
    x = torch.randn(5, 4, dtype=torch.float64)
    perm = torch.randperm(5)
    assert torch.equal(M.mixup_batch_triton(x, perm, 0.2), M.mixup_batch_torch(x, perm, 0.2))


@triton_only
def test_triton_batch_opcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, 6, generator=g)
    perm = torch.randperm(5, generator=g)
    op = torch.ops.nft_fast.mixup_batch.default
    torch.library.opcheck(op, (x, perm, None, 0.3, torch.float16, True))
    torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), perm, torch.tensor([0.3]), 0.0,
                               torch.float32, False))


# --------------------------------------------------------------------------------- mixup CE



@triton_only
@pytest.mark.parametrize("B", [1, 7, 130])
@pytest.mark.parametrize("K", [2, 10, 37, 1001])
@pytest.mark.parametrize("lam", ["zero", "one", "rand", "tensor"])
def test_triton_ce_matches_oracle(B, K, lam):
    z, y, perm = ce_inputs(B, K, seed=B * K)
    lv = _lam(lam)
    want_l, want_g = loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, lv)
    got_l, got_g = loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, lv)
    assert got_l.dtype == torch.float32 and got_l.shape == ()
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6 / B)


@triton_only
def test_triton_ce_many_rows():
    # > 1000 rows: several programs, so the two-stage (partials then sum) reduction runs.
    z, y, perm = ce_inputs(1030, 3, seed=3)
    want_l, want_g = loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.55)
    got_l, got_g = loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, 0.55)
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-9)


@triton_only
@pytest.mark.parametrize("B,K,block_k", [(7, 1001, 256), (130, 37, 16), (1, 10, 16)])
def test_triton_ce_looped_class_blocks(B, K, block_k):
    from nft_fast.kernels import mixup as K_

    z, y, perm = ce_inputs(B, K, seed=K)
    want_l, want_g = loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.4)
    loss, dz = K_.mixup_ce_fwd(z, y, perm, 0.4, None, block_k=block_k)
    torch.testing.assert_close(loss, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, want_g, rtol=1e-5, atol=1e-6 / B)
    loss_t, dz_t = K_.mixup_ce_fwd(z, y, perm, 0.0, torch.tensor([0.4], dtype=torch.float64), block_k=block_k)
    torch.testing.assert_close(loss_t, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz_t, want_g, rtol=1e-5, atol=1e-6 / B)


@triton_only
def test_triton_ce_strided_logits_and_upstream_scale():
    z, y, perm = ce_inputs(37, 11, seed=5)
    zt = z.t().contiguous().t()  # column-major [B, K]
    want_l, want_g = loss_and_grad(M.mixup_cross_entropy_torch, zt, y, perm, 0.6, scale=-2.5)
    got_l, got_g = loss_and_grad(M.mixup_cross_entropy_triton, zt, y, perm, 0.6, scale=-2.5)
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)


@triton_only
@pytest.mark.parametrize("dtype", HALF)
def test_triton_ce_half_logits(dtype):
    z, y, perm = ce_inputs(7, 37, seed=6, dtype=dtype)
    want_l, want_g = loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3)
    got_l, got_g = loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, 0.3)
    assert got_l.dtype == want_l.dtype == torch.float32 and got_g.dtype == dtype
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-6)  # same fp32 math on the same inputs
    torch.testing.assert_close(got_g, want_g, rtol=1e-2, atol=1e-4)


@triton_only
def test_triton_ce_opcheck():
    z, y, perm = ce_inputs(7, 37, seed=8)
    z.requires_grad_()
    fwd = torch.ops.nft_fast.mixup_ce_fwd.default
    torch.library.opcheck(fwd, (z, y, perm, None, 0.3))
    torch.library.opcheck(fwd, (z, y, perm, torch.tensor([0.3]), 0.0))
    torch.library.opcheck(fwd, (z.detach().bfloat16(), y, perm, None, 0.9))
    torch.library.opcheck(torch.ops.nft_fast.mixup_ce_bwd.default,
                          (torch.tensor(2.0), torch.randn(7, 37), torch.bfloat16))


# ----------------------------------------------------------------------- dispatch / compile


@triton_only
def test_dispatch_triton_and_torch():
    z, y, perm = ce_inputs(7, 10, seed=9)
    x = torch.randn(7, 3, 4, 4)
    with nft_fast.use_backend("triton"):
        assert ops.resolved_backend("mixup_batch", CPU) == "triton"
        assert ops.resolved_backend("mixup_ce", CPU) == "triton"
        a = M.mixup_batch(x, perm, 0.3, channels_last=True)
        la = M.mixup_cross_entropy(z, y, perm, 0.3)
    with nft_fast.use_backend("torch"):
        b = M.mixup_batch(x, perm, 0.3, channels_last=True)
        lb = M.mixup_cross_entropy(z, y, perm, 0.3)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)


@triton_only
@pytest.mark.parametrize("lam_kind", ["tensor", "float"])
def test_triton_compile_fullgraph_step(lam_kind):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 3, 4, 6, generator=g)
    perm = torch.randperm(5, generator=g)
    y = torch.randint(0, 10, (5,), generator=g)
    w = torch.randn(10, 3 * 4 * 6, generator=g).requires_grad_()

    def step(x, perm, lam, w, y):
        xm = M.mixup_batch_triton(x, perm, lam, torch.float32, True)
        out = F.linear(xm.flatten(1), w)
        return M.mixup_cross_entropy_triton(out, y, perm, lam)

    lam = torch.tensor(0.37) if lam_kind == "tensor" else 0.37
    want = step(x, perm, lam, w, y)
    (gw_want,) = torch.autograd.grad(want, w)
    got = torch.compile(step, fullgraph=True)(x, perm, lam, w, y)
    (gw_got,) = torch.autograd.grad(got, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw_got, gw_want, rtol=1e-5, atol=1e-6)
    ref = M.mixup_cross_entropy_torch(F.linear(M.mixup_batch_torch(x, perm, lam).flatten(1), w.detach()), y, perm, lam)
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- GPU



@triton_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_gpu_batch_large(dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(11)
    x = torch.randn(256, 3, 96, 96, device=dev, generator=g).to(dtype)
    perm = torch.randperm(256, device=dev, generator=g)
    lam = torch.tensor(0.6, device=dev)
    for xin in (x, x.contiguous(memory_format=torch.channels_last)):
        for out_dtype in (dtype, torch.bfloat16):
            got = M.mixup_batch_triton(xin, perm, lam, out_dtype, True)
            want = M.mixup_batch_torch(xin, perm, lam, out_dtype, True)
            assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == out_dtype
            # On the GPU the cast rounds to nearest like torch; fp32 may differ by an fma.
            tol = (1e-6, 2e-6) if out_dtype == torch.float32 else (1e-2, 1e-2)
            torch.testing.assert_close(got, want, rtol=tol[0], atol=tol[1])
    x5 = torch.randn(64, 64, 8, 16, 16, device=dev, generator=g).to(dtype)
    p5 = torch.randperm(64, device=dev, generator=g)
    got = M.mixup_batch_triton(x5, p5, 0.25, dtype, True)
    want = M.mixup_batch_torch(x5, p5, 0.25, dtype, True)
    torch.testing.assert_close(got, want, rtol=1e-2 if dtype in HALF else 1e-6, atol=1e-2 if dtype in HALF else 2e-6)


@triton_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K", [(4096, 1000), (1000, 1001), (64, 32000)])
def test_triton_gpu_ce_large(dtype, B, K):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(12)
    z = (torch.randn(B, K, device=dev, generator=g) * 4).to(dtype)
    y = torch.randint(0, K, (B,), device=dev, generator=g)
    perm = torch.randperm(B, device=dev, generator=g)
    lam = torch.tensor(0.42, device=dev)
    want_l, want_g = loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, lam)
    got_l, got_g = loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, lam)
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-5)
    gtol = 1e-5 / B if dtype == torch.float32 else 1e-2 / B
    torch.testing.assert_close(got_g, want_g, rtol=1e-2 if dtype in HALF else 1e-4, atol=gtol)
    again, _ = loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, lam)
    assert torch.equal(again, got_l), "the loss reduction must be deterministic"


@triton_only
@pytest.mark.gpu
def test_triton_gpu_cuda_graph_fresh_lam():
    dev = torch.device("cuda")
    x = torch.randn(32, 3, 16, 16, device=dev)
    z = torch.randn(32, 10, device=dev)
    y = torch.randint(0, 10, (32,), device=dev)
    perm = torch.randperm(32, device=dev)
    lam = torch.tensor([0.3], device=dev)
    M.mixup_batch_triton(x, perm, lam, torch.bfloat16, True)  # compile the kernels outside capture
    M.mixup_cross_entropy_triton(z, y, perm, lam)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xm = M.mixup_batch_triton(x, perm, lam, torch.bfloat16, True)
        loss = M.mixup_cross_entropy_triton(z, y, perm, lam)
    for v in (0.8, 0.05):
        lam.fill_(v)
        perm.copy_(torch.randperm(32, device=dev))
        graph.replay()
        torch.testing.assert_close(xm, M.mixup_batch_torch(x, perm, v, torch.bfloat16, True), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(loss, M.mixup_cross_entropy_torch(z, y, perm, v), rtol=1e-5, atol=1e-5)


# ========================================================================================== cpp

# ------------------------------------------------------------------------------ mixup_batch


@cpp_only
@pytest.mark.parametrize("shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("in_dtype,out_dtype", BATCH_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_batch_bit_equal_to_oracle(shape, in_dtype, out_dtype, channels_last):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(in_dtype)
    perm = torch.randperm(shape[0], generator=g)
    got = M.mixup_batch_cpp(x, perm, 0.3719, out_dtype, channels_last)
    want = M.mixup_batch_torch(x, perm, 0.3719, out_dtype, channels_last)
    same(got, want)
    assert got.is_contiguous(memory_format=_fmt(x.dim(), channels_last))
    # The formula itself: two rounded fp32 products, their sum, one rounding to the output dtype.
    xf = x.float()
    ref = (0.3719 * xf + (1 - 0.3719) * xf[perm]).to(out_dtype or in_dtype)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@cpp_only
@pytest.mark.parametrize("shape", [(7, 3, 5, 6), (3, 2, 5, 7), (3, 4, 5, 7), (3, 70, 9, 7), (2, 3, 2, 5, 3),
                                   (64, 3, 32, 32), (4, 1, 5, 5), (5, 4, 1, 1)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpp_batch_channels_last_input(shape, out_dtype, channels_last):
    # channels_last x: the same layout out is a flat mix, NCHW out the reverse transpose.
    g = torch.Generator().manual_seed(3)
    x = _cl(torch.randn(shape, generator=g))
    perm = torch.randperm(shape[0], generator=g)
    same(M.mixup_batch_cpp(x, perm, 0.81, out_dtype, channels_last),
         M.mixup_batch_torch(x, perm, 0.81, out_dtype, channels_last))


@cpp_only
@pytest.mark.parametrize("view", ["transpose", "slice"])
def test_cpp_batch_strided_input(view):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, 7, 4, generator=g)
    x = x.transpose(1, 2) if view == "transpose" else torch.cat([x, x], -1)[..., ::2]
    perm = torch.randperm(6, generator=g)
    for cl in (False, True):
        same(M.mixup_batch_cpp(x, perm, 0.42, BF16, cl), M.mixup_batch_torch(x, perm, 0.42, BF16, cl))


@cpp_only
@pytest.mark.parametrize("B", [1, 2, 33])
@pytest.mark.parametrize("lam", ["zero", "one", "rand", "tensor", "tensor1", "bf16"])
def test_cpp_batch_lam_values(B, lam):
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 3, 4, 5, generator=g)
    perm = torch.randperm(B, generator=g)
    lv = _lam(lam)
    got = M.mixup_batch_cpp(x, perm, lv, channels_last=True)
    same(got, M.mixup_batch_torch(x, perm, lv, channels_last=True))
    if lam == "zero":
        assert torch.equal(got, x[perm])
    if lam == "one":
        assert torch.equal(got, x)


@cpp_only
def test_cpp_batch_identity_perm_int32_and_nonfinite():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 4, 4, generator=g)
    x[1, 0, 0, 0], x[2, 1, 2, 3], x[3, 2, 1, 1] = float("inf"), float("nan"), 1e-40  # a subnormal too
    ident = torch.arange(7)
    for perm in (ident, ident.int(), torch.randperm(7, generator=g).int()):
        for od in (torch.float32, BF16):
            same(M.mixup_batch_cpp(x, perm, 0.3, od, True), M.mixup_batch_torch(x, perm, 0.3, od, True))


@cpp_only
def test_cpp_batch_bf16_rounding_ties():
    # fp32 values exactly halfway between two bf16 values: round to nearest even, like torch.
    base = torch.tensor([1.0, 1.0078125, -3.0, 2.0 ** -130])
    x = (base.view(torch.int32) | 0x8000).view(torch.float32).repeat(2, 1)  # the tie bit set
    perm = torch.tensor([1, 0])
    same(M.mixup_batch_cpp(x, perm, 1.0, BF16), M.mixup_batch_torch(x, perm, 1.0, BF16))


@cpp_only
@pytest.mark.parametrize("dtype,out_dtype", [(torch.float64, None), (torch.float16, None),
                                             (torch.float32, torch.float16), (torch.float32, torch.float64)])
def test_cpp_batch_other_dtypes_run_torch(dtype, out_dtype):
    x = torch.randn(5, 3, 2, 2).to(dtype)
    perm = torch.randperm(5)
    same(M.mixup_batch_cpp(x, perm, 0.2, out_dtype, True), M.mixup_batch_torch(x, perm, 0.2, out_dtype, True))


@cpp_only
def test_cpp_batch_empty_runs_torch():
    x = torch.randn(0, 3, 2, 2)
    got = M.mixup_batch_cpp(x, torch.zeros(0, dtype=torch.int64), 0.5, BF16, True)
    assert got.shape == x.shape and got.dtype == BF16


@cpp_only
def test_cpp_batch_bad_perm_index():
    # Validation is shared with every backend (test_batch_bad_input); the C++ kernel checks the indices
    # too (no out-of-bounds read), raising IndexError like torch's indexing.
    with pytest.raises(IndexError):
        M.mixup_batch_cpp(torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 3, 5]), 0.5)


@cpp_only
def test_cpp_batch_opcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 4, 6, generator=g)
    perm = torch.randperm(5, generator=g)
    op = torch.ops.nft_fast.mixup_batch_cpp.default
    torch.library.opcheck(op, (x, perm, None, 0.3, BF16, True))
    torch.library.opcheck(op, (_cl(x), perm.int(), torch.tensor([0.3]), 0.0, torch.float32, False))
    torch.library.opcheck(op, (x.flatten(1).to(BF16), perm, None, 0.7, torch.float32, True))


# --------------------------------------------------------------------------------- mixup CE


@cpp_only
@pytest.mark.parametrize("lam", ["zero", "one", "rand", "tensor", "tensor1", "bf16"])
@pytest.mark.parametrize("perm_kind", ["random", "identity", "int32"])
def test_cpp_ce_lam_and_perm(lam, perm_kind):
    z, y, perm = ce_inputs(33, 10, seed=7)
    if perm_kind == "identity":
        perm = torch.arange(33)
    lv = _lam(lam)
    want = loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, lv)
    got = loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm.int() if perm_kind == "int32" else perm, lv)
    ce_close(got, want, 33)


@cpp_only
def test_cpp_ce_long_rows_strided_and_upstream_scale():
    # K > 256: several fp32 lane-sum blocks; column-major logits; backward of -2.5 * loss.
    z, y, perm = ce_inputs(9, 5003, seed=8)
    zt = z.t().contiguous().t()
    ce_close(loss_and_grad(M.mixup_cross_entropy_cpp, zt, y, perm, 0.6, scale=-2.5),
             loss_and_grad(M.mixup_cross_entropy_torch, zt, y, perm, 0.6, scale=-2.5), 9 / 2.5)


@cpp_only
def test_cpp_ce_masked_classes_and_nan_rows():
    z, y, perm = ce_inputs(6, 12, seed=9)
    z[:, 11] = float("-inf")  # a class nobody is labelled with: exp -> 0, no gradient
    z[:, 10] = -200.0  # exp underflows
    y = y.clamp(max=9)
    ce_close(loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm, 0.3),
             loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3), 6)
    z[2, 3] = float("nan")
    assert torch.isnan(M.mixup_cross_entropy_cpp(z, y, perm, 0.3))


@cpp_only
def test_cpp_ce_no_grad_and_repeatable():
    z, y, perm = ce_inputs(128, 1000, seed=10)
    with torch.no_grad():
        a = M.mixup_cross_entropy_cpp(z.requires_grad_(), y, perm, 0.37)
    assert not a.requires_grad
    b = M.mixup_cross_entropy_cpp(z.detach(), y, perm, 0.37)
    c, _ = loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm, 0.37)
    assert torch.equal(a, b) and torch.equal(a, c), "row losses are reduced in a fixed order"
    torch.testing.assert_close(a, M.mixup_cross_entropy_torch(z.detach(), y, perm, 0.37), rtol=1e-6, atol=1e-7)


@cpp_only
def test_cpp_ce_retain_graph_backward_twice():
    z, y, perm = ce_inputs(7, 10, seed=11)
    z.requires_grad_()
    loss = M.mixup_cross_entropy_cpp(z, y, perm, 0.3)
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2, z)
    torch.testing.assert_close(g2, 2 * g1, rtol=0, atol=0)


@cpp_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_cpp_ce_other_dtypes_run_torch(dtype):
    z, y, perm = ce_inputs(7, 10, seed=12, dtype=dtype)
    got = loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm, 0.3)
    want = loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@cpp_only
def test_cpp_ce_bad_indices_and_empty():
    z, y, perm = ce_inputs(5, 4, seed=13)
    for impl in (M.mixup_cross_entropy_torch, M.mixup_cross_entropy_cpp):
        with pytest.raises(ValueError, match="empty logits"):
            impl(z[:, :0], y, perm, 0.5)
        with pytest.raises(IndexError):
            impl(z, torch.tensor([0, 1, 2, 3, 4]), perm, 0.5)  # label 4 of 4 classes
        with pytest.raises(IndexError):
            impl(z, y, torch.tensor([0, 1, 2, 3, 5]), 0.5)


@cpp_only
def test_cpp_ce_opcheck():
    z, y, perm = ce_inputs(7, 37, seed=14)
    z.requires_grad_()
    fwd = torch.ops.nft_fast.mixup_ce_cpp_fwd.default
    torch.library.opcheck(fwd, (z, y, perm, None, 0.3))
    torch.library.opcheck(fwd, (z, y, perm.int(), torch.tensor([0.3]), 0.0))
    torch.library.opcheck(fwd, (z.detach().bfloat16().requires_grad_(), y, perm, None, 0.9))
    torch.library.opcheck(torch.ops.nft_fast.mixup_ce_cpp_bwd.default, (torch.tensor(2.0), torch.randn(7, 37), BF16))


# ----------------------------------------------------------------------- dispatch / compile


@cpp_only
def test_dispatch_cpp():
    z, y, perm = ce_inputs(7, 10, seed=15)
    x = torch.randn(7, 3, 4, 4)
    with nft_fast.use_backend("cpp"):
        assert ops.resolved_backend("mixup_batch", CPU) == "cpp"
        assert ops.resolved_backend("mixup_ce", CPU) == "cpp"
        a = M.mixup_batch(x, perm, 0.3, channels_last=True)
        la = M.mixup_cross_entropy(z, y, perm, 0.3)
    with nft_fast.use_backend("auto"):  # both beat torch on the CPU (bench/test_ops_bench.py)
        assert ops.resolved_backend("mixup_batch", CPU) == "cpp"
        assert ops.resolved_backend("mixup_ce", CPU) == "cpp"
    same(a, M.mixup_batch_torch(x, perm, 0.3, channels_last=True))
    torch.testing.assert_close(la, M.mixup_cross_entropy_torch(z, y, perm, 0.3), rtol=1e-6, atol=1e-7)


@cpp_only
@pytest.mark.parametrize("lam_kind", ["tensor", "float"])
def test_cpp_compile_fullgraph_step(lam_kind):
    compile_fullgraph_check(M.mixup_batch_cpp, M.mixup_cross_entropy_cpp,
                            torch.tensor(0.37) if lam_kind == "tensor" else 0.37)


# ========================================================================================= cuda


@cuda_only
@pytest.mark.parametrize("shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("in_dtype,out_dtype", BATCH_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_batch_bit_equal_to_oracle(shape, in_dtype, out_dtype, channels_last):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(DEV, in_dtype)
    x[0].view(-1)[0] = float("inf")
    perm = torch.randperm(shape[0], generator=g).to(DEV)
    got = M.mixup_batch_cuda(x, perm, 0.3719, out_dtype, channels_last)
    same(got, M.mixup_batch_torch(x, perm, 0.3719, out_dtype, channels_last))


@cuda_only
@pytest.mark.parametrize("shape", [(7, 3, 5, 6), (3, 70, 9, 7), (2, 3, 2, 5, 3)], ids=str)
def test_cuda_batch_channels_last_and_strided_input(shape):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g).to(DEV)
    perm = torch.randperm(shape[0], generator=g).to(DEV)
    for xin in (x.contiguous(memory_format=M.channels_last_format(x.dim(), True)), x.transpose(2, 3)):
        for cl in (False, True):
            same(M.mixup_batch_cuda(xin, perm, 0.81, BF16, cl), M.mixup_batch_torch(xin, perm, 0.81, BF16, cl))


@cuda_only
@pytest.mark.parametrize("lam", [0.0, 1.0, 0.6283, "tensor", "tensor_f64"])
def test_cuda_batch_lam_values_and_device_lam(lam):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, 4, 5, generator=g).to(DEV)
    perm = torch.randperm(9, generator=g).to(DEV)
    lv = {"tensor": torch.tensor([0.6283], device=DEV),
          "tensor_f64": torch.tensor(0.1875, dtype=torch.float64, device=DEV)}.get(lam, lam)
    got = M.mixup_batch_cuda(x, perm, lv, channels_last=True)
    same(got, M.mixup_batch_torch(x, perm, lv, channels_last=True))
    if lam == "tensor":  # read on the device at run time: a new value in place gives a new batch
        lv.fill_(0.25)
        same(M.mixup_batch_cuda(x, perm, lv, channels_last=True),
             M.mixup_batch_torch(x, perm, torch.tensor([0.25], device=DEV), channels_last=True))


@cuda_only
def test_cuda_batch_int32_perm_other_dtypes_and_bad_input():
    x = torch.randn(5, 3, 2, 2, device=DEV)
    perm = torch.randperm(5).to(DEV)
    same(M.mixup_batch_cuda(x, perm.int(), 0.3, BF16, True), M.mixup_batch_torch(x, perm, 0.3, BF16, True))
    for dt, od in ((torch.float64, None), (torch.float16, None), (torch.float32, torch.float16)):
        same(M.mixup_batch_cuda(x.to(dt), perm, 0.2, od, True), M.mixup_batch_torch(x.to(dt), perm, 0.2, od, True))
    with pytest.raises(ValueError, match="perm has shape"):
        M.mixup_batch_cuda(x, perm[:4], 0.5)
    with pytest.raises(ValueError, match="requires grad"):
        M.mixup_batch_cuda(x.clone().requires_grad_(), perm, 0.5)


@cuda_only
@pytest.mark.parametrize("lam", [0.0, 1.0, "tensor"])
def test_cuda_ce_lam_identity_perm_masked_classes_and_scale(lam):
    z, y, perm = (t.to(DEV) for t in ce_inputs(33, 12, seed=7))
    z[:, 11] = float("-inf")
    y = y.clamp(max=10)
    lv = torch.tensor([0.3], device=DEV) if lam == "tensor" else lam
    for p in (perm, torch.arange(33, device=DEV)):
        ce_close(loss_and_grad(M.mixup_cross_entropy_cuda, z, y, p, lv, scale=-2.5),
                 loss_and_grad(M.mixup_cross_entropy_torch, z, y, p, lv, scale=-2.5), 33 / 2.5)


@cuda_only
def test_cuda_ce_deterministic_no_grad_and_fallbacks():
    z, y, perm = (t.to(DEV) for t in ce_inputs(128, 1000, seed=10))
    a = M.mixup_cross_entropy_cuda(z, y, perm, 0.37)
    with torch.no_grad():
        b = M.mixup_cross_entropy_cuda(z.requires_grad_(), y, perm, 0.37)
    assert torch.equal(a, b) and not b.requires_grad, "row losses are reduced in a fixed order"
    z64 = z.detach().double()
    assert torch.equal(M.mixup_cross_entropy_cuda(z64, y, perm, 0.3), M.mixup_cross_entropy_torch(z64, y, perm, 0.3))


@cuda_only
def test_cuda_opcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 4, 6, generator=g).to(DEV)
    perm = torch.randperm(5, generator=g).to(DEV)
    op = torch.ops.nft_fast.mixup_batch_cuda.default
    torch.library.opcheck(op, (x, perm, None, 0.3, BF16, True))
    torch.library.opcheck(op, (x, perm, torch.tensor([0.3], device=DEV), 0.0, torch.float32, False))
    z, y, perm = (t.to(DEV) for t in ce_inputs(7, 37, seed=14))
    fwd = torch.ops.nft_fast.mixup_ce_cuda_fwd.default
    torch.library.opcheck(fwd, (z.requires_grad_(), y, perm, None, 0.3))
    torch.library.opcheck(fwd, (z.detach().bfloat16().requires_grad_(), y, perm, torch.tensor([0.9], device=DEV), 0.0))


@cuda_only
@pytest.mark.parametrize("lam", [0.37, "tensor"])
def test_cuda_dispatch_and_compile_fullgraph(lam):
    with nft_fast.use_backend("cuda"):
        assert ops.resolved_backend("mixup_batch", DEV) == "cuda"
        assert ops.resolved_backend("mixup_ce", DEV) == "cuda"
    compile_fullgraph_check(M.mixup_batch_cuda, M.mixup_cross_entropy_cuda,
                            torch.tensor(0.37, device=DEV) if lam == "tensor" else lam, DEV)


# ----------------------------------------------------------------- VideoMix (cut-and-mix)


@pytest.mark.parametrize("shape", [(6, 2, 5, 9, 7), (4, 3, 11, 13), (3, 1, 1, 4, 4)])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.77, 1.0])
def test_videomix_pastes_one_box_and_reports_its_share(shape, lam):
    from nft_fast.ops.mixup import videomix_batch, videomix_box

    x = torch.randn(shape)
    perm = torch.randperm(shape[0], generator=torch.Generator().manual_seed(1))
    out, lam_eff = videomix_batch(x, perm, lam, torch.Generator().manual_seed(3))
    again, lam_again = videomix_batch(x, perm, lam, torch.Generator().manual_seed(3))
    assert torch.equal(again, out) and lam_again == lam_eff, "deterministic given the generator"
    # the same seed draws the same box: the partner's values inside, the sample's own outside
    box, share = videomix_box(shape[2:], lam, torch.Generator().manual_seed(3))
    inside = torch.zeros(shape[2:], dtype=torch.bool)
    inside[box] = True
    assert share == lam_eff == pytest.approx(1 - inside.float().mean().item())
    assert torch.equal(out[:, :, ~inside], x[:, :, ~inside])
    assert torch.equal(out[:, :, inside], x[perm][:, :, inside])
    if lam == 1.0:
        assert lam_eff == 1.0 and torch.equal(out, x)
    if lam == 0.0:
        assert lam_eff == 0.0 and torch.equal(out, x[perm])


def test_videomix_box_volume_follows_lam():
    from nft_fast.ops.mixup import videomix_box

    g = torch.Generator().manual_seed(0)
    for lam in (0.1, 0.5, 0.9):  # the box fits whole: its share is 1 - lam up to the sides' rounding
        assert videomix_box((16, 64, 64), lam, g)[1] == pytest.approx(lam, abs=0.05)
    assert videomix_box((8, 8, 8), 1.0, g)[1] == 1.0 and videomix_box((8, 8, 8), 0.0, g)[1] == 0.0
    with pytest.raises(ValueError, match="lam"):
        videomix_box((4, 4), 1.5, g)


def test_videomix_rejects_bad_input():
    from nft_fast.ops.mixup import videomix_batch

    with pytest.raises(ValueError, match="videomix: x must be"):
        videomix_batch(torch.zeros(2, 3, 4), torch.arange(2), 0.5)
    with pytest.raises(ValueError, match="perm"):
        videomix_batch(torch.zeros(2, 1, 4, 4), torch.arange(3), 0.5)


def test_videomix_in_the_purifier_trains_the_masks_of_a_clip_net():
    import nft_fast
    from tests.helpers.nets import Video3D

    torch.manual_seed(0)
    model = Video3D()
    nft_fast.attach_masks(model)
    cfg = nft_fast.NFTConfig(steps=3, rounds=1, batch_size=4, mixup_kind="videomix")
    p = nft_fast.Purifier(model, cfg)
    before = p.flat_masks().clone()
    x, y = torch.randn(4, 3, 4, 8, 8), torch.tensor([0, 1, 2, 1])
    lams = [p.step(x, y)["lam"] for _ in range(3)]
    assert all(0.0 <= v <= 1.0 for v in lams)
    assert (p.flat_masks() - before).abs().max() > 0
    with pytest.raises(ValueError, match="mixup_kind"):
        nft_fast.NFTConfig(mixup_kind="cutout")


def test_auto_mixup_kind_is_videomix_for_clips_and_mixup_for_images():
    """mixup_kind="auto" takes exactly the step of "videomix" on clips and of "mixup" on images."""
    from tests.helpers.nets import Video3D

    def masks_after(model, cfg, x, y):
        torch.manual_seed(0)
        m = copy.deepcopy(model)
        p = nft_fast.Purifier(m, cfg)
        for _ in range(2):
            p.step(x, y)
        return p.flat_masks().clone(), p.cfg

    y = torch.tensor([0, 1, 2, 1])
    cases = [(Video3D(), torch.randn(4, 3, 4, 8, 8), "videomix"),
             (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(4, 3)), torch.randn(4, 3, 8, 8), "mixup")]
    for model, x, kind in cases:
        torch.manual_seed(1)
        nft_fast.attach_masks(model)
        base = nft_fast.NFTConfig(steps=2, rounds=1, batch_size=4)
        auto, cfg_a = masks_after(model, base.replace(mixup_kind="auto"), x, y)
        same, _ = masks_after(model, base.replace(mixup_kind=kind), x, y)
        other, _ = masks_after(model, base.replace(mixup_kind="mixup" if kind == "videomix" else "videomix"), x, y)
        assert cfg_a.mixup_kind == kind
        assert torch.equal(auto, same)
        assert not torch.equal(auto, other)  # the two kinds do differ on this batch


def test_reg_coef_clips_replaces_reg_coef_for_clips_only():

    cfg = nft_fast.NFTConfig(reg_coef=0.05, reg_coef_clips=0.01, mixup_kind="auto")
    clips, images = cfg.for_inputs(True), cfg.for_inputs(False)
    assert (clips.reg_coef, clips.mixup_kind, clips.reg_coef_clips) == (0.01, "videomix", None)
    assert (images.reg_coef, images.mixup_kind, images.reg_coef_clips) == (0.05, "mixup", None)
    assert nft_fast.NFTConfig().for_inputs(True) == nft_fast.NFTConfig()  # the reference has no such choice
    strong = nft_fast.NFTConfig.preset("strong")
    assert strong.for_inputs(False).to_dict() == {**strong.to_dict(), "mixup_kind": "mixup", "reg_coef_clips": None}
    with pytest.raises(ValueError, match="reg_coef_clips"):
        nft_fast.NFTConfig(reg_coef_clips=float("nan"))
    with pytest.raises(ValueError, match="reg_coef_clips"):
        nft_fast.NFTConfig(reg_coef_clips=-1.0)


def test_purify_resolves_the_clip_choices_before_the_first_step():
    from torch.utils.data import TensorDataset
    from tests.helpers.nets import Video3D

    torch.manual_seed(0)
    model = Video3D()
    data = TensorDataset(torch.randn(8, 3, 4, 8, 8), torch.tensor([0, 1, 2, 1, 0, 1, 2, 0]))
    cfg = nft_fast.NFTConfig(steps=2, rounds=1, batch_size=4, reg_coef=0.5, reg_coef_clips=0.002, mixup_kind="auto")
    res = nft_fast.purify(model, data, cfg, progress=False)
    ref = nft_fast.purify(model, data, cfg.replace(reg_coef=0.002, reg_coef_clips=None, mixup_kind="videomix"),
                          progress=False)
    flat = lambda m: torch.cat([p.detach().flatten() for p in nft_fast.masks.mask_parameters(m)])  # noqa: E731
    assert torch.equal(flat(res.model), flat(ref.model))
    unresolved = nft_fast.purify(model, data, cfg.replace(reg_coef_clips=None, mixup_kind="videomix"), progress=False)
    assert not torch.equal(flat(res.model), flat(unresolved.model))  # the clip pull did change the masks
