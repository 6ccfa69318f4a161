"""Masked BatchNorm (+ residual + ReLU), every backend against the torch oracle: triton (on CPU under
TRITON_INTERPRET=1, set by conftest: shapes stay tiny there), cpp (C++/OpenMP) and cuda (csrc/cuda,
on a GPU or, without one, on the CPU emulator under NFT_FAST_CUDA_EMU=1, conftest)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import nft_fast
from nft_fast import ops
from nft_fast.ops import masked_bn as MB
from nft_fast.ops.masked_bn import masked_batch_norm_torch, masked_batch_norm_triton, masked_bn_bwd, masked_bn_fwd
from tests.helpers.backends import backend_param, device, per_backend, skip_unless
from tests.helpers.bn_cases import BN_SHAPES, bn_inputs, bn_run, close, relu_nan_check

DEV = device("triton")  # the triton tests' tensors: the GPU when there is one


@pytest.fixture(params=[backend_param("cpp"), backend_param("cuda")])
def backend(request):
    """The C++ kernels' backends (a test parametrized over ``backend`` itself picks its own)."""
    return request.param


@pytest.fixture
def impl(backend):
    """The backend under test: its masked_batch_norm, custom ops and the device of its tensors."""
    if backend == "triton":
        return SimpleNamespace(kind=backend, device=DEV, fn=masked_batch_norm_triton, fwd=masked_bn_fwd, bwd=masked_bn_bwd)
    return SimpleNamespace(kind=backend, device=device(backend), fn=getattr(MB, f"masked_batch_norm_{backend}"),
                           fwd=getattr(MB, f"masked_bn_{backend}_fwd"), bwd=getattr(MB, f"masked_bn_{backend}_bwd"))


# (shape, memory format): C not a power of two; N*S of 7, 45, 1088 and > 1000; 1d/2d/3d; both layouts.
SHAPES = BN_SHAPES + [
    ((8, 24, 12, 12), torch.channels_last),  # large enough for the OpenMP parallel branch
    ((8, 24, 12, 12), None),
    ((6, 10, 1, 1), None),  # no spatial extent: read as rows x C
]


def _inputs(shape, fmt, seed, dtype=torch.float32, device="cpu"):
    return bn_inputs(shape, fmt, seed, dtype, device)


_run, _close = bn_run, close

# ------------------------------------------------------------------------------ every backend

# triton on BN_SHAPES with three (relu, use_res) cases; the C++ kernels on more shapes, all four.
_TRAIN_CPP = [(s, f, r, u) for r, u in [(False, False), (True, False), (False, True), (True, True)] for s, f in SHAPES]
TRAIN_CASES = {"triton": [(s, f, r, u) for r, u in [(False, False), (True, False), (True, True)] for s, f in BN_SHAPES],
               "cpp": _TRAIN_CPP, "cuda": _TRAIN_CPP}


@per_backend("shape,fmt,relu,use_res", TRAIN_CASES)
def test_train_forward_backward_match_torch(impl, shape, fmt, relu, use_res):
    args = _inputs(shape, fmt, seed=sum(shape), device=impl.device)
    grads = ("x", "m", "w", "b") + (("res",) if use_res else ())
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, relu=relu, use_res=use_res, grads=grads)
    y1, rm1, rv1, g1 = _run(impl.fn, *args, relu=relu, use_res=use_res, grads=grads)
    _close(y1, y0)
    assert y1.stride() == args[0].stride(), "output keeps the input's memory format"
    _close(rm1, rm0)
    _close(rv1, rv0)
    M = args[0].numel() // shape[1]
    for k in grads:  # reductions over M rows: allow error growing with sqrt(M)
        assert g1[k].shape == g0[k].shape
        _close(g1[k], g0[k], scale=M ** 0.5, rtol=1e-4)


@per_backend("dtype", {"triton": [torch.float32], "cpp": [torch.float32, torch.bfloat16],
                       "cuda": [torch.float32, torch.bfloat16]})
def test_relu_keeps_nan_and_zeroes_negatives_like_torch(impl, dtype):
    relu_nan_check(impl.fn, impl.device, dtype)


# ------------------------------------------------------------------------ cpp and cuda (C++)


