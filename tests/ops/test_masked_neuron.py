"""Triton masked Linear / Conv epilogue against the torch implementations (forward and backward)."""
import pytest

pytest.importorskip("triton")

import torch
import torch.nn.functional as F

import nft_fast
from nft_fast import ops
from nft_fast.ops.masked_neuron import (
    masked_channel_bwd, masked_channel_fwd, masked_conv_torch, masked_conv_triton, masked_linear_bwd,
    masked_linear_fwd, masked_linear_torch, masked_linear_triton,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def close(got, want, rtol=1e-5):
    """fp32 vs the float64 torch oracle, with atol scaled to the values' magnitude."""
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * max(1.0, want.abs().max().item()))


def grads(fn, inputs, dy):
    for t in inputs:
        if t is not None:
            t.grad = None
    y = fn()
    y.backward(dy)
    return y, [None if t is None or t.grad is None else t.grad.clone() for t in inputs]


def leaf(t, rg):
    return t.detach().clone().requires_grad_(rg)


# ---------------------------------------------------------------------------- masked_linear

LINEAR_CASES = [  # (leading dims of x, N, K)
    ((1,), 10, 3), ((7,), 33, 100), ((1030,), 33, 100), ((1030,), 10, 3), ((2, 3, 5), 17, 40), ((7,), 1, 1),
]


