"""The fused mask update, every backend against the torch oracle and a float64 model."""
import math

import pytest
import torch

import nft_fast
from nft_fast import ops
from nft_fast.ops.mask_update import mask_update_cpp, mask_update_torch

# "cuda" runs on CPU tensors under the emulator (conftest sets NFT_FAST_CUDA_EMU=1 without a GPU).
BACKENDS = [b for b in ("cpp", "cuda") if ops.backend_available(b)]


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(n, generator=g) * 1.3 - 0.1  # below floors, inside, above 1
    m[::5] = 1.0  # exactly 1: regularizer gradient 0
    grad = torch.randn(n, generator=g) * 0.1
    grad[::11] = 0.0
    buf = torch.randn(n, generator=g) * 0.05
    floor = torch.rand(n, generator=g) * 0.5
    return m, grad, buf, floor


def float64_model(m, grad, buf, floor, lr, mom, reg):
    m, grad, buf, floor = (t.double() for t in (m, grad, buf, floor))
    g = grad + reg * torch.sign(m - 1)
    b = mom * buf + g
    return torch.minimum(torch.maximum(m - lr * b, floor), torch.ones_like(m)), b


@pytest.mark.parametrize("n", [1, 7, 4736, 100_003])
def test_torch_matches_float64(n):
    m, grad, buf, floor = inputs(n)
    want_m, want_b = float64_model(m, grad, buf, floor, 0.05, 0.95, 1e-3 / 50)
    mask_update_torch(m, grad, buf, floor, 0.05, 0.95, 1e-3 / 50)
    torch.testing.assert_close(m.double(), want_m, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(buf.double(), want_b, rtol=1e-6, atol=1e-7)
    assert (m <= 1).all() and (m >= floor).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 4736, 100_003])
@pytest.mark.parametrize("lr,mom,reg", [(0.05, 0.95, 2e-5), (3.0, 0.0, 0.0), (0.0229, 0.5, 0.1)])
def test_backend_bit_equal_to_torch(backend, n, lr, mom, reg):
    a = inputs(n, seed=n)
    b = [t.clone() for t in a]
    mask_update_torch(*a, lr, mom, reg)
    with nft_fast.use_backend(backend):
        assert ops.resolved_backend("mask_update", torch.device("cpu")) == backend
        ops.mask_update_(*b, lr, mom, reg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3]), "grad/floor must not be written"