@pytest.mark.parametrize("shape,fmt", [((1, 5), None), ((7, 3), None), ((4, 3, 17, 16), torch.channels_last),
                                       ((4, 3, 17, 16), None)])
@pytest.mark.parametrize("relu,use_res", [(False, False), (True, True)])
def test_eval_mode_uses_running_stats(impl, shape, fmt, relu, use_res):
    args = _inputs(shape, fmt, seed=3, device=impl.device)
    grads = ("x", "m", "w", "b") + (("res",) if use_res else ())
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, training=False, relu=relu, use_res=use_res, grads=grads)
    y1, rm1, rv1, g1 = _run(impl.fn, *args, training=False, relu=relu, use_res=use_res, grads=grads)
    _close(y1, y0)
    assert torch.equal(rm1, rm0) and torch.equal(rv1, rv0), "eval mode must not touch running stats"
    for k in g0:
        _close(g1[k], g0[k], scale=args[0].numel() ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_no_running_stats_and_no_bias(impl, fmt):
    args = _inputs((6, 4, 3, 3), fmt, seed=5, device=impl.device)
    y0, _, _, g0 = _run(masked_batch_norm_torch, *args, running=False, bias=False, relu=True, grads=("x", "m", "w"))
    y1, _, _, g1 = _run(impl.fn, *args, running=False, bias=False, relu=True, grads=("x", "m", "w"))
    _close(y1, y0)
    for k in g0:
        _close(g1[k], g0[k], scale=10, rtol=1e-4)


def test_mixed_layouts_of_residual_and_grad(impl):
    # x channels_last, residual and incoming gradient NCHW: the op copies them to x's layout.
    x, w, b, m, res, dy = _inputs((4, 6, 5, 5), torch.channels_last, seed=9, device=impl.device)
    grads = ("x", "m", "res")
    y0, _, _, g0 = _run(masked_batch_norm_torch, x, w, b, m, res, dy, relu=True, use_res=True, grads=grads)
    y1, _, _, g1 = _run(impl.fn, x, w, b, m, res.contiguous(), dy.contiguous(), relu=True,
                        use_res=True, grads=grads)
    _close(y1, y0)
    for k in grads:
        _close(g1[k], g0[k], scale=10, rtol=1e-4)


def test_numerically_hard_input(impl):
    # Large offset, small spread: a naive E[x^2]-E[x]^2 in fp32 loses the variance.
    g = torch.Generator().manual_seed(0)
    for fmt in (None, torch.channels_last):
        x = (1000.0 + 0.01 * torch.randn(4, 3, 16, 16, generator=g)).contiguous(memory_format=fmt or torch.contiguous_format)
        w, b, m = torch.ones(3), torch.zeros(3), torch.ones(3)
        d = impl.device
        y = impl.fn(x.to(d), None, None, w.to(d), b.to(d), m.to(d), True, 0.1, 1e-5).cpu()
        ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.1, 1e-5)
        err = (y.double() - ref).abs().max().item()
        err_torch = (torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5).double() - ref).abs().max().item()
        assert err <= 1.5 * err_torch + 1e-4, (fmt, err, err_torch)


_DET_SCRIPT = """
import sys, torch
from nft_fast.ops.masked_bn import masked_batch_norm_cpp
g = torch.Generator().manual_seed(2)
out = []
for fmt in (torch.channels_last, torch.contiguous_format):
    x = (torch.randn(16, 24, 12, 12, generator=g) * 3 + 1).contiguous(memory_format=fmt).requires_grad_()
    m = torch.rand(24, generator=g).requires_grad_()
    y = masked_batch_norm_cpp(x, None, None, torch.ones(24), torch.zeros(24), m, True, 0.1, 1e-5, None, True)
    y.backward(torch.randn(y.shape, generator=g))
    out += [y.detach(), x.grad, m.grad]
torch.save(out, sys.argv[1])
"""


@skip_unless("cpp")
def test_cpp_deterministic_across_thread_counts(tmp_path):
    # The reductions are combined in an order fixed by the shape: same bits with 1 or 2 threads.
    import os
    import subprocess
    import sys

    res = []
    for t in (1, 2):
        f = tmp_path / f"out{t}.pt"
        subprocess.run([sys.executable, "-c", _DET_SCRIPT, str(f)], check=True, env={**os.environ, "OMP_NUM_THREADS": str(t)})
        res.append(torch.load(f))
    for a, b in zip(*res):
        assert torch.equal(a, b)


