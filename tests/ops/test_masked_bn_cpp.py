"""Masked BatchNorm (+ residual + ReLU): the cpp backend (C++/OpenMP, fp32 CPU) against the torch oracle."""
import pytest
import torch
import torch.nn as nn

from bn_cases import BN_SHAPES, bn_inputs, bn_run, close  # noqa: E402

import nft_fast
from nft_fast import _build, ops
from nft_fast.ops.masked_bn import (masked_batch_norm_cpp, masked_batch_norm_torch, masked_bn_cpp_bwd,
                                    masked_bn_cpp_fwd)

pytestmark = pytest.mark.skipif(not _build.cpp_compiled(), reason="C++ extension not built")

# (shape, memory format): C not a power of two; N*S of 7, 45, 1088 and > 1000; 1d/2d/3d; both layouts.
SHAPES = BN_SHAPES + [
    ((8, 24, 12, 12), torch.channels_last),  # large enough for the OpenMP parallel branch
    ((8, 24, 12, 12), None),
    ((6, 10, 1, 1), None),  # no spatial extent: read as rows x C
]


def _inputs(shape, fmt, seed, dtype=torch.float32):
    return bn_inputs(shape, fmt, seed, dtype)


_run, _close = bn_run, close


@pytest.mark.parametrize("shape,fmt", SHAPES)
@pytest.mark.parametrize("relu,use_res", [(False, False), (True, False), (False, True), (True, True)])
def test_train_forward_backward_match_torch(shape, fmt, relu, use_res):
    args = _inputs(shape, fmt, seed=sum(shape))
    grads = ("x", "m", "w", "b") + (("res",) if use_res else ())
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, relu=relu, use_res=use_res, grads=grads)
    y1, rm1, rv1, g1 = _run(masked_batch_norm_cpp, *args, relu=relu, use_res=use_res, grads=grads)
    _close(y1, y0)
    assert y1.stride() == args[0].stride(), "output keeps the input's memory format"
    _close(rm1, rm0)
    _close(rv1, rv0)
    M = args[0].numel() // shape[1]
    for k in grads:  # reductions over M rows: allow error growing with sqrt(M)
        assert g1[k].shape == g0[k].shape
        _close(g1[k], g0[k], scale=M ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("shape,fmt", [((1, 5), None), ((7, 3), None), ((4, 3, 17, 16), torch.channels_last),
                                       ((4, 3, 17, 16), None)])
@pytest.mark.parametrize("relu,use_res", [(False, False), (True, True)])
def test_eval_mode_uses_running_stats(shape, fmt, relu, use_res):
    args = _inputs(shape, fmt, seed=3)
    grads = ("x", "m", "w", "b") + (("res",) if use_res else ())
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, training=False, relu=relu, use_res=use_res, grads=grads)
    y1, rm1, rv1, g1 = _run(masked_batch_norm_cpp, *args, training=False, relu=relu, use_res=use_res, grads=grads)
    _close(y1, y0)
    assert torch.equal(rm1, rm0) and torch.equal(rv1, rv0), "eval mode must not touch running stats"
    for k in g0:
        _close(g1[k], g0[k], scale=args[0].numel() ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_no_running_stats_and_no_bias(fmt):
    args = _inputs((6, 4, 3, 3), fmt, seed=5)
    y0, _, _, g0 = _run(masked_batch_norm_torch, *args, running=False, bias=False, relu=True, grads=("x", "m", "w"))
    y1, _, _, g1 = _run(masked_batch_norm_cpp, *args, running=False, bias=False, relu=True, grads=("x", "m", "w"))
    _close(y1, y0)
    for k in g0:
        _close(g1[k], g0[k], scale=10, rtol=1e-4)


def test_mixed_layouts_of_residual_and_grad():
    # x channels_last, residual and incoming gradient NCHW: the op copies them to x's layout.
    x, w, b, m, res, dy = _inputs((4, 6, 5, 5), torch.channels_last, seed=9)
    grads = ("x", "m", "res")
    y0, _, _, g0 = _run(masked_batch_norm_torch, x, w, b, m, res, dy, relu=True, use_res=True, grads=grads)
    y1, _, _, g1 = _run(masked_batch_norm_cpp, x, w, b, m, res.contiguous(), dy.contiguous(), relu=True,
                        use_res=True, grads=grads)
    _close(y1, y0)
    for k in grads:
        _close(g1[k], g0[k], scale=10, rtol=1e-4)


def test_numerically_hard_input():
    # Large offset, small spread: a naive E[x^2]-E[x]^2 in fp32 loses the variance.
    g = torch.Generator().manual_seed(0)
    for fmt in (None, torch.channels_last):
        x = (1000.0 + 0.01 * torch.randn(4, 3, 16, 16, generator=g)).contiguous(memory_format=fmt or torch.contiguous_format)
        w, b, m = torch.ones(3), torch.zeros(3), torch.ones(3)
        y = masked_batch_norm_cpp(x, None, None, w, b, m, True, 0.1, 1e-5)
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


def test_deterministic_across_thread_counts(tmp_path):
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


@pytest.mark.parametrize("case", ["bf16", "mixed_res"])
def test_fallback_gives_torch_result(case):
    x, w, b, m, res, dy = _inputs((4, 6, 5, 5), None, seed=4)
    if case == "bf16":
        x, res, dy = x.bfloat16(), res.bfloat16(), dy.bfloat16()
    else:
        res = res.double()
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, x, w, b, m, res, dy, relu=True, use_res=True)
    y1, rm1, rv1, g1 = _run(masked_batch_norm_cpp, x, w, b, m, res, dy, relu=True, use_res=True)
    assert y1.grad_fn.name() == y0.grad_fn.name(), "the torch implementation ran"
    assert torch.equal(y1, y0) and torch.equal(rv1, rv0)
    assert torch.equal(g1["x"], g0["x"]) and torch.equal(g1["m"], g0["m"])


