"""Masked BatchNorm (+ residual + ReLU): the triton backend against the torch oracle.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest); shapes stay tiny there.
"""
import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton")

from bn_cases import BN_SHAPES, bn_inputs, bn_run, close, relu_nan_check  # noqa: E402

import nft_fast  # noqa: E402
from nft_fast import ops  # noqa: E402
from nft_fast.ops.masked_bn import masked_batch_norm_torch, masked_batch_norm_triton, masked_bn_bwd, masked_bn_fwd  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = BN_SHAPES


def _inputs(shape, fmt, seed, dtype=torch.float32, device=DEV):
    return bn_inputs(shape, fmt, seed, dtype, device)


_run, _close = bn_run, close


@pytest.mark.parametrize("shape,fmt", SHAPES)
@pytest.mark.parametrize("relu,use_res", [(False, False), (True, False), (True, True)])
def test_train_forward_backward_match_torch(shape, fmt, relu, use_res):
    args = _inputs(shape, fmt, seed=sum(shape))
    grads = ("x", "m", "w", "b") + (("res",) if use_res else ())
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, relu=relu, use_res=use_res, grads=grads)
    y1, rm1, rv1, g1 = _run(masked_batch_norm_triton, *args, relu=relu, use_res=use_res, grads=grads)
    _close(y1, y0)
    assert y1.stride() == args[0].stride(), "output keeps the input's memory format"
    _close(rm1, rm0)
    _close(rv1, rv0)
    M = args[0].numel() // shape[1]
    for k in grads:  # reductions over M rows: allow error growing with sqrt(M)
        _close(g1[k], g0[k], scale=M ** 0.5, rtol=1e-4)


@pytest.mark.parametrize("shape,fmt", [((1, 5), None), ((7, 3), None), ((4, 3, 17, 16), torch.channels_last)])
def test_eval_mode_uses_running_stats(shape, fmt):
    args = _inputs(shape, fmt, seed=3)
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, training=False)
    y1, rm1, rv1, g1 = _run(masked_batch_norm_triton, *args, training=False)
    _close(y1, y0)
    assert torch.equal(rm1, rm0) and torch.equal(rv1, rv0), "eval mode must not touch running stats"
    for k in g0:
        _close(g1[k], g0[k], scale=args[0].numel() ** 0.5, rtol=1e-4)


def test_no_running_stats_and_no_bias():
    x, w, b, m, res, dy = _inputs((6, 4, 3, 3), None, seed=5)
    outs = []
    for fn in (masked_batch_norm_torch, masked_batch_norm_triton):
        mm = m.clone().requires_grad_()
        y = fn(x, None, None, w, None, mm, True, 0.1, 1e-5)
        y.backward(dy)
        outs.append((y, mm.grad))
    _close(outs[1][0], outs[0][0])
    _close(outs[1][1], outs[0][1], scale=10, rtol=1e-4)


def test_numerically_hard_input_welford():
    # Large offset, small spread: a naive E[x^2]-E[x]^2 in fp32 loses the variance.
    g = torch.Generator().manual_seed(0)
    x = (1000.0 + 0.01 * torch.randn(4, 3, 16, 16, generator=g)).to(DEV)
    w, b, m = torch.ones(3, device=DEV), torch.zeros(3, device=DEV), torch.ones(3, device=DEV)
    y = masked_batch_norm_triton(x, None, None, w, b, m, True, 0.1, 1e-5)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.1, 1e-5)
    err = (y.double() - ref).abs().max().item()
    err_torch = (torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5).double() - ref).abs().max().item()
    assert err <= 1.5 * err_torch + 1e-4, (err, err_torch)


def test_bad_input_errors():
    x = torch.randn(4, 3, 2, 2, device=DEV)
    w = torch.ones(3, device=DEV)
    with pytest.raises(ValueError, match="mask"):
        masked_batch_norm_triton(x, None, None, w, None, torch.ones(4, device=DEV), True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="residual"):
        masked_batch_norm_triton(x, None, None, w, None, w, True, 0.1, 1e-5, torch.randn(4, 3, 2, 1, device=DEV))
    with pytest.raises(ValueError, match="more than 1 value"):
        masked_batch_norm_triton(torch.randn(1, 3, device=DEV), None, None, w, None, w, True, 0.1, 1e-5)


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


def test_opcheck():
    x, w, b, m, res, dy = _inputs((4, 6, 3, 3), torch.channels_last, seed=1)
    x.requires_grad_(True)
    m.requires_grad_(True)
    rm, rv = torch.zeros(6, device=DEV), torch.ones(6, device=DEV)
    torch.library.opcheck(masked_bn_fwd, (x, w, b, m, res, None, None, True, 1e-5, True))
    torch.library.opcheck(masked_bn_fwd, (x, w, None, m, None, rm, rv, False, 1e-5, False))
    y, mean, rstd, _ = masked_bn_fwd(x.detach(), w, b, m.detach(), res, None, None, True, 1e-5, True)
    torch.library.opcheck(masked_bn_bwd, (dy, x.detach(), y, w, m.detach(), mean, rstd, True, True, True, True))


def test_torch_compile_fullgraph_matches_eager():
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,fmt", [((128, 64, 56, 56), torch.channels_last), ((128, 256, 14, 14), None),
                                       ((16, 64, 8, 56, 56), torch.channels_last_3d), ((256, 1000), None)])
def test_gpu_large(dtype, shape, fmt):
    args = _inputs(shape, fmt, seed=7, dtype=dtype, device="cuda")
    y0, rm0, rv0, g0 = _run(masked_batch_norm_torch, *args, relu=True, use_res=True, grads=("x", "m", "res"))
    y1, rm1, rv1, g1 = _run(masked_batch_norm_triton, *args, relu=True, use_res=True, grads=("x", "m", "res"))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1.float(), y0.float(), **tol)
    torch.testing.assert_close(rv1, rv0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g1["x"].float(), g0["x"].float(), **tol)
    # Mask gradients are sums over N*S values: compare relative to their magnitude.
    torch.testing.assert_close(g1["m"], g0["m"], rtol=2e-2 if dtype == torch.bfloat16 else 1e-3, atol=1e-2 * g0["m"].abs().max().item())


def test_relu_keeps_nan_and_zeroes_negatives_like_torch():
    relu_nan_check(masked_batch_norm_triton, "cuda" if torch.cuda.is_available() else "cpu")
