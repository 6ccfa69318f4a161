"""MixUp ops: the Triton mixed batch and two-label CE against the torch oracle."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_fast  # noqa: E402
from nft_fast import ops  # noqa: E402
from nft_fast.ops import mixup as M  # noqa: E402
from mixup_cases import ce_inputs, loss_and_grad  # noqa: E402

CPU = torch.device("cpu")
HALF = (torch.float16, torch.bfloat16)


def _tol(dtype):
    # bf16: the interpreter truncates fp32 -> bf16 where torch rounds to nearest: 1 ulp.
    return {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}[dtype]


def _lam(kind, device=CPU):
    return {"zero": 0.0, "one": 1.0, "rand": 0.3719, "tensor": torch.tensor(0.6283, device=device),
            "tensor1": torch.tensor([0.1875], dtype=torch.float64, device=device)}[kind]


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


# ------------------------------------------------------------------------------ mixup_batch


SHAPES = {3: (7, 5, 9), 4: (7, 3, 5, 6), 5: (7, 3, 2, 5, 3)}


@pytest.mark.parametrize("ndim", [3, 4, 5])
@pytest.mark.parametrize("layout", ["nc", "cl", "view"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_batch_layouts_and_dtypes(ndim, layout, channels_last, dtype):
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


@pytest.mark.parametrize("B", [1, 7, 130])
@pytest.mark.parametrize("lam", ["zero", "one", "rand", "tensor", "tensor1"])
def test_batch_lam_values(B, lam):
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


def test_batch_tensor_lam_is_read_at_run_time():
    # The same lam tensor, updated in place, gives the new mix (what a CUDA graph replay needs).
    x = torch.randn(6, 11)
    perm = torch.randperm(6)
    lam = torch.tensor([0.25])
    a = M.mixup_batch_triton(x, perm, lam)
    lam.fill_(0.75)
    b = M.mixup_batch_triton(x, perm, lam)
    torch.testing.assert_close(a, 0.25 * x + 0.75 * x[perm], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, 0.75 * x + 0.25 * x[perm], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,layout,channels_last", [
    ((3, 70, 9, 7), "nc", True),  # a transpose with several tiles along both axes
    ((2, 70, 9, 7), "cl", False),
    ((2, 5000), "nc", False),  # several tiles along one axis
    ((9,), "nc", False),  # rank 1: one scalar per sample
    ((4, 3, 5, 2), "perm", True),  # not collapsible to 2 axes: copied first
])
def test_batch_tiles_and_odd_ranks(shape, layout, channels_last):
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


def test_batch_half_input_mixed_in_fp32():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 3, 4, 4, generator=g).to(torch.float16)
    perm = torch.randperm(7, generator=g)
    got = M.mixup_batch_triton(x, perm, 0.3, torch.float32, True)
    want = 0.3 * x.float() + 0.7 * x.float()[perm]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_batch_float64_falls_back_to_torch():
    x = torch.randn(5, 4, dtype=torch.float64)
    perm = torch.randperm(5)
    assert torch.equal(M.mixup_batch_triton(x, perm, 0.2), M.mixup_batch_torch(x, perm, 0.2))


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


def test_batch_opcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 4, 6, generator=g)
    perm = torch.randperm(5, generator=g)
    op = torch.ops.nft_fast.mixup_batch.default
    torch.library.opcheck(op, (x, perm, None, 0.3, torch.float16, True))
    torch.library.opcheck(op, (x.contiguous(memory_format=torch.channels_last), perm, torch.tensor([0.3]), 0.0,
                               torch.float32, False))


# --------------------------------------------------------------------------------- mixup CE


_ce_inputs, _loss_and_grad = ce_inputs, loss_and_grad


@pytest.mark.parametrize("B", [1, 7, 130])
@pytest.mark.parametrize("K", [2, 10, 37, 1001])
@pytest.mark.parametrize("lam", ["zero", "one", "rand", "tensor"])
def test_ce_matches_oracle(B, K, lam):
    z, y, perm = _ce_inputs(B, K, seed=B * K)
    lv = _lam(lam)
    want_l, want_g = _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, lv)
    got_l, got_g = _loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, lv)
    assert got_l.dtype == torch.float32 and got_l.shape == ()
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6 / B)


def test_ce_many_rows():
    # > 1000 rows: several programs, so the two-stage (partials then sum) reduction runs.
    z, y, perm = _ce_inputs(1030, 3, seed=3)
    want_l, want_g = _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.55)
    got_l, got_g = _loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, 0.55)
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-9)


def test_ce_oracle_is_the_formula():
    z, y, perm = _ce_inputs(9, 13, seed=4)
    lam = 0.37
    rows = torch.logsumexp(z.double(), 1) - lam * z.double()[torch.arange(9), y] \
        - (1 - lam) * z.double()[torch.arange(9), y[perm]]
    torch.testing.assert_close(M.mixup_cross_entropy_torch(z, y, perm, lam).double(), rows.mean(),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("B,K,block_k", [(7, 1001, 256), (130, 37, 16), (1, 10, 16)])
def test_ce_looped_class_blocks(B, K, block_k):
    from nft_fast.kernels import mixup as K_

    z, y, perm = _ce_inputs(B, K, seed=K)
    want_l, want_g = _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.4)
    loss, dz = K_.mixup_ce_fwd(z, y, perm, 0.4, None, block_k=block_k)
    torch.testing.assert_close(loss, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, want_g, rtol=1e-5, atol=1e-6 / B)
    loss_t, dz_t = K_.mixup_ce_fwd(z, y, perm, 0.0, torch.tensor([0.4], dtype=torch.float64), block_k=block_k)
    torch.testing.assert_close(loss_t, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz_t, want_g, rtol=1e-5, atol=1e-6 / B)


def test_ce_strided_logits_and_upstream_scale():
    z, y, perm = _ce_inputs(37, 11, seed=5)
    zt = z.t().contiguous().t()  # column-major [B, K]
    want_l, want_g = _loss_and_grad(M.mixup_cross_entropy_torch, zt, y, perm, 0.6, scale=-2.5)
    got_l, got_g = _loss_and_grad(M.mixup_cross_entropy_triton, zt, y, perm, 0.6, scale=-2.5)
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", HALF)
def test_ce_half_logits(dtype):
    z, y, perm = _ce_inputs(7, 37, seed=6, dtype=dtype)
    want_l, want_g = _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3)
    got_l, got_g = _loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, 0.3)
    assert got_l.dtype == want_l.dtype == torch.float32 and got_g.dtype == dtype
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-6)  # same fp32 math on the same inputs
    torch.testing.assert_close(got_g, want_g, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("impl", [M.mixup_cross_entropy_torch, M.mixup_cross_entropy_triton,
                                  M.mixup_cross_entropy_cpp, M.mixup_cross_entropy_cuda])
def test_ce_bad_input(impl):
    z, y, perm = _ce_inputs(5, 4, seed=7)
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


def test_ce_opcheck():
    z, y, perm = _ce_inputs(7, 37, seed=8)
    z.requires_grad_()
    fwd = torch.ops.nft_fast.mixup_ce_fwd.default
    torch.library.opcheck(fwd, (z, y, perm, None, 0.3))
    torch.library.opcheck(fwd, (z, y, perm, torch.tensor([0.3]), 0.0))
    torch.library.opcheck(fwd, (z.detach().bfloat16(), y, perm, None, 0.9))
    torch.library.opcheck(torch.ops.nft_fast.mixup_ce_bwd.default,
                          (torch.tensor(2.0), torch.randn(7, 37), torch.bfloat16))


# ----------------------------------------------------------------------- dispatch / compile


def test_dispatch_triton_and_torch():
    z, y, perm = _ce_inputs(7, 10, seed=9)
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


@pytest.mark.parametrize("lam_kind", ["tensor", "float"])
def test_compile_fullgraph_step(lam_kind):
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_batch_large(dtype):
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K", [(4096, 1000), (1000, 1001), (64, 32000)])
def test_gpu_ce_large(dtype, B, K):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(12)
    z = (torch.randn(B, K, device=dev, generator=g) * 4).to(dtype)
    y = torch.randint(0, K, (B,), device=dev, generator=g)
    perm = torch.randperm(B, device=dev, generator=g)
    lam = torch.tensor(0.42, device=dev)
    want_l, want_g = _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, lam)
    got_l, got_g = _loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, lam)
    torch.testing.assert_close(got_l, want_l, rtol=1e-5, atol=1e-5)
    gtol = 1e-5 / B if dtype == torch.float32 else 1e-2 / B
    torch.testing.assert_close(got_g, want_g, rtol=1e-2 if dtype in HALF else 1e-4, atol=gtol)
    again, _ = _loss_and_grad(M.mixup_cross_entropy_triton, z, y, perm, lam)
    assert torch.equal(again, got_l), "the loss reduction must be deterministic"


@pytest.mark.gpu
def test_gpu_cuda_graph_fresh_lam():
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
