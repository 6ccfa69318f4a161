"""Triton masked LayerNorm against the torch oracle (forward and every gradient)."""
import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

import nft_fast  # noqa: E402
from nft_fast import ops  # noqa: E402
from nft_fast.ops.masked_layer_norm import (  # noqa: E402
    masked_layer_norm_torch,
    masked_layer_norm_triton,
    masked_ln_bwd,
    masked_ln_fwd,
)

pytestmark = pytest.mark.skipif(not ops.backend_available("triton"), reason="triton cannot run here")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(shape, ns, seed=0, bias=True, dtype=torch.float32, device=DEV):
    """x with a non-zero mean and mixed scale, weight of both signs, mask in [0, 1] (some exact 0/1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.5 + 0.7
    w = torch.randn(ns, generator=g)
    m = torch.rand(ns, generator=g)
    m.view(-1)[::5] = 1.0
    m.view(-1)[1::7] = 0.0
    b = torch.randn(ns, generator=g) if bias else None
    dy = torch.randn(shape, generator=g)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x).to(dtype), to(w), to(m), to(b), to(dy).to(dtype)


def run(fn, x, ns, w, m, b, dy, grads=(True, True, True, True), eps=1e-5):
    """Forward + backward of ``fn``; returns y and the grads (None where not requested)."""
    leaves = [t.detach().clone().requires_grad_(r) if t is not None else None for t, r in zip((x, w, m, b), grads)]
    xx, ww, mm, bb = leaves
    y = fn(xx, ns, ww, bb, mm, eps)
    if any(t is not None and t.requires_grad for t in leaves):
        y.backward(dy)
    return [y.detach()] + [t.grad if t is not None else None for t in leaves]


def assert_close(got, want, rtol=1e-5, atol_rel=1e-5, name=""):
    """Tight fp32 comparison; atol scales with the values so long row sums are judged fairly."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol_rel * scale, msg=lambda s: f"{name}: {s}")


NAMES = ("y", "dx", "dweight", "dmask", "dbias")

CASES = [
    ((1, 768), (768,)),
    ((7, 33), (33,)),
    ((1030, 7), (7,)),
    ((3, 5, 100), (100,)),
    ((2, 3, 4, 5), (4, 5)),  # multi-dim normalized_shape, flattened to D = 20
    ((1031, 48), (48,)),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,ns", CASES)
def test_matches_torch(shape, ns, bias):
    args = make(shape, ns, seed=sum(shape), bias=bias)
    want = run(masked_layer_norm_torch, *[args[0], ns, *args[1:]])
    got = run(masked_layer_norm_triton, *[args[0], ns, *args[1:]])
    for name, a, b in zip(NAMES, got, want):
        if b is None:
            assert a is None, name
        else:
            assert_close(a, b, name=name)


def test_float64_reference_agrees():
    """The fp32 kernel is as close to a float64 LayerNorm as torch's own fp32 one is."""
    x, w, m, b, dy = make((1030, 100), (100,), seed=3)
    got = run(masked_layer_norm_triton, x, (100,), w, m, b, dy)
    ref = run(masked_layer_norm_torch, x.double(), (100,), w.double(), m.double(), b.double(), dy.double())
    tor = run(masked_layer_norm_torch, x, (100,), w, m, b, dy)
    for name, g, r, t in zip(NAMES, got, ref, tor):
        err_k = (g.double() - r).abs().max().item()
        err_t = (t.double() - r).abs().max().item()
        assert err_k <= 4 * err_t + 1e-6 * r.abs().max().item(), (name, err_k, err_t)


@pytest.mark.parametrize("shape,ns", [((7, 33), (33,)), ((1030, 100), (100,)), ((2, 3, 4, 9), (4, 9))])
def test_looped_path(monkeypatch, shape, ns):
    """Rows wider than MAX_FUSED_BLOCK_D walk D in chunks; force that path on small shapes."""
    from nft_fast.kernels import masked_layer_norm as K

    monkeypatch.setattr(K, "MAX_FUSED_BLOCK_D", 8)
    monkeypatch.setattr(K, "LOOPED_BLOCK_D", 16)
    args = make(shape, ns, seed=5)
    want = run(masked_layer_norm_torch, args[0], ns, *args[1:])
    got = run(masked_layer_norm_triton, args[0], ns, *args[1:])
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, name=name)
    # Only some gradients on the looped path too.
    got = run(masked_layer_norm_triton, args[0], ns, *args[1:], grads=(False, False, True, True))
    assert got[1] is None and got[2] is None
    assert_close(got[3], want[3], name="dmask")
    assert_close(got[4], want[4], name="dbias")