def test_fallback_for_non_dense_view():
    x, w, b, m, res, dy = _inputs((4, 6, 5, 5), None, seed=4)
    outs = []
    for fn in (masked_batch_norm_torch, masked_batch_norm_cpp):
        xb, mm = x.clone().requires_grad_(), m.clone().requires_grad_()
        y = fn(xb[:, :, ::2], None, None, w, b, mm, True, 0.1, 1e-5, None, True)  # neither layout
        y.backward(dy[:, :, ::2])
        outs.append((y, xb.grad, mm.grad))
    for a, r in zip(outs[1], outs[0]):
        assert torch.equal(a, r)


def test_bad_input_errors():
    x = torch.randn(4, 3, 2, 2)
    w = torch.ones(3)
    with pytest.raises(ValueError, match="mask"):
        masked_batch_norm_cpp(x, None, None, w, None, torch.ones(4), True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        masked_batch_norm_cpp(x, None, None, w, None, w, True, 0.1, 1e-5, torch.randn(4, 3, 2, 1))
    with pytest.raises(ValueError, match="more than 1 value"):
        masked_batch_norm_cpp(torch.randn(1, 3), None, None, w, None, w, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="running statistics"):
        masked_batch_norm_cpp(x, None, None, w, None, w, False, 0.1, 1e-5)


def test_masked_model_matches_torch_under_cpp_backend():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 25, 3))
    nft_fast.attach_masks(net)
    x = torch.randn(4, 3, 5, 5)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    res = {}
    for backend in ("torch", "cpp"):
        net.load_state_dict(state)
        net[1].neuron_mask.grad = None
        with nft_fast.use_backend(backend):
            assert ops.resolved_backend("masked_bn", x.device) == backend
            out = net(x)
            out.square().sum().backward()
        res[backend] = (out.detach(), net[1].neuron_mask.grad.clone(), net[1].running_var.clone())
    _close(res["cpp"][0], res["torch"][0])
    _close(res["cpp"][1], res["torch"][1], scale=10, rtol=1e-4)
    _close(res["cpp"][2], res["torch"][2])


def test_opcheck():
    x, w, b, m, res, dy = _inputs((4, 6, 3, 3), torch.channels_last, seed=1)
    x.requires_grad_(True)
    m.requires_grad_(True)
    rm, rv = torch.zeros(6), torch.ones(6)
    torch.library.opcheck(masked_bn_cpp_fwd, (x, w, b, m, res, None, None, True, 1e-5, True))
    torch.library.opcheck(masked_bn_cpp_fwd, (x.detach().contiguous().requires_grad_(), w, None, m, None, rm, rv,
                                              False, 1e-5, False))
    y, mean, rstd, _ = masked_bn_cpp_fwd(x.detach(), w, b, m.detach(), res, None, None, True, 1e-5, True)
    torch.library.opcheck(masked_bn_cpp_bwd, (dy, x.detach(), y, w, m.detach(), mean, rstd, True, True, True, True))


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_custom_op_autograd_matches_torch(fmt):
    # The custom ops (what torch.compile traces) and their registered autograd, outside the eager Function.
    x, w, b, m, res, dy = _inputs((5, 6, 4, 3), fmt, seed=11)

    def via_op(x, rm, rv, w, b, m, training, momentum, eps, res, relu):
        return masked_bn_cpp_fwd(x, w, b, m, res, rm, rv, training, eps, relu)[0]

    grads = ("x", "m", "w", "b", "res")
    y0, _, _, g0 = _run(masked_batch_norm_torch, x, w, b, m, res, dy, relu=True, use_res=True, grads=grads)
    y1, _, _, g1 = _run(via_op, x, w, b, m, res, dy, relu=True, use_res=True, grads=grads)
    _close(y1, y0)
    for k in grads:
        _close(g1[k], g0[k], scale=10, rtol=1e-4)


def test_torch_compile_fullgraph_matches_eager():
    # Compiles the cpp function itself: the dispatch's cpp availability check (an lru_cache'd
    # import in nft_fast._build) is not traceable by dynamo yet.
    x, w, b, m, res, dy = _inputs((4, 6, 5, 5), torch.channels_last, seed=12)

    def f(x, rm, rv, m, res):
        y = masked_batch_norm_cpp(x, rm, rv, w, b, m, True, 0.1, 1e-5, res, True)
        return (y * dy).sum()

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        xx, mm = x.clone().requires_grad_(), m.clone().requires_grad_()
        rm, rv = torch.zeros(6), torch.ones(6)
        loss = fn(xx, rm, rv, mm, res)
        loss.backward()
        outs.append((loss.detach(), xx.grad, mm.grad, rm, rv))
    for a, r in zip(outs[1], outs[0]):
        _close(a, r, scale=10, rtol=1e-4)