BF16_SHAPES = [((7, 3), None), ((5, 5, 3, 3), None), ((3, 130, 2, 2), torch.channels_last),
               ((8, 24, 12, 12), torch.channels_last), ((8, 24, 12, 12), None), ((2, 6, 3, 4, 5), torch.channels_last_3d)]


@pytest.mark.parametrize("shape,fmt", BF16_SHAPES)
@pytest.mark.parametrize("relu,use_res,training", [(False, False, True), (True, True, True), (True, False, False)])
def test_bf16_matches_fp32_oracle_on_the_same_values(impl, shape, fmt, relu, use_res, training):
    # bf16 activations (a bf16 autocast step): the kernels compute in fp32 from the bf16 values and
    # round each stored value once. Oracle: the torch implementation in fp32 on the same (bf16-exact)
    # values, its y/dx rounded to bf16; parameter gradients and statistics stay fp32.
    x, w, b, m, res, dy = _inputs(shape, fmt, seed=sum(shape) + 1, device=impl.device)
    x, res, dy = x.bfloat16(), res.bfloat16(), dy.bfloat16()
    grads = ("x", "m", "w", "b") + (("res",) if use_res else ())
    kw = dict(relu=relu, use_res=use_res, grads=grads, training=training)
    y1, rm1, rv1, g1 = _run(impl.fn, x, w, b, m, res, dy, **kw)
    assert y1.grad_fn.name() != "NativeBatchNormBackward0", "the C++ kernels ran"
    assert y1.dtype == torch.bfloat16 and y1.stride() == x.stride()
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, x.float(), w, b, m, res.float(), dy.float(), **kw)
    ulp = dict(rtol=2 ** -7, atol=2e-2)  # one bf16 rounding of O(1..10) values
    torch.testing.assert_close(y1.float(), y0.bfloat16().float(), **ulp)
    _close(rm1, rm0)
    _close(rv1, rv0, rtol=1e-4)
    M = x.numel() // shape[1]
    for k in grads:
        assert g1[k].dtype == (torch.bfloat16 if k in ("x", "res") else torch.float32)
        if k in ("x", "res"):
            torch.testing.assert_close(g1[k].float(), g0[k].bfloat16().float(), **ulp)
        else:
            _close(g1[k], g0[k], scale=M ** 0.5, rtol=1e-4)


def test_bf16_rounding_is_torchs(impl):
    # Eval mode with mean 0, var 1, eps 0: y = x * w in fp32, then the store's rounding, which must be
    # torch's (nearest even) bit for bit; with w = 1 + 2^-8 a power-of-two x lands on an exact tie.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 9, generator=g).bfloat16()
    x[0, :4] = torch.tensor([float("inf"), -float("inf"), 3.0e38, 1e-39]).bfloat16()
    x[1:, 4] = 2.0 ** torch.arange(-31, 32).float()
    w = torch.full((9,), 1 + 2 ** -9)
    w[4:] = 1 + 2 ** -8
    d = impl.device
    y = impl.fn(x.to(d), torch.zeros(9, device=d), torch.ones(9, device=d), w.to(d), None, torch.ones(9, device=d),
                False, 0.1, 0.0).cpu()
    want = (x.float() * w).bfloat16()
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    nan = impl.fn(torch.full((2, 3), float("nan"), device=d).bfloat16(), torch.zeros(3, device=d),
                  torch.ones(3, device=d), torch.ones(3, device=d), None, torch.ones(3, device=d), False, 0.1, 0.0)
    assert nan.isnan().all()


@pytest.mark.parametrize("case", ["fp16", "mixed_res"])
def test_fallback_gives_torch_result(impl, case):
    x, w, b, m, res, dy = _inputs((4, 6, 5, 5), None, seed=4, device=impl.device)
    if case == "fp16":
        x, res, dy = x.half(), res.half(), dy.half()
    else:
        res = res.double()
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, x, w, b, m, res, dy, relu=True, use_res=True)
    y1, rm1, rv1, g1 = _run(impl.fn, x, w, b, m, res, dy, relu=True, use_res=True)
    assert y1.grad_fn.name() == y0.grad_fn.name(), "the torch implementation ran"
    assert torch.equal(y1, y0) and torch.equal(rv1, rv0)
    assert torch.equal(g1["x"], g0["x"]) and torch.equal(g1["m"], g0["m"])


