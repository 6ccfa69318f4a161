"""MixUp ops: the cpp backend (C++/OpenMP, fp32/bf16 CPU) against the torch oracle.

The mixed batch is bit-equal to the oracle (same two rounded fp32 products, one round to
bf16); the CE loss and gradient match it within a few fp32 ulps (its own exp and sums).
"""
import pytest
import torch
import torch.nn.functional as F

import nft_fast
from nft_fast import _build, ops
from nft_fast.ops import mixup as M
from mixup_cases import ce_inputs, loss_and_grad  # noqa: E402

pytestmark = pytest.mark.skipif(not _build.cpp_compiled(), reason="C++ extension not built")

CPU = torch.device("cpu")
BF16 = torch.bfloat16


def _lam(kind):
    return {"zero": 0.0, "one": 1.0, "rand": 0.3719, "tensor": torch.tensor(0.6283),
            "tensor1": torch.tensor([0.1875], dtype=torch.float64), "bf16": torch.tensor([0.3], dtype=BF16)}[kind]


def _cl(x):
    return x.contiguous(memory_format=M.channels_last_format(x.dim(), True))


def _fmt(ndim, channels_last):
    return M.channels_last_format(ndim, channels_last)


def _same(got, want):
    """Bit-equal values (NaN where the oracle has NaN), same dtype, shape and strides."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.stride() == want.stride(), (got.stride(), want.stride())
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------ mixup_batch

# ranks 1-5, B = 1, 2, 7, 33, C not a power of two, MNIST-like 1x28x28, 5-D clips; C = 2, 3, 4
# take the interleaving kernels, C = 6, 70 the tiled transpose; the last ones are large enough
# for the OpenMP branch.
BATCH_SHAPES = [(7,), (2, 5), (33, 10), (1, 5, 9), (7, 3, 5, 6), (5, 4, 3, 7), (33, 1, 28, 28), (2, 3, 32, 32),
                (7, 3, 2, 5, 3), (2, 6, 4, 7, 5), (3, 70, 9, 7), (64, 3, 32, 32), (2, 2, 8, 16, 16)]


# (input dtype, output dtype or None = the input's): every pair the kernels take
BATCH_DTYPES = [(torch.float32, None), (torch.float32, BF16), (BF16, None), (BF16, torch.float32)]


@pytest.mark.parametrize("shape", BATCH_SHAPES, ids=str)
@pytest.mark.parametrize("in_dtype,out_dtype", BATCH_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_bit_equal_to_oracle(shape, in_dtype, out_dtype, channels_last):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).to(in_dtype)
    perm = torch.randperm(shape[0], generator=g)
    got = M.mixup_batch_cpp(x, perm, 0.3719, out_dtype, channels_last)
    want = M.mixup_batch_torch(x, perm, 0.3719, out_dtype, channels_last)
    _same(got, want)
    assert got.is_contiguous(memory_format=_fmt(x.dim(), channels_last))
    # The formula itself: two rounded fp32 products, their sum, one rounding to the output dtype.
    xf = x.float()
    ref = (0.3719 * xf + (1 - 0.3719) * xf[perm]).to(out_dtype or in_dtype)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(7, 3, 5, 6), (3, 2, 5, 7), (3, 4, 5, 7), (3, 70, 9, 7), (2, 3, 2, 5, 3),
                                   (64, 3, 32, 32), (4, 1, 5, 5), (5, 4, 1, 1)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, BF16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_channels_last_input(shape, out_dtype, channels_last):
    # channels_last x: the same layout out is a flat mix, NCHW out the reverse transpose.
    g = torch.Generator().manual_seed(3)
    x = _cl(torch.randn(shape, generator=g))
    perm = torch.randperm(shape[0], generator=g)
    _same(M.mixup_batch_cpp(x, perm, 0.81, out_dtype, channels_last),
          M.mixup_batch_torch(x, perm, 0.81, out_dtype, channels_last))


@pytest.mark.parametrize("view", ["transpose", "slice"])
def test_batch_strided_input(view):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, 7, 4, generator=g)
    x = x.transpose(1, 2) if view == "transpose" else torch.cat([x, x], -1)[..., ::2]
    perm = torch.randperm(6, generator=g)
    for cl in (False, True):
        _same(M.mixup_batch_cpp(x, perm, 0.42, BF16, cl), M.mixup_batch_torch(x, perm, 0.42, BF16, cl))


@pytest.mark.parametrize("B", [1, 2, 33])
@pytest.mark.parametrize("lam", ["zero", "one", "rand", "tensor", "tensor1", "bf16"])
def test_batch_lam_values(B, lam):
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, 3, 4, 5, generator=g)
    perm = torch.randperm(B, generator=g)
    lv = _lam(lam)
    got = M.mixup_batch_cpp(x, perm, lv, channels_last=True)
    _same(got, M.mixup_batch_torch(x, perm, lv, channels_last=True))
    if lam == "zero":
        assert torch.equal(got, x[perm])
    if lam == "one":
        assert torch.equal(got, x)


def test_batch_identity_perm_int32_and_nonfinite():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, 4, 4, generator=g)
    x[1, 0, 0, 0], x[2, 1, 2, 3], x[3, 2, 1, 1] = float("inf"), float("nan"), 1e-40  # a subnormal too
    ident = torch.arange(7)
    for perm in (ident, ident.int(), torch.randperm(7, generator=g).int()):
        for od in (torch.float32, BF16):
            _same(M.mixup_batch_cpp(x, perm, 0.3, od, True), M.mixup_batch_torch(x, perm, 0.3, od, True))


def test_batch_bf16_rounding_ties():
    # fp32 values exactly halfway between two bf16 values: round to nearest even, like torch.
    base = torch.tensor([1.0, 1.0078125, -3.0, 2.0 ** -130])
    x = (base.view(torch.int32) | 0x8000).view(torch.float32).repeat(2, 1)  # the tie bit set
    perm = torch.tensor([1, 0])
    _same(M.mixup_batch_cpp(x, perm, 1.0, BF16), M.mixup_batch_torch(x, perm, 1.0, BF16))


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float64, None), (torch.float16, None),
                                             (torch.float32, torch.float16), (torch.float32, torch.float64)])
def test_batch_other_dtypes_run_torch(dtype, out_dtype):
    x = torch.randn(5, 3, 2, 2).to(dtype)
    perm = torch.randperm(5)
    _same(M.mixup_batch_cpp(x, perm, 0.2, out_dtype, True), M.mixup_batch_torch(x, perm, 0.2, out_dtype, True))


def test_batch_empty_runs_torch():
    x = torch.randn(0, 3, 2, 2)
    got = M.mixup_batch_cpp(x, torch.zeros(0, dtype=torch.int64), 0.5, BF16, True)
    assert got.shape == x.shape and got.dtype == BF16


def test_batch_bad_perm_index():
    # Validation is shared with every backend (test_mixup.py); the C++ kernel checks the indices
    # too (no out-of-bounds read), raising IndexError like torch's indexing.
    with pytest.raises(IndexError):
        M.mixup_batch_cpp(torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 2, 3, 5]), 0.5)


def test_batch_opcheck():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 3, 4, 6, generator=g)
    perm = torch.randperm(5, generator=g)
    op = torch.ops.nft_fast.mixup_batch_cpp.default
    torch.library.opcheck(op, (x, perm, None, 0.3, BF16, True))
    torch.library.opcheck(op, (_cl(x), perm.int(), torch.tensor([0.3]), 0.0, torch.float32, False))
    torch.library.opcheck(op, (x.flatten(1).to(BF16), perm, None, 0.7, torch.float32, True))


# --------------------------------------------------------------------------------- mixup CE


_ce_inputs, _loss_and_grad = ce_inputs, loss_and_grad


def _ce_close(got, want, B, dtype=torch.float32):
    (gl, gg), (wl, wg) = got, want
    assert gl.dtype == wl.dtype == torch.float32 and gl.shape == ()
    assert gg.dtype == wg.dtype == dtype and gg.shape == wg.shape
    torch.testing.assert_close(gl, wl, rtol=1e-6, atol=1e-7)
    if dtype == torch.float32:  # softmax / B: a few fp32 ulps of the larger entries
        torch.testing.assert_close(gg, wg, rtol=1e-5, atol=5e-7 / B)
    else:  # the same fp32 gradient rounded to bf16: at most one bf16 ulp apart
        torch.testing.assert_close(gg, wg, rtol=2.0 ** -7, atol=1e-7 / B)


@pytest.mark.parametrize("B", [1, 2, 7, 33, 128])
@pytest.mark.parametrize("K", [1, 10, 37, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_ce_matches_oracle(B, K, dtype):
    z, y, perm = _ce_inputs(B, K, seed=B * K, dtype=dtype)
    _ce_close(_loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm, 0.3719),
              _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3719), B, dtype)


@pytest.mark.parametrize("lam", ["zero", "one", "rand", "tensor", "tensor1", "bf16"])
@pytest.mark.parametrize("perm_kind", ["random", "identity", "int32"])
def test_ce_lam_and_perm(lam, perm_kind):
    z, y, perm = _ce_inputs(33, 10, seed=7)
    if perm_kind == "identity":
        perm = torch.arange(33)
    lv = _lam(lam)
    want = _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, lv)
    got = _loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm.int() if perm_kind == "int32" else perm, lv)
    _ce_close(got, want, 33)


def test_ce_long_rows_strided_and_upstream_scale():
    # K > 256: several fp32 lane-sum blocks; column-major logits; backward of -2.5 * loss.
    z, y, perm = _ce_inputs(9, 5003, seed=8)
    zt = z.t().contiguous().t()
    _ce_close(_loss_and_grad(M.mixup_cross_entropy_cpp, zt, y, perm, 0.6, scale=-2.5),
              _loss_and_grad(M.mixup_cross_entropy_torch, zt, y, perm, 0.6, scale=-2.5), 9 / 2.5)


def test_ce_masked_classes_and_nan_rows():
    z, y, perm = _ce_inputs(6, 12, seed=9)
    z[:, 11] = float("-inf")  # a class nobody is labelled with: exp -> 0, no gradient
    z[:, 10] = -200.0  # exp underflows
    y = y.clamp(max=9)
    _ce_close(_loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm, 0.3),
              _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3), 6)
    z[2, 3] = float("nan")
    assert torch.isnan(M.mixup_cross_entropy_cpp(z, y, perm, 0.3))


def test_ce_no_grad_and_repeatable():
    z, y, perm = _ce_inputs(128, 1000, seed=10)
    with torch.no_grad():
        a = M.mixup_cross_entropy_cpp(z.requires_grad_(), y, perm, 0.37)
    assert not a.requires_grad
    b = M.mixup_cross_entropy_cpp(z.detach(), y, perm, 0.37)
    c, _ = _loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm, 0.37)
    assert torch.equal(a, b) and torch.equal(a, c), "row losses are reduced in a fixed order"
    torch.testing.assert_close(a, M.mixup_cross_entropy_torch(z.detach(), y, perm, 0.37), rtol=1e-6, atol=1e-7)


def test_ce_retain_graph_backward_twice():
    z, y, perm = _ce_inputs(7, 10, seed=11)
    z.requires_grad_()
    loss = M.mixup_cross_entropy_cpp(z, y, perm, 0.3)
    (g1,) = torch.autograd.grad(loss, z, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2, z)
    torch.testing.assert_close(g2, 2 * g1, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_ce_other_dtypes_run_torch(dtype):
    z, y, perm = _ce_inputs(7, 10, seed=12, dtype=dtype)
    got = _loss_and_grad(M.mixup_cross_entropy_cpp, z, y, perm, 0.3)
    want = _loss_and_grad(M.mixup_cross_entropy_torch, z, y, perm, 0.3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_ce_bad_indices_and_empty():
    z, y, perm = _ce_inputs(5, 4, seed=13)
    for impl in (M.mixup_cross_entropy_torch, M.mixup_cross_entropy_cpp):
        with pytest.raises(ValueError, match="empty logits"):
            impl(z[:, :0], y, perm, 0.5)
        with pytest.raises(IndexError):
            impl(z, torch.tensor([0, 1, 2, 3, 4]), perm, 0.5)  # label 4 of 4 classes
        with pytest.raises(IndexError):
            impl(z, y, torch.tensor([0, 1, 2, 3, 5]), 0.5)


def test_ce_opcheck():
    z, y, perm = _ce_inputs(7, 37, seed=14)
    z.requires_grad_()
    fwd = torch.ops.nft_fast.mixup_ce_cpp_fwd.default
    torch.library.opcheck(fwd, (z, y, perm, None, 0.3))
    torch.library.opcheck(fwd, (z, y, perm.int(), torch.tensor([0.3]), 0.0))
    torch.library.opcheck(fwd, (z.detach().bfloat16().requires_grad_(), y, perm, None, 0.9))
    torch.library.opcheck(torch.ops.nft_fast.mixup_ce_cpp_bwd.default, (torch.tensor(2.0), torch.randn(7, 37), BF16))


# ----------------------------------------------------------------------- dispatch / compile


def test_dispatch_cpp():
    z, y, perm = _ce_inputs(7, 10, seed=15)
    x = torch.randn(7, 3, 4, 4)
    with nft_fast.use_backend("cpp"):
        assert ops.resolved_backend("mixup_batch", CPU) == "cpp"
        assert ops.resolved_backend("mixup_ce", CPU) == "cpp"
        a = M.mixup_batch(x, perm, 0.3, channels_last=True)
        la = M.mixup_cross_entropy(z, y, perm, 0.3)
    with nft_fast.use_backend("auto"):  # both beat torch on the CPU (bench/test_ops_bench.py)
        assert ops.resolved_backend("mixup_batch", CPU) == "cpp"
        assert ops.resolved_backend("mixup_ce", CPU) == "cpp"
    _same(a, M.mixup_batch_torch(x, perm, 0.3, channels_last=True))
    torch.testing.assert_close(la, M.mixup_cross_entropy_torch(z, y, perm, 0.3), rtol=1e-6, atol=1e-7)


def compile_fullgraph_check(batch_fn, ce_fn, lam, dev="cpu"):
    """A MixUp step (batch -> linear -> CE) through ``batch_fn``/``ce_fn`` compiled with
    fullgraph=True equals eager and the torch oracle (loss and weight gradient)."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(5, 3, 4, 6, generator=g).to(dev)
    perm = torch.randperm(5, generator=g).to(dev)
    y = torch.randint(0, 10, (5,), generator=g).to(dev)
    w = torch.randn(10, 3 * 4 * 6, generator=g).to(dev).requires_grad_()

    def step(x, perm, lam, w, y):
        xm = batch_fn(x, perm, lam, BF16, True)
        return ce_fn(F.linear(xm.float().flatten(1), w), y, perm, lam)

    want = step(x, perm, lam, w, y)
    (gw_want,) = torch.autograd.grad(want, w)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x, perm, lam, w, y)
    (gw_got,) = torch.autograd.grad(got, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw_got, gw_want, rtol=1e-5, atol=1e-6)
    xm = M.mixup_batch_torch(x, perm, lam, BF16, True).float()
    ref = M.mixup_cross_entropy_torch(F.linear(xm.flatten(1), w.detach()), y, perm, lam)
    torch.testing.assert_close(got.detach(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lam_kind", ["tensor", "float"])
def test_compile_fullgraph_step(lam_kind):
    compile_fullgraph_check(M.mixup_batch_cpp, M.mixup_cross_entropy_cpp,
                            torch.tensor(0.37) if lam_kind == "tensor" else 0.37)