@pytest.mark.parametrize("lead,N,K", LINEAR_CASES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_forward_backward(lead, N, K, has_bias):
    g = torch.Generator().manual_seed(N * 1000 + K)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    m = torch.rand(N, generator=g) * 1.5 - 0.25
    b = torch.randn(N, generator=g) if has_bias else None
    dy = torch.randn(*lead, N, generator=g)
    ins = [leaf(x, True), w, leaf(b, True) if has_bias else None, leaf(m, True)]
    y, (dx, _, db, dm) = grads(lambda: masked_linear_triton(*ins), ins, dy)
    ref = [leaf(x.double(), True), w.double(), leaf(b.double(), True) if has_bias else None, leaf(m.double(), True)]
    y_ref, (dx_ref, _, db_ref, dm_ref) = grads(lambda: masked_linear_torch(*ref), ref, dy.double())
    close(y, y_ref)
    close(dx, dx_ref)
    close(dm, dm_ref)
    if has_bias:
        close(db, db_ref)
    # And through the dispatcher.
    with nft_fast.use_backend("triton"):
        assert ops.resolved_backend("masked_linear", x.device) == "triton"
        close(ops.masked_linear(*ins).detach(), y_ref.detach())


def test_linear_computes_only_needed_grads():
    g = torch.Generator().manual_seed(1)
    x, w, m = torch.randn(7, 12, generator=g), torch.randn(5, 12, generator=g), torch.rand(5, generator=g)
    # Mask only (x and the bias frozen): no dx.
    xs, ms = x.clone(), m.clone().requires_grad_()
    masked_linear_triton(xs, w, torch.randn(5), ms).sum().backward()
    assert xs.grad is None and ms.grad is not None
    mr = m.double().requires_grad_()
    masked_linear_torch(x.double(), w.double(), None, mr).sum().backward()
    close(ms.grad, mr.grad)
    # Without grad mode nothing is kept for backward: z is not even written.
    with torch.no_grad():
        y = masked_linear_triton(x, w, None, m.clone().requires_grad_())
    assert not y.requires_grad
    y, z = masked_linear_fwd(x, w, None, m, False)
    assert z.numel() == 0
    y, z = masked_linear_fwd(x, w, None, m, True)
    close(z, x.double() @ w.double().t())
    dx, dm, db = masked_linear_bwd(torch.ones(7, 5), w, m, None, True, False, False)
    assert dx.shape == (7, 12) and dm.numel() == 0 and db.numel() == 0


def test_linear_trainable_weight_gets_dw():
    g = torch.Generator().manual_seed(2)
    x, w, m, b = (torch.randn(9, 20, generator=g), torch.randn(11, 20, generator=g), torch.rand(11, generator=g),
                  torch.randn(11, generator=g))
    dy = torch.randn(9, 11, generator=g)
    ins = [leaf(x, True), leaf(w, True), leaf(b, True), leaf(m, True)]
    _, got = grads(lambda: masked_linear_triton(*ins), ins, dy)
    ref = [leaf(t.double(), True) for t in (x, w, b, m)]
    _, want = grads(lambda: masked_linear_torch(*ref), ref, dy.double())
    for a, e in zip(got, want):
        close(a, e)


def test_linear_rejects_bad_input():
    x, w, m = torch.randn(4, 6), torch.randn(3, 6), torch.ones(3)
    with pytest.raises(ValueError, match="must end in K=6"):
        masked_linear_triton(torch.randn(4, 5), w, None, m)
    with pytest.raises(ValueError, match=r"mask must have shape \(3,\)"):
        masked_linear_triton(x, w, None, torch.ones(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        masked_linear_triton(x, w, torch.ones(3, 1), m)
    with pytest.raises(ValueError, match="share one of"):
        masked_linear_triton(x.double(), w.double(), None, m)
    with pytest.raises(ValueError, match="share one of"):
        masked_linear_triton(x.half(), w, None, m)


def test_linear_opcheck():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 19, generator=g, requires_grad=True)
    w = torch.randn(10, 19, generator=g)
    m = torch.rand(10, generator=g, requires_grad=True)
    b = torch.randn(10, generator=g, requires_grad=True)
    torch.library.opcheck(masked_linear_fwd, (x, w, b, m, True))
    torch.library.opcheck(masked_linear_fwd, (x.detach()[None], w, None, m, True))
    torch.library.opcheck(masked_linear_fwd, (x.detach(), w, b.detach(), m.detach(), False))
    dy, z = torch.randn(7, 10, generator=g), torch.randn(7, 10, generator=g)
    torch.library.opcheck(masked_linear_bwd, (dy, w, m.detach(), z, True, True, True))
    torch.library.opcheck(masked_linear_bwd, (dy[None], w, m.detach(), None, False, False, True))


# ---------------------------------------------------------------------------- masked_conv


def conv_case(kind):
    """(x, conv weight, conv kwargs, memory format) for one layout."""
    g = torch.Generator().manual_seed(len(kind))
    if kind == "2d":
        return torch.randn(2, 6, 35, 37, generator=g), torch.randn(9, 2, 3, 3, generator=g), dict(padding=1, groups=3), None
    if kind == "2d_cl":
        return (torch.randn(2, 4, 35, 37, generator=g), torch.randn(5, 4, 3, 3, generator=g),
                dict(padding=1), torch.channels_last)
    if kind == "2d_strided":
        return (torch.randn(7, 3, 9, 8, generator=g), torch.randn(33, 3, 3, 3, generator=g),
                dict(stride=2, padding=1, dilation=1), torch.channels_last)
    if kind == "1d":
        return torch.randn(7, 3, 40, generator=g), torch.randn(6, 3, 5, generator=g), dict(stride=2, padding=2), None
    if kind == "3d":
        return torch.randn(2, 3, 5, 6, 7, generator=g), torch.randn(5, 3, 3, 3, 3, generator=g), dict(padding=1), None
    if kind == "3d_cl":
        return (torch.randn(1, 3, 5, 6, 7, generator=g), torch.randn(7, 3, 3, 1, 3, generator=g),
                dict(dilation=(1, 1, 2)), torch.channels_last_3d)
    raise KeyError(kind)


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


@pytest.mark.parametrize("kind", ["2d", "2d_cl", "2d_strided", "1d", "3d", "3d_cl"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_conv_forward_backward(kind, has_bias):
    x, w, kw, fmt = conv_case(kind)
    if fmt is not None:
        x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    C = w.shape[0]
    g = torch.Generator().manual_seed(C)
    m = torch.rand(C, generator=g) * 1.5 - 0.25
    b = torch.randn(C, generator=g) if has_bias else None
    fconv = _CONV[x.dim()]
    ins = [leaf(x, True), w, leaf(b, True) if has_bias else None, leaf(m, True)]
    y = masked_conv_triton(ins[0], lambda t: fconv(t, ins[1], None, **kw), ins[2], ins[3])
    dy = torch.randn(y.shape, generator=g)
    _, (dx, _, db, dm) = grads(lambda: masked_conv_triton(ins[0], lambda t: fconv(t, ins[1], None, **kw), ins[2], ins[3]),
                               ins, dy)
    ref = [leaf(x.double(), True), w.double(), leaf(b.double(), True) if has_bias else None, leaf(m.double(), True)]
    y_ref, (dx_ref, _, db_ref, dm_ref) = grads(
        lambda: masked_conv_torch(ref[0], lambda t: fconv(t, ref[1], None, **kw), ref[2], ref[3]), ref, dy.double())
    close(y, y_ref)
    close(dx, dx_ref)
    close(dm, dm_ref)
    if has_bias:
        close(db, db_ref)
    # Layouts follow torch's: y like the convolution output, dx like the input.
    assert y.stride() == y_ref.stride() and dx.stride() == dx_ref.stride()
    if fmt == torch.channels_last:
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)


def test_conv_epilogue_odd_layouts_and_broadcast_grad():
    g = torch.Generator().manual_seed(4)
    m = torch.rand(5, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    # A conv output viewed with swapped spatial dims: its spatial strides do not flatten.
    z0 = torch.randn(3, 5, 4, 6, generator=g)
    x = z0.clone().requires_grad_()
    y = masked_conv_triton(x, lambda t: t.transpose(2, 3), b, m)
    want = masked_conv_torch(x.double(), lambda t: t.transpose(2, 3), b.double(), m.double())
    close(y, want)
    assert y.stride() == torch.empty_like(z0.transpose(2, 3)).stride()
    # y.sum() hands back a stride-0 (expanded) gradient.
    y.sum().backward()
    xr, mr, br = (t.detach().double().requires_grad_() for t in (x, m, b))
    masked_conv_torch(xr, lambda t: t.transpose(2, 3), br, mr).sum().backward()
    close(x.grad, xr.grad)
    close(m.grad, mr.grad)
    close(b.grad, br.grad)


def test_conv_only_needed_grads_and_errors():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    m = torch.rand(4, generator=g, requires_grad=True)
    y = masked_conv_triton(x, lambda t: F.conv2d(t, w), None, m)
    y.sum().backward()
    assert x.grad is None and m.grad is not None
    dz, dm, db = masked_channel_bwd(torch.ones(2, 4, 4, 4), None, m.detach(), torch.float32, 0, True, False, False)
    assert dz.shape == (2, 4, 4, 4) and dm.numel() == 0 and db.numel() == 0
    with pytest.raises(ValueError, match=r"mask must have shape \(4,\)"):
        masked_conv_triton(x, lambda t: F.conv2d(t, w), None, torch.ones(3))
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        masked_conv_triton(x.double(), lambda t: F.conv2d(t, w.double()), None, torch.ones(4))


def test_conv_opcheck():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, 5, 4, 7, generator=g, requires_grad=True)
    m = torch.rand(5, generator=g, requires_grad=True)
    b = torch.randn(5, generator=g, requires_grad=True)
    torch.library.opcheck(masked_channel_fwd, (z, m, b))
    torch.library.opcheck(masked_channel_fwd, (z.detach().contiguous(memory_format=torch.channels_last), m, None))
    torch.library.opcheck(masked_channel_fwd, (torch.randn(7, 5, 9, requires_grad=True), m, b))
    dy = torch.randn(3, 5, 4, 7, generator=g)
    torch.library.opcheck(masked_channel_bwd, (dy, z.detach(), m.detach(), torch.float32, 0, True, True, True))
    torch.library.opcheck(masked_channel_bwd, (dy.contiguous(memory_format=torch.channels_last), None, m.detach(),
                                               torch.float32, 1, True, False, True))


def test_compile_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(6, 3, 3, 3, generator=g), torch.randn(10, 6 * 16, generator=g) / 10
    m1, b1 = torch.rand(6, generator=g), torch.randn(6, generator=g)
    m2, b2 = torch.rand(10, generator=g), torch.randn(10, generator=g)
    x = torch.randn(5, 3, 4, 4, generator=g)

    def f(x, m1, m2):
        h = torch.relu(masked_conv_triton(x, lambda t: F.conv2d(t, w1, padding=1), b1, m1))
        return masked_linear_triton(h.flatten(1), w2, b2, m2)

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        ins = [x.clone().requires_grad_(), m1.clone().requires_grad_(), m2.clone().requires_grad_()]
        y = fn(*ins)
        y.square().sum().backward()
        outs.append([y.detach()] + [t.grad for t in ins])
    for a, e in zip(*outs):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_linear_large(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(4099, 1000, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(777, 1000, device="cuda", generator=g) / 30).to(dtype)
    m = torch.rand(777, device="cuda", generator=g).requires_grad_()
    b = torch.randn(777, device="cuda", generator=g).to(dtype).requires_grad_()
    dy = torch.randn(4099, 777, device="cuda", generator=g)
    ins = [x, w, b, m]
    y, got = grads(lambda: masked_linear_triton(*ins), ins, dy)
    ref = [leaf(x.double(), True), w.double(), leaf(b.double(), True), leaf(m.double(), True)]
    y_ref, want = grads(lambda: masked_linear_torch(*ref), ref, dy.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # fp32 GEMMs may run in TF32 on the GPU
    for a, e in [(y, y_ref), (got[0], want[0]), (got[2], want[2]), (got[3], want[3])]:
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * e.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_gpu_conv_epilogue_large(dtype, fmt):
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(64, 96, 56, 56, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    z.requires_grad_()
    m = torch.rand(96, device="cuda", generator=g).requires_grad_()
    b = torch.randn(96, device="cuda", generator=g).requires_grad_()
    dy = torch.randn(z.shape, device="cuda", generator=g).contiguous(memory_format=fmt)
    ins = [z, None, b, m]
    y, (dz, _, db, dm) = grads(lambda: masked_conv_triton(z, lambda t: t, b, m), ins, dy)
    ref = [leaf(z.double(), True), None, leaf(b.double(), True), leaf(m.double(), True)]
    y_ref, (dz_ref, _, db_ref, dm_ref) = grads(lambda: masked_conv_torch(ref[0], lambda t: t, ref[2], ref[3]), ref,
                                               dy.double())
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=fmt) and dz.is_contiguous(memory_format=fmt)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for a, e in [(y, y_ref), (dz, dz_ref), (db, db_ref), (dm, dm_ref)]:
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * e.abs().max().item())