def test_fallback_for_non_dense_view(impl):
    x, w, b, m, res, dy = _inputs((4, 6, 5, 5), None, seed=4, device=impl.device)
    outs = []
    for fn in (masked_batch_norm_torch, impl.fn):
        xb, mm = x.clone().requires_grad_(), m.clone().requires_grad_()
        y = fn(xb[:, :, ::2], None, None, w, b, mm, True, 0.1, 1e-5, None, True)  # neither layout
        y.backward(dy[:, :, ::2])
        outs.append((y, xb.grad, mm.grad))
    for a, r in zip(outs[1], outs[0]):
        assert torch.equal(a, r)


def _misaligned(t):
    """``t``'s values and strides in storage that starts one element past a 16-byte boundary."""
    base = torch.empty(t.untyped_storage().nbytes() // t.element_size() + 1, dtype=t.dtype, device=t.device)
    out = base[1:].as_strided(t.shape, t.stride())
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_misaligned_tensors_take_the_scalar_path(impl, dtype, fmt):
    """Channels (and planes) a multiple of the vector width, but x, residual and gradient not
    16-byte aligned: vector loads would fault on a GPU (the emulator traps), so the kernels must
    see the pointers and take the scalar path."""
    x, w, b, m, res, dy = _inputs((4, 16, 4, 8), fmt, seed=2, dtype=dtype, device=impl.device)
    outs = []
    for fn, xin, rin, din in ((masked_batch_norm_torch, x, res, dy),
                              (impl.fn, _misaligned(x), _misaligned(res), _misaligned(dy))):
        assert fn is masked_batch_norm_torch or xin.data_ptr() % 16 != 0
        xl, ml, rl = xin.detach().requires_grad_(), m.clone().requires_grad_(), rin.detach().requires_grad_()
        y = fn(xl, None, None, w, b, ml, True, 0.1, 1e-5, rl, True)
        y.backward(din)
        outs.append((y.float(), xl.grad.float(), ml.grad, rl.grad.float()))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    for a, r in zip(outs[1], outs[0]):
        torch.testing.assert_close(a, r, **tol)


def test_bad_input_errors(impl):
    d = impl.device
    x = torch.randn(4, 3, 2, 2, device=d)
    w = torch.ones(3, device=d)
    with pytest.raises(ValueError, match="mask"):
        impl.fn(x, None, None, w, None, torch.ones(4, device=d), True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        impl.fn(x, None, None, w, None, w, True, 0.1, 1e-5, torch.randn(4, 3, 2, 1, device=d))
    with pytest.raises(ValueError, match="more than 1 value"):
        impl.fn(torch.randn(1, 3, device=d), None, None, w, None, w, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="running statistics"):
        impl.fn(x, None, None, w, None, w, False, 0.1, 1e-5)


def test_masked_model_matches_torch_under_the_backend(impl):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 25, 3))
    nft_fast.attach_masks(net)
    net.to(impl.device)
    x = torch.randn(4, 3, 5, 5, device=impl.device)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    res = {}
    for backend in ("torch", impl.kind):
        net.load_state_dict(state)
        net[1].neuron_mask.grad = None
        with nft_fast.use_backend(backend):
            assert ops.resolved_backend("masked_bn", x.device) == backend
            out = net(x)
            out.square().sum().backward()
        res[backend] = (out.detach(), net[1].neuron_mask.grad.clone(), net[1].running_var.clone())
    _close(res[impl.kind][0], res["torch"][0])
    _close(res[impl.kind][1], res["torch"][1], scale=10, rtol=1e-4)
    _close(res[impl.kind][2], res["torch"][2])