@pytest.mark.parametrize("grads", [(True, False, False, False), (False, False, True, False),
                                   (False, True, False, False), (False, False, False, True),
                                   (False, True, True, False)])
def test_subset_of_grads(grads):
    args = make((7, 33), (33,), seed=11)
    want = run(masked_layer_norm_torch, args[0], (33,), *args[1:], grads=grads)
    got = run(masked_layer_norm_triton, args[0], (33,), *args[1:], grads=grads)
    for name, a, b, r in zip(NAMES[1:], got[1:], want[1:], grads):
        assert (a is None) == (not r), name
        if r:
            assert_close(a, b, name=name)


def test_bwd_op_computes_only_what_is_asked():
    x, w, m, b, dy = make((7, 33), (33,), seed=2)
    y, mean, rstd = masked_ln_fwd(x, w, b, m, 1e-5)
    assert mean.shape == (7,) and rstd.shape == (7,) and mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean, x.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd, torch.rsqrt(x.var(1, unbiased=False) + 1e-5), rtol=1e-5, atol=1e-6)
    dx, dw, dm, db = masked_ln_bwd(dy, x, w, m, mean, rstd, False, False, True, False)
    assert dx.numel() == 0 and dw.numel() == 0 and db.numel() == 0 and dm.shape == (33,)
    xhat = (x - mean[:, None]) * rstd[:, None]
    torch.testing.assert_close(dm, w * (dy * xhat).sum(0), rtol=1e-5, atol=1e-5)


def test_non_contiguous_input_and_grad():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(33, 9, 7, generator=g).to(DEV)
    w, m, b = (torch.randn(33, generator=g).to(DEV) for _ in range(3))
    outs = []
    for fn in (masked_layer_norm_torch, masked_layer_norm_triton):
        xb = base.clone().requires_grad_()
        ps = [p.clone().requires_grad_() for p in (w, m, b)]
        x = xb.permute(2, 1, 0)  # [7, 9, 33], last dim strided
        assert not x.is_contiguous()
        y = fn(x, (33,), ps[0], ps[2], ps[1], 1e-6)
        (y.transpose(0, 1) * torch.arange(7.0, device=DEV)[:, None]).sum().backward()  # non-contiguous dy
        outs.append([y.detach(), xb.grad] + [p.grad for p in ps])
    for a, b_ in zip(*outs):
        assert_close(a, b_)


