"""Ten Purifier steps with the triton and cuda backends match the torch backend (masks, rtol 1e-4).

On CPU the Triton kernels run under TRITON_INTERPRET=1 and the CUDA kernels on the emulator
(NFT_FAST_CUDA_EMU=1, conftest); models stay tiny.
"""
import pytest
import torch

pytest.importorskip("triton")

import nft_fast  # noqa: E402
from nft_fast import ops  # noqa: E402
from tests.helpers.nets import TinyViT, TVResNet, Video3D, user_sequential  # noqa: E402
from nft_fast.models import build  # noqa: E402

CASES = {
    # nft_fast's own blocks run relu(bn(z) + shortcut) as one fused op (norm_act). Inputs are
    # large enough that the last stage's batch statistics are not taken over a handful of
    # values (tiny batches there make ten steps chaotic: fp32 noise grows to O(1)).
    "nft_resnet18": (lambda: build("resnet18", 5, 3, width=4), (8, 3, 16, 16), 5, {"exclude": ("bn1",)}),
    "resnet": (lambda: TVResNet(num_classes=5, width=4), (6, 3, 16, 16), 5, {}),
    "resnet_neurons": (lambda: TVResNet(num_classes=5, width=4), (6, 3, 16, 16), 5, {"neurons": True, "mask_head": True}),
    "video3d": (lambda: Video3D(num_classes=4, width=3), (4, 3, 4, 8, 8), 4, {}),
    "vit": (lambda: TinyViT(num_classes=5, dim=12, depth=1, heads=2, patch=4, image=8), (5, 3, 8, 8), 5, {"neurons": True}),
    "sequential_bn1d": (lambda: user_sequential(num_classes=4), (6, 1, 12, 12), 4, {"neurons": True}),
}


def _purifier(case):
    build, shape, k, kw = CASES[case]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    y = torch.randint(0, k, (shape[0],), generator=g)
    nft_fast.attach_masks(model, example_input=x if kw.get("neurons") else None, **kw)
    # lr 0.1 moves the masks well away from 1 in ten steps
    return nft_fast.Purifier(model, nft_fast.NFTConfig(lr=0.1, seed=3), samples_per_class=2.0), x, y


def _state(p):
    return {"masks": p.flat_masks(), "momentum": p._buf.clone(),
            **{n: b.clone().float() for n, b in p.model.named_buffers()}}


_FAST = [pytest.param("triton"),
         # the CUDA kernels (on the CPU emulator when there is no GPU: NFT_FAST_CUDA_EMU=1, conftest)
         pytest.param("cuda", marks=pytest.mark.skipif(not ops.backend_available("cuda"), reason="no CUDA / emulator"))]


@pytest.mark.parametrize("backend", _FAST)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ten_steps_match_torch(case, backend, one_thread):
    """Every step from the same state (masks, momentum, BN buffers) gives the same loss, BN
    statistics (rtol 1e-4), mask update and momentum (rtol 5e-2, atol 1e-3 of the largest)
    as the torch backend. Each step starts from the torch run's state: free-running, rounding
    differences compound. Even from one state, two fp32 paths can disagree on a ReLU whose input
    is within rounding of 0, which changes the mask gradients of every layer before it by a few
    percent for that step (seen: the first layer's masks, 3.3% of the update, 10% of one
    gradient, 1% of its momentum). A kernel or
    wiring bug is off by O(1); the ops' own tests hold the kernels to rounding."""
    (pt, x, y), (pf, _, _) = _purifier(case), _purifier(case)
    start = pt.flat_masks()
    for i in range(10):
        m0 = pt.flat_masks()
        with torch.no_grad():
            pf._mask.copy_(pt._mask)
            pf._buf.copy_(pt._buf)
            for bf, bt in zip(pf.model.buffers(), pt.model.buffers()):
                bf.copy_(bt)
        with nft_fast.use_backend("torch"):
            lt = pt.step(x, y)["loss"]
        with nft_fast.use_backend(backend):
            lf = pf.step(x, y)["loss"]
        assert lf == pytest.approx(lt, rel=1e-4, abs=1e-5), f"step {i + 1} loss"
        st, sf = _state(pt), _state(pf)
        for n in st:
            if n == "masks":
                want, got, rtol = st[n] - m0, sf[n] - m0, 5e-2  # the update
            elif n == "momentum":  # at step 1 (zero momentum) this is the gradient itself
                want, got, rtol = st[n], sf[n], 5e-2
            else:
                want, got, rtol = st[n], sf[n], 1e-4
            atol = 1e-3 * want.abs().max().item() if rtol > 1e-4 else 1e-5
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, i=i, n=n: f"step {i + 1}, {n}: {m}")
    assert (pt.flat_masks() - start).abs().max() > 1e-3, "the masks must move for the comparison to mean anything"