@pytest.mark.parametrize("backend", BACKENDS + (["triton"] if ops.backend_available("triton") else []))
def test_nan_propagates_like_torch(backend):
    """A NaN mask, gradient or momentum entry stays NaN as in torch (maximum/clamp keep NaN), never
    silently clamped to the floor or 1: the Purifier's non-finite check must see it."""
    n = 40
    a = list(inputs(n, seed=5))
    a[0][3] = float("nan")
    a[1][9] = float("nan")
    a[2][17] = float("nan")
    a[1][20], a[1][21] = float("inf"), -float("inf")
    b = [t.clone() for t in a]
    mask_update_torch(*a, 0.05, 0.9, 1e-3)
    with nft_fast.use_backend(backend):
        ops.mask_update_(*b, 0.05, 0.9, 1e-3)
    assert torch.isnan(a[0]).tolist() == torch.isnan(b[0]).tolist() and torch.isnan(a[0][[3, 9, 17]]).all()
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-7, equal_nan=True)
    torch.testing.assert_close(b[2], a[2], rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.skipif(not ops.backend_available("cuda"), reason="no CUDA device and no emulator")
@pytest.mark.parametrize("n", [7, 100_003])
def test_cuda_reads_a_tensor_lr_on_the_device(n):
    # The kernel itself reads lr (a captured graph follows the schedule): bit-equal to a float lr.
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = [t.to(dev) for t in inputs(n, seed=n + 2)]
    b = [t.clone() for t in a]
    mask_update_torch(*a, 0.0229, 0.5, 0.1)
    lr = torch.tensor([0.0229], device=dev)
    with nft_fast.use_backend("cuda"):
        ops.mask_update_(*b, lr, 0.5, 0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    with pytest.raises(ValueError, match="1-element float32"):
        ops.mask_update.mask_update_cuda(*b, lr.double(), 0.5, 0.1)


@pytest.mark.skipif(not ops.backend_available("cpp"), reason="C++ extension not built")
def test_cpp_rejects_mismatched_buffers():
    m, grad, buf, floor = inputs(10)
    with pytest.raises(ValueError, match="buf must match"):
        mask_update_cpp(m, grad, buf[:5], floor, 0.1, 0.9, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        mask_update_cpp(m[::2], grad[::2], buf[::2], floor[::2], 0.1, 0.9, 0.0)


@pytest.mark.skipif(not ops.backend_available("cpp"), reason="C++ extension not built")
def test_cpp_float64_falls_back_to_torch():
    a = [t.double() for t in inputs(33)]
    b = [t.clone() for t in a]
    mask_update_torch(*a, 0.1, 0.9, 0.01)
    mask_update_cpp(*b, 0.1, 0.9, 0.01)
    assert torch.equal(a[0], b[0])


def test_dispatch_errors_and_override():
    with pytest.raises(ValueError, match="unknown backend"):
        nft_fast.set_backend("fortran")
    if not ops.backend_available("cuda"):
        with pytest.raises(ops.BackendUnavailable, match="cuda"):
            nft_fast.set_backend("cuda")
    nft_fast.set_backend("torch")
    assert nft_fast.get_backend() == "torch"
    with nft_fast.use_backend("auto"):
        assert nft_fast.get_backend() == "auto"
    assert nft_fast.get_backend() == "torch"
    assert ops.resolved_backend("mask_update", torch.device("cpu")) == "torch"
    assert ops.resolved_backend("masked_bn", torch.device("cpu")) == "torch"


def test_floor_schedule_values():
    cfg = nft_fast.NFTConfig()
    want = {1: 0.485, 2: 0.294, 3: 0.179, 5: 0.066, 10: 0.0054, 19: 6e-5}
    for l, v in want.items():
        assert cfg.floor(l) == pytest.approx(v, rel=0.02)
    lrs = [cfg.round_lr(r) for r in range(5)]
    assert lrs == pytest.approx([0.05, 0.0471, 0.0396, 0.0304, 0.0229], abs=1e-4)
    # Same values as torch's scheduler.
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5, eta_min=0.02)
    for r in range(5):
        assert lrs[r] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        sch.step()
    assert math.isclose(cfg.steps_per_round, 200)


# ---------------------------------------------------------------------------- triton

needs_triton = pytest.mark.skipif(not ops.backend_available("triton"), reason="triton cannot run here")
LR_CASES = [(0.05, 0.95, 2e-5), (3.0, 0.0, 0.0), (0.0229, 0.5, 0.1)]


@needs_triton
@pytest.mark.parametrize("n", [1, 7, 4736, 100_003])
@pytest.mark.parametrize("lr,mom,reg", LR_CASES)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_triton_matches_torch(n, lr, mom, reg, lr_kind):
    from nft_fast.ops.mask_update import mask_update_triton

    a = inputs(n, seed=n + 1)
    b = [t.clone() for t in a]
    mask_update_torch(*a, lr, mom, reg)
    lr_arg = torch.tensor([lr], dtype=torch.float32) if lr_kind == "tensor" else lr
    with nft_fast.use_backend("triton"):
        assert ops.resolved_backend("mask_update", torch.device("cpu")) == "triton"
        ops.mask_update_(*b, lr_arg, mom, reg)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b[2], a[2], rtol=1e-6, atol=1e-7)
    assert torch.equal(a[1], b[1]) and torch.equal(a[3], b[3]), "grad/floor must not be written"
    assert (b[0] <= 1).all() and (b[0] >= b[3]).all()
    # The float64 model agrees too (the torch oracle is not the only witness).
    want_m, want_b = float64_model(*inputs(n, seed=n + 1), lr, mom, reg)
    torch.testing.assert_close(b[0].double(), want_m, rtol=1e-6, atol=1e-6)
    if lr_kind == "tensor":
        assert torch.equal(lr_arg, torch.tensor([lr])), "lr must not be written"
    mask_update_triton(*b, lr_arg, mom, reg)  # a second step from the updated state
    mask_update_torch(*a, lr, mom, reg)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("n", [7, 4736])
def test_torch_tensor_lr_matches_float_lr(n):
    a = inputs(n, seed=3)
    b = [t.clone() for t in a]
    mask_update_torch(*a, 0.0471, 0.9, 1e-3)
    mask_update_torch(*b, torch.tensor([0.0471]), 0.9, 1e-3)
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(a[2], b[2])


@needs_triton
def test_triton_rejects_bad_input():
    from nft_fast.ops.mask_update import mask_update_triton

    m, grad, buf, floor = inputs(10)
    with pytest.raises(ValueError, match="1-element float32"):
        mask_update_triton(m, grad, buf, floor, torch.tensor([0.1, 0.2]), 0.9, 0.0)
    with pytest.raises(ValueError, match="1-element float32"):
        mask_update_triton(m, grad, buf, floor, torch.tensor([0.1], dtype=torch.float64), 0.9, 0.0)
    with pytest.raises(ValueError, match="buf must match"):
        mask_update_triton(m, grad, buf[:5], floor, 0.1, 0.9, 0.0)
    with pytest.raises(ValueError, match="contiguous"):
        mask_update_triton(m[::2], grad[::2], buf[::2], floor[::2], 0.1, 0.9, 0.0)
    with pytest.raises(ValueError, match="float32/bfloat16/float16"):
        mask_update_triton(*(t.double() for t in (m, grad, buf, floor)), 0.1, 0.9, 0.0)


@needs_triton
def test_triton_opcheck():
    from nft_fast.ops.mask_update import mask_update_op

    m, grad, buf, floor = inputs(100)
    torch.library.opcheck(mask_update_op, (m, grad, buf, floor, torch.tensor([0.05]), 0.0, 0.9, 1e-3))
    torch.library.opcheck(mask_update_op, (m, grad, buf, floor, None, 0.05, 0.9, 0.0))


@needs_triton
def test_triton_compile_fullgraph_matches_eager():
    from nft_fast.ops.mask_update import mask_update_triton

    def step(m, grad, buf, floor, lr):
        mask_update_triton(m, grad, buf, floor, lr, 0.9, 1e-3)
        return m.sum()

    compiled = torch.compile(step, fullgraph=True)
    a = list(inputs(333, seed=5))
    b = [t.clone() for t in a]
    for lr in (0.05, 0.03):  # a tensor lr changes without a recompile
        lr_t = torch.tensor([lr])
        s_eager = step(*a, lr_t)
        s_comp = compiled(*b, lr_t)
        torch.testing.assert_close(s_comp, s_eager)
        torch.testing.assert_close(b[0], a[0], rtol=0, atol=0)
        torch.testing.assert_close(b[2], a[2], rtol=0, atol=0)


@pytest.mark.gpu
def test_triton_cuda_graph_reads_lr_on_device():
    from nft_fast.ops.mask_update import mask_update_triton

    a = [t.cuda() for t in inputs(100_003, seed=9)]
    b = [t.clone() for t in a]
    lr = torch.tensor([0.05], device="cuda")
    mask_update_triton(*b, lr, 0.9, 1e-3)  # warm up (compiles the kernel) outside the capture
    mask_update_torch(*a, 0.05, 0.9, 1e-3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask_update_triton(*b, lr, 0.9, 1e-3)
    for value in (0.03, 0.01):
        lr.fill_(value)  # the captured kernel must see the new value
        graph.replay()
        mask_update_torch(*a, value, 0.9, 1e-3)
    torch.cuda.synchronize()
    torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b[2], a[2], rtol=1e-6, atol=1e-6)