def test_opcheck(impl):
    x, w, b, m, res, dy = _inputs((4, 6, 3, 3), torch.channels_last, seed=1, device=impl.device)
    x.requires_grad_(True)
    m.requires_grad_(True)
    rm, rv = torch.zeros(6, device=impl.device), torch.ones(6, device=impl.device)
    torch.library.opcheck(impl.fwd, (x, w, b, m, res, None, None, True, 1e-5, True))
    torch.library.opcheck(impl.fwd, (x.detach().contiguous().requires_grad_(), w, None, m, None, rm, rv,
                                     False, 1e-5, False))
    y, mean, rstd, _ = impl.fwd(x.detach(), w, b, m.detach(), res, None, None, True, 1e-5, True)
    torch.library.opcheck(impl.bwd, (dy, x.detach(), y, w, m.detach(), mean, rstd, True, True, True, True))


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_custom_op_autograd_matches_torch(impl, fmt):
    # The custom ops (what torch.compile traces) and their registered autograd, outside the eager Function.
    x, w, b, m, res, dy = _inputs((5, 6, 4, 3), fmt, seed=11, device=impl.device)

    def via_op(x, rm, rv, w, b, m, training, momentum, eps, res, relu):
        return impl.fwd(x, w, b, m, res, rm, rv, training, eps, relu)[0]

    grads = ("x", "m", "w", "b", "res")
    y0, _, _, g0 = _run(masked_batch_norm_torch, x, w, b, m, res, dy, relu=True, use_res=True, grads=grads)
    y1, _, _, g1 = _run(via_op, x, w, b, m, res, dy, relu=True, use_res=True, grads=grads)
    _close(y1, y0)
    for k in grads:
        _close(g1[k], g0[k], scale=10, rtol=1e-4)


def test_torch_compile_fullgraph_matches_eager(impl):
    # Compiles the backend's function itself (the custom ops are what dynamo traces).
    x, w, b, m, res, dy = _inputs((4, 6, 5, 5), torch.channels_last, seed=12, device=impl.device)

    def f(x, rm, rv, m, res):
        y = impl.fn(x, rm, rv, w, b, m, True, 0.1, 1e-5, res, True)
        return (y * dy).sum()

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xx, mm = x.clone().requires_grad_(), m.clone().requires_grad_()
        rm, rv = torch.zeros(6, device=impl.device), torch.ones(6, device=impl.device)
        loss = fn(xx, rm, rv, mm, res)
        loss.backward()
        outs.append((loss.detach(), xx.grad, mm.grad, rm, rv))
    for a, r in zip(outs[1], outs[0]):
        _close(a, r, scale=10, rtol=1e-4)


# ------------------------------------------------------------------------------ triton only

triton_only = skip_unless("triton")


@triton_only
@pytest.mark.parametrize("shape,fmt", [((1, 5), None), ((7, 3), None), ((4, 3, 17, 16), torch.channels_last)])
def test_triton_eval_mode_uses_running_stats(shape, fmt):
    args = _inputs(shape, fmt, seed=3, device=DEV)
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, training=False)
    y1, rm1, rv1, g1 = _run(masked_batch_norm_triton, *args, training=False)
    _close(y1, y0)
    assert torch.equal(rm1, rm0) and torch.equal(rv1, rv0), "eval mode must not touch running stats"
    for k in g0:
        _close(g1[k], g0[k], scale=args[0].numel() ** 0.5, rtol=1e-4)


@triton_only
def test_triton_no_running_stats_and_no_bias():
    x, w, b, m, res, dy = _inputs((6, 4, 3, 3), None, seed=5, device=DEV)
    outs = []
    for fn in (masked_batch_norm_torch, masked_batch_norm_triton):
        mm = m.clone().requires_grad_()
        y = fn(x, None, None, w, None, mm, True, 0.1, 1e-5)
        y.backward(dy)
        outs.append((y, mm.grad))
    _close(outs[1][0], outs[0][0])
    _close(outs[1][1], outs[0][1], scale=10, rtol=1e-4)