def test_triton_backend_is_used():
    seen = set()
    build, shape, k, kw = CASES["vit"]
    model = build()
    nft_fast.attach_masks(model, example_input=torch.randn(shape), **kw)
    with nft_fast.use_backend("triton"):
        for op in ("masked_bn", "masked_ln", "masked_linear", "mask_update"):
            if "triton" in ops.implementations().get(op, ()):
                seen.add(ops.resolved_backend(op, torch.device("cpu")))
    assert seen == {"triton"}


@pytest.mark.parametrize("arch,shape,counts", [
    # stem + 3 per block fuse the ReLU; 16 blocks fuse relu(bn3 + shortcut)
    ("resnet50", (6, 3, 16, 16), {"fwd": 53, "bwd": 53, "relu": 49, "res": 16}),
    # R3D: the stem and the 8 conv1 norms fuse their ReLU, 8 blocks relu(bn + shortcut)
    ("r3d18", (4, 3, 4, 16, 16), {"fwd": 20, "bwd": 20, "relu": 17, "res": 8}),
])
def test_every_fused_bn_call_exact(arch, shape, counts, monkeypatch, one_thread):
    """Inside a real ResNet-50 / R3D-18 step (bn + relu and relu(bn + shortcut) fused), every triton BN
    forward and backward equals a float64 recomputation from the very tensors it was given.

    (Whole-model gradients are no good test here: at test sizes a pre-activation within 1e-5
    of zero flips its ReLU between any two fp32 paths, and then torch NCHW, torch
    channels_last and triton each land 1e-5..3e-2 from float64 depending on the seed.)"""
    from nft_fast.kernels import masked_bn as K

    fwd, bwd, calls = K.forward, K.backward, {"fwd": 0, "bwd": 0, "relu": 0, "res": 0}

    def ref_stats(x, eps):
        xd = x.double()
        dims = [0] + list(range(2, x.dim()))
        mu = xd.mean(dims, keepdim=True)
        var = xd.var(dims, unbiased=False, keepdim=True)
        return xd, dims, mu, var, (xd - mu) / torch.sqrt(var + eps)

    def spy_fwd(x, w, b, m, res, rm, rv, training, eps, relu):
        out = fwd(x, w, b, m, res, rm, rv, training, eps, relu)
        xd, dims, mu, var, xh = ref_stats(x, eps)
        shp = [1, -1] + [1] * (x.dim() - 2)
        y = xh * (w.double() * m.double()).view(shp) + b.double().view(shp)
        y = y + res.double() if res is not None else y
        y = y.clamp_min(0) if relu else y
        torch.testing.assert_close(out[0].double(), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())
        calls["fwd"] += 1
        calls["relu"] += relu
        calls["res"] += res is not None
        return out

    def spy_bwd(dy, x, y, w, m, mean, rstd, training, relu, need_dx, need_dres):
        out = bwd(dy, x, y, w, m, mean, rstd, training, relu, need_dx, need_dres)
        xd, dims, mu, var, xh = ref_stats(x, 1e-5)
        dz = torch.where(y > 0, dy.double(), 0.0) if relu else dy.double()
        shp = [1, -1] + [1] * (x.dim() - 2)
        sdzx = (dz * xh).sum(dims)
        dm = w.double() * sdzx
        torch.testing.assert_close(out[4].double(), dm, rtol=1e-5, atol=1e-5 * (dz.abs() * xh.abs()).sum(dims).max().item())
        if need_dx:
            g = (w.double() * m.double()).view(shp) / torch.sqrt(var + 1e-5)
            dx = g * (dz - dz.mean(dims, keepdim=True) - xh * (dz * xh).mean(dims, keepdim=True))
            torch.testing.assert_close(out[0].double(), dx, rtol=1e-5, atol=1e-5 * dx.abs().max().item())
        if need_dres:
            torch.testing.assert_close(out[1].double(), dz, rtol=0, atol=0)
        calls["bwd"] += 1
        return out

    monkeypatch.setattr(K, "forward", spy_fwd)
    monkeypatch.setattr(K, "backward", spy_bwd)
    torch.manual_seed(1)
    model = build(arch, 5, 3, width=4, image_size=shape[-1])
    nft_fast.attach_masks(model)
    # num_classes given: no eval-mode forward to read it off the logits, only the training step
    p = nft_fast.Purifier(model, nft_fast.NFTConfig(lr=0.1, seed=3), samples_per_class=2.0, num_classes=5)
    x, y = torch.randn(shape), torch.randint(0, 5, (shape[0],))
    with nft_fast.use_backend("triton"):
        p.step(x, y)
    assert calls == counts  # every masked BN ran through the kernels, forward and backward


