"""Inputs, runs and comparisons of the MixUp ops, shared by the tests of every backend
(tests/ops/test_mixup.py, tests/cuda_emu/test_schedules.py)."""
import torch
import torch.nn.functional as F

from nft_fast.ops import mixup as M

BF16 = torch.bfloat16

# Mixed-batch shapes of the C++ and CUDA kernels' tests: ranks 1-5, B = 1, 2, 7, 33, C not a power
# of two, MNIST-like 1x28x28, 5-D clips; C = 2, 3, 4 take the interleaving kernels, C = 6, 70 the
# tiled transpose; the last ones are large enough for the OpenMP branch.
BATCH_SHAPES = [(7,), (2, 5), (33, 10), (1, 5, 9), (7, 3, 5, 6), (5, 4, 3, 7), (33, 1, 28, 28), (2, 3, 32, 32),
                (7, 3, 2, 5, 3), (2, 6, 4, 7, 5), (3, 70, 9, 7), (64, 3, 32, 32), (2, 2, 8, 16, 16)]


# (input dtype, output dtype or None = the input's): every pair the kernels take
BATCH_DTYPES = [(torch.float32, None), (torch.float32, BF16), (BF16, None), (BF16, torch.float32)]


def ce_inputs(B, K, seed, dtype=torch.float32):
    """``(logits, y, perm)``: logits (B, K) spread like a trained net's, labels, a permutation."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, K, generator=g) * 3).to(dtype)
    y = torch.randint(0, K, (B,), generator=g)
    perm = torch.randperm(B, generator=g)
    return z, y, perm


def loss_and_grad(fn, z, y, perm, lam, scale=1.0):
    """``fn``'s loss and the gradient of ``scale * loss`` w.r.t. the logits (through .backward())."""
    z = z.detach().clone().requires_grad_()
    loss = fn(z, y, perm, lam)
    (loss * scale).backward()
    return loss.detach(), z.grad


def same(got, want):
    """Bit-equal values (NaN where the oracle has NaN), same dtype, shape and strides."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.stride() == want.stride(), (got.stride(), want.stride())
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def ce_close(got, want, B, dtype=torch.float32):
    """The C++ / CUDA CE ``(loss, grad)`` against the oracle's: within a few fp32 ulps."""
    (gl, gg), (wl, wg) = got, want
    assert gl.dtype == wl.dtype == torch.float32 and gl.shape == ()
    assert gg.dtype == wg.dtype == dtype and gg.shape == wg.shape
    torch.testing.assert_close(gl, wl, rtol=1e-6, atol=1e-7)
    if dtype == torch.float32:  # softmax / B: a few fp32 ulps of the larger entries
        torch.testing.assert_close(gg, wg, rtol=1e-5, atol=5e-7 / B)
    else:  # the same fp32 gradient rounded to bf16: at most one bf16 ulp apart
        torch.testing.assert_close(gg, wg, rtol=2.0 ** -7, atol=1e-7 / B)


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