@triton_only
def test_triton_numerically_hard_input_welford():
    # Large offset, small spread: a naive E[x^2]-E[x]^2 in fp32 loses the variance.
    g = torch.Generator().manual_seed(0)
    x = (1000.0 + 0.01 * torch.randn(4, 3, 16, 16, generator=g)).to(DEV)
    w, b, m = torch.ones(3, device=DEV), torch.zeros(3, device=DEV), torch.ones(3, device=DEV)
    y = masked_batch_norm_triton(x, None, None, w, b, m, True, 0.1, 1e-5)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.1, 1e-5)
    err = (y.double() - ref).abs().max().item()
    err_torch = (torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5).double() - ref).abs().max().item()
    assert err <= 1.5 * err_torch + 1e-4, (err, err_torch)


@triton_only
def test_triton_bad_input_errors():
    x = torch.randn(4, 3, 2, 2, device=DEV)
    w = torch.ones(3, device=DEV)
    with pytest.raises(ValueError, match="mask"):
        masked_batch_norm_triton(x, None, None, w, None, torch.ones(4, device=DEV), True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        masked_batch_norm_triton(x, None, None, w, None, w, True, 0.1, 1e-5, torch.randn(4, 3, 2, 1, device=DEV))
    with pytest.raises(ValueError, match="more than 1 value"):
        masked_batch_norm_triton(torch.randn(1, 3, device=DEV), None, None, w, None, w, True, 0.1, 1e-5)


@triton_only
def test_masked_model_dispatches_to_triton():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 25, 3)).to(DEV)
    nft_fast.attach_masks(net)
    x = torch.randn(4, 3, 5, 5, device=DEV)
    res = {}
    for backend in ("torch", "triton"):
        net[1].neuron_mask.grad = None
        with nft_fast.use_backend(backend):
            assert ops.resolved_backend("masked_bn", x.device) == backend
            net(x).square().sum().backward()
        res[backend] = net[1].neuron_mask.grad.clone()
    _close(res["triton"], res["torch"], scale=10, rtol=1e-4)


@triton_only
def test_triton_opcheck():
    x, w, b, m, res, dy = _inputs((4, 6, 3, 3), torch.channels_last, seed=1, device=DEV)
    x.requires_grad_(True)
    m.requires_grad_(True)
    rm, rv = torch.zeros(6, device=DEV), torch.ones(6, device=DEV)
    torch.library.opcheck(masked_bn_fwd, (x, w, b, m, res, None, None, True, 1e-5, True))
    torch.library.opcheck(masked_bn_fwd, (x, w, None, m, None, rm, rv, False, 1e-5, False))
    y, mean, rstd, _ = masked_bn_fwd(x.detach(), w, b, m.detach(), res, None, None, True, 1e-5, True)
    torch.library.opcheck(masked_bn_bwd, (dy, x.detach(), y, w, m.detach(), mean, rstd, True, True, True, True))


@triton_only
def test_triton_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 4)).to(DEV)
    nft_fast.attach_masks(net)
    x = torch.randn(4, 3, 5, 5, device=DEV)
    bn = net[1]
    nft_fast.set_backend("triton")
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    eager = net(x)
    eager.square().sum().backward()
    g_eager = bn.neuron_mask.grad.clone()
    rm_eager = bn.running_mean.clone()
    bn.load_state_dict(state)
    bn.neuron_mask.grad = None
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    _close(out, eager)
    _close(bn.neuron_mask.grad, g_eager, scale=10, rtol=1e-4)
    _close(bn.running_mean, rm_eager)


@triton_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,fmt", [((128, 64, 56, 56), torch.channels_last), ((128, 256, 14, 14), None),
                                       ((16, 64, 8, 56, 56), torch.channels_last_3d), ((256, 1000), None)])
def test_triton_gpu_large(dtype, shape, fmt):
    args = _inputs(shape, fmt, seed=7, dtype=dtype, device="cuda")
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, relu=True, use_res=True, grads=("x", "m", "res"))
    y1, rm1, rv1, g1 = _run(masked_batch_norm_triton, *args, relu=True, use_res=True, grads=("x", "m", "res"))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1.float(), y0.float(), **tol)
    torch.testing.assert_close(rv1, rv0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g1["x"].float(), g0["x"].float(), **tol)
    # Mask gradients are sums over N*S values: compare relative to their magnitude.
    torch.testing.assert_close(g1["m"], g0["m"], rtol=2e-2 if dtype == torch.bfloat16 else 1e-3,
                               atol=1e-2 * g0["m"].abs().max().item())