def test_cuda_graph_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="cuda_graph"):
        nft_fast.NFTConfig(cuda_graph=True, trigger_weight=1.0)
    build, shape, k, kw = CASES["resnet"]
    model = build()
    nft_fast.attach_masks(model)
    p = nft_fast.Purifier(model, nft_fast.NFTConfig(cuda_graph=True))
    with pytest.raises(ValueError, match="CUDA device"):
        p.step(torch.randn(shape), torch.randint(0, k, (shape[0],)))


def _assert_runs_match(run0, run1, rtol, atol):
    """Two runs' ``(flat masks, losses, buffers)`` agree, and the masks moved at all."""
    (m0, l0, b0), (m1, l1, b1) = run0, run1
    assert (m0 - 1).abs().max() > 1e-3
    torch.testing.assert_close(m1, m0, rtol=rtol, atol=atol)
    torch.testing.assert_close(l1, l0, rtol=rtol, atol=atol)
    for n in b0:
        torch.testing.assert_close(b1[n].float(), b0[n].float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["torch"] + [b.values[0] for b in _FAST])
def test_captured_step_body_matches_eager_steps(backend, one_thread):
    """The body a CUDA graph captures reads batch, perm, lam and lr from device buffers
    (Purifier._feed_static); run uncaptured on CPU tensors (the cuda backend on the emulator,
    triton under the interpreter) it must give the eager steps' masks, losses and BN buffers
    while lr changes between steps as the round schedule does."""
    if backend != "torch" and not ops.backend_available(backend):
        pytest.skip(f"{backend} not available")
    build_fn, shape, k, kw = CASES["resnet"]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(shape, generator=g), torch.randint(0, k, (shape[0],), generator=g),
                float(torch.rand((), generator=g)), torch.randperm(shape[0], generator=g)) for _ in range(6)]
    results = []
    for body in (False, True):
        torch.manual_seed(0)
        model = build_fn()
        nft_fast.attach_masks(model)
        p = nft_fast.Purifier(model, nft_fast.NFTConfig(lr=0.1, seed=3), samples_per_class=2.0)
        losses = []
        with nft_fast.use_backend(backend):
            for i, (x, y, lam, perm) in enumerate(batches):
                p.lr = 0.1 if i < 3 else 0.05
                if body:
                    st = p._feed_static(x, y, lam, perm)
                    p._graph_body()
                    losses.append(float(st["loss"]))
                else:
                    losses.append(p.step(x, y, lam, perm)["loss"])
        results.append((p.flat_masks(), torch.tensor(losses), {n: b.clone() for n, b in model.named_buffers()}))
    _assert_runs_match(*results, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "auto", "cuda", "triton"])
def test_cuda_graph_steps_match_eager_steps(backend):
    """Replaying the captured step with fresh lam / perm / batch / lr each time gives the
    masks of uncaptured steps (same sequence)."""
    results = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = build("resnet18", 10, 3, width=16).cuda()
        nft_fast.attach_masks(model, exclude=("bn1",))
        p = nft_fast.Purifier(model, nft_fast.NFTConfig(lr=0.1, seed=3, cuda_graph=graph), samples_per_class=5.0)
        g = torch.Generator().manual_seed(1)
        losses = []
        with nft_fast.use_backend(backend):
            for i in range(12):
                x = torch.randn(32, 3, 32, 32, generator=g).cuda()
                y = torch.randint(0, 10, (32,), generator=g).cuda()
                p.lr = 0.1 if i < 6 else 0.05  # the round schedule changes lr between replays
                losses.append(p.step(x, y)["loss"])
        results.append((p.flat_masks(), torch.tensor(losses), {n: b.clone() for n, b in model.named_buffers()}))
    _assert_runs_match(*results, rtol=1e-4, atol=1e-5)