def test_zero_rows():
    x, w, m, b, dy = make((0, 5, 33), (33,))
    got = run(masked_layer_norm_triton, x, (33,), w, m, b, dy)
    assert got[0].shape == (0, 5, 33)
    for t in got[2:]:
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("half_params", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_small(dtype, half_params):
    """Half x with fp32 (or half) parameters: y/dx in x's dtype, parameter grads in theirs."""
    x, w, m, b, dy = make((7, 100), (100,), dtype=dtype, seed=9)
    pdt = dtype if half_params else torch.float32
    w, m, b = w.to(pdt), m.to(pdt), b.to(pdt)
    got = run(masked_layer_norm_triton, x, (100,), w, m, b, dy)
    ref = run(masked_layer_norm_torch, x.float(), (100,), w.float(), m.float(), b.float(), dy.float())
    assert got[0].dtype == got[1].dtype == dtype
    assert got[2].dtype == got[3].dtype == got[4].dtype == pdt
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for name, a, r in zip(NAMES, got, ref):
        assert_close(a.float(), r, rtol=tol, atol_rel=2 * tol, name=name)


def test_dispatch_uses_triton():
    x, w, m, b, _ = make((7, 33), (33,))
    with nft_fast.use_backend("triton"):
        assert ops.resolved_backend("masked_ln", x.device) == "triton"
        y = ops.masked_layer_norm(x, (33,), w, b, m, 1e-5)
    assert_close(y, masked_layer_norm_torch(x, (33,), w, b, m, 1e-5))


def test_masked_layernorm_module_on_triton():
    """A masked nn.LayerNorm (as in a ViT) gives the torch backend's output and mask grad."""
    from nft_fast import masks

    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(20).to(DEV)
    with torch.no_grad():
        ln.weight.uniform_(-1, 1)
        ln.bias.uniform_(-1, 1)
    model = torch.nn.Sequential(ln)
    masks.attach_masks(model, freeze=False)
    mod = model[0]
    with torch.no_grad():
        getattr(mod, masks.MASK_NAME).uniform_(0, 1)
    x = torch.randn(3, 5, 20, device=DEV)
    res = []
    for be in ("torch", "triton"):
        mod.zero_grad()
        with nft_fast.use_backend(be):
            y = mod(x)
        (y * y).sum().backward()
        res.append((y.detach(), getattr(mod, masks.MASK_NAME).grad.clone(), mod.weight.grad.clone()))
    for a, b in zip(*res):
        assert_close(a, b)


def test_bad_inputs_raise():
    x, w, m, b, _ = make((7, 33), (33,))
    with pytest.raises(ValueError, match="normalized_shape"):
        masked_layer_norm_triton(x, (32,), w[:32], b[:32], m[:32], 1e-5)
    with pytest.raises(ValueError, match="mask shape"):
        masked_layer_norm_triton(x, (33,), w, b, m[:5], 1e-5)
    with pytest.raises(ValueError, match="bias shape"):
        masked_layer_norm_triton(x, (33,), w, b[:5], m, 1e-5)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        masked_layer_norm_triton(x.double(), (33,), w, b, m, 1e-5)
    with pytest.raises(ValueError, match="weight and mask"):
        masked_layer_norm_triton(x, (33,), None, b, m, 1e-5)


def test_opcheck_fwd_and_bwd():
    x, w, m, b, dy = make((7, 33), (33,), seed=1)
    xs = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), m.requires_grad_()]
    torch.library.opcheck(masked_ln_fwd, (*xs, 1e-5))
    torch.library.opcheck(masked_ln_fwd, (x.detach(), w.detach(), None, m.detach().requires_grad_(), 1e-5))
    _, mean, rstd = masked_ln_fwd(x.detach(), w.detach(), b.detach(), m.detach(), 1e-5)
    for flags in [(True, True, True, True), (False, False, True, False)]:
        torch.library.opcheck(masked_ln_bwd, (dy, x.detach(), w.detach(), m.detach(), mean, rstd, *flags))


def test_torch_compile_fullgraph():
    x, w, m, b, dy = make((7, 5, 33), (33,), seed=8)

    def f(x, w, b, m):
        return torch.tanh(masked_layer_norm_triton(x * 2.0, (33,), w, b, m, 1e-5)) + 1.0

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, m)]
        y = fn(*leaves)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    torch._dynamo.reset()
    got = grads(torch.compile(f, fullgraph=True))
    want = grads(f)
    for a, b_ in zip(got, want):
        assert_close(a, b_)


# ---------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64 * 197, 768), (4099, 1000), (3, 40000)])
def test_gpu_large(dtype, shape):
    """ViT-sized rows (fused path), an odd D, and a row wide enough for the looped path."""
    ns = shape[-1:]
    x, w, m, b, dy = make(shape, ns, seed=21, dtype=dtype, device="cuda")
    got = run(masked_layer_norm_triton, x, ns, w, m, b, dy)
    ref = run(masked_layer_norm_torch, x.double(), ns, w.double(), m.double(), b.double(), dy.double())
    assert got[0].dtype == got[1].dtype == dtype
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for name, a, r in zip(NAMES, got, ref):
        # half dy/x on many rows: parameter sums are judged against their magnitude
        assert_close(a.double(), r, rtol=tol, atol_rel=tol, name=name)


@pytest.mark.gpu
def test_gpu_bf16_params():
    """A model cast to bf16 (parameters too): grads come back in the parameters' dtype."""
    x, w, m, b, dy = make((1000, 384), (384,), seed=22, dtype=torch.bfloat16, device="cuda")
    w, m, b = w.bfloat16(), m.bfloat16(), b.bfloat16()
    got = run(masked_layer_norm_triton, x, (384,), w, m, b, dy)
    ref = run(masked_layer_norm_torch, x.double(), (384,), w.double(), m.double(), b.double(), dy.double())
    assert [t.dtype for t in got] == [torch.bfloat16] * 5
    for name, a, r in zip(NAMES, got, ref):
        assert_close(a.double(), r, rtol=3e-2, atol_rel=3e-2, name=name)
