"""Inputs and one forward/backward run of a masked BatchNorm implementation, shared by the
tests of every backend (tests/ops/test_masked_bn.py, tests/cuda_emu/test_schedules.py)."""
import torch

# (shape, memory format): C not a power of two; N*S of 7, 45, 1088 (> 1000), 1d/2d/3d.
BN_SHAPES = [
    ((7, 3), None),
    ((1030, 5), None),
    ((5, 5, 3, 3), None),
    ((5, 5, 3, 3), torch.channels_last),
    ((3, 130, 2, 2), torch.channels_last),
    ((4, 3, 17, 16), None),
    ((4, 3, 17, 16), torch.channels_last),
    ((2, 6, 3, 4, 5), None),
    ((2, 6, 3, 4, 5), torch.channels_last_3d),
    ((3, 7, 11), None),
]


def bn_inputs(shape, fmt, seed, dtype=torch.float32, device="cpu"):
    """``(x, weight, bias, mask, residual, dy)``; x offset from 0 so the statistics matter."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g) * 3 + 1.5).to(device, dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    w = (torch.rand(C, generator=g) + 0.5).to(device)
    b = torch.randn(C, generator=g).to(device)
    m = torch.rand(C, generator=g).to(device)
    res = torch.randn(shape, generator=g).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, b, m, res, dy


def bn_run(fn, x, w, b, m, res, dy, *, training=True, relu=False, use_res=False, running=True, bias=True,
           grads=("x", "m")):
    """``fn``'s output, running mean/var and the gradients named in ``grads``."""
    C = x.shape[1]
    rm = torch.linspace(-1, 1, C, device=x.device) if running else None
    rv = torch.linspace(0.5, 2, C, device=x.device) if running else None
    t = {"x": x.detach().clone(memory_format=torch.preserve_format), "w": w.clone(), "b": b.clone() if bias else None,
         "m": m.clone(), "res": res.detach().clone() if use_res else None}
    for k in grads:
        t[k].requires_grad_(True)
    y = fn(t["x"], rm, rv, t["w"], t["b"], t["m"], training, 0.1, 1e-5, t["res"], relu)
    y.backward(dy)
    return y, rm, rv, {k: t[k].grad for k in grads}


def close(a, b, scale=1.0, rtol=1e-5, atol=2e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)


def relu_nan_check(fn, device="cpu", dtype=torch.float32):
    """``fn`` in eval mode with an identity affine is ``relu(x)`` exactly, as torch's: NaN (either
    sign) stays NaN, negatives and -0 become 0, +-inf pass / vanish."""
    x = torch.tensor([[-1.5, 0.0, -0.0, 2.0, float("nan"), -float("nan"), -float("inf"), float("inf")]] * 2)
    x = x.to(device, dtype)
    C = x.shape[1]
    one, zero = torch.ones(C, device=device), torch.zeros(C, device=device)
    y = fn(x, zero, one, one, zero, one, False, 0.1, 0.0, None, True)
    want = torch.relu(x)
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(y.float()), torch.nan_to_num(want.float()))
