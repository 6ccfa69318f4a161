"""frozen_conv: torch's convolution forward and data gradient, keeping only the weight for backward."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_fast.ops.frozen_conv import FrozenConv2d, freeze_convs, frozen_conv, thaw_convs

pytestmark = pytest.mark.usefixtures("one_thread")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

CASES = {  # name: (x shape, weight shape, kwargs, memory format)
    "1d": ((7, 6, 31), (10, 3, 4), dict(stride=2, padding=3, dilation=2, groups=2), None),
    "2d": ((3, 4, 13, 11), (7, 4, 3, 3), dict(stride=1, padding=1), None),
    "2d_grouped": ((2, 6, 9, 10), (9, 2, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=3), None),
    "2d_cl": ((3, 4, 13, 11), (7, 4, 3, 3), dict(stride=2, padding=1), torch.channels_last),
    "2d_cl_grouped": ((2, 6, 9, 10), (9, 2, 1, 3), dict(padding=(0, 1), groups=3), torch.channels_last),
    "3d": ((2, 3, 5, 6, 7), (5, 3, 3, 3, 2), dict(stride=(1, 2, 1), padding=1), None),
    "3d_cl": ((2, 3, 5, 6, 7), (5, 3, 3, 3, 3), dict(padding=(1, 0, 1), dilation=(1, 2, 1)), torch.channels_last_3d),
}


def make(name, bias, seed=0):
    xs, ws, kw, fmt = CASES[name]
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(xs, generator=g), torch.randn(ws, generator=g)
    b = torch.randn(ws[0], generator=g) if bias else None
    if fmt is not None:
        x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    return x, w, b, kw


def saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn`` runs, and the saved tensors' storages."""
    total, ptrs = [0], set()

    def pack(t):
        total[0] += t.numel() * t.element_size()
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0], ptrs


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("bias", [True, False])
def test_matches_torch_conv(name, bias):
    x, w, b, kw = make(name, bias)
    conv = _CONV[w.dim() - 2]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, nbytes, ptrs = saved_bytes(lambda: frozen_conv(xa, w, b, **kw))
    y_ref, nbytes_ref, _ = saved_bytes(lambda: conv(xb, w, b, **kw))
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert y.stride() == y_ref.stride()
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    assert xa.grad.stride() == xb.grad.stride()
    # Only the weight is kept; torch's conv keeps the input too.
    assert nbytes == w.numel() * w.element_size()
    assert xa.untyped_storage().data_ptr() not in ptrs
    assert nbytes_ref >= nbytes + x.numel() * x.element_size()


def test_trainable_bias_and_no_input_grad():
    x, w, b, kw = make("2d", True)
    # x frozen, bias frozen: no graph at all.
    y = frozen_conv(x, w, b, **kw)
    assert not y.requires_grad and y.grad_fn is None
    # x frozen, bias trains: only the bias gradient, still without saving x.
    bt, br = b.clone().requires_grad_(), b.clone().requires_grad_()
    y, nbytes, ptrs = saved_bytes(lambda: frozen_conv(x, w, bt, **kw))
    dy = torch.randn(y.shape)
    y.backward(dy)
    F.conv2d(x, w, br, **kw).backward(dy)
    torch.testing.assert_close(bt.grad, br.grad, rtol=1e-5, atol=1e-5)
    assert x.untyped_storage().data_ptr() not in ptrs
    # No grad mode: nothing.
    with torch.no_grad():
        assert not frozen_conv(x.requires_grad_(), w, b, **kw).requires_grad


def test_rejects_trainable_weight_and_bad_input():
    x, w, b, kw = make("2d", False)
    with pytest.raises(ValueError, match="weight requires grad"):
        frozen_conv(x, w.requires_grad_(), None, **kw)
    w.requires_grad_(False)
    with pytest.raises(ValueError, match="batched 2d input"):
        frozen_conv(x[0], w, None, **kw)
    with pytest.raises(ValueError, match="string padding"):
        frozen_conv(x, w, None, padding="same")


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),  # eligible
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding="same", groups=3, bias=False),  # eligible (symmetric 'same')
        nn.Conv2d(6, 5, 4, padding="same"),  # asymmetric 'same': skipped
        nn.Conv2d(5, 5, 3, padding=1, padding_mode="reflect"),  # not zeros padding: skipped
        nn.Conv2d(5, 5, 1),  # trainable weight: skipped
        nn.Conv2d(5, 5, 1),  # holds a neuron_mask: skipped
        nn.ConvTranspose2d(5, 4, 2),  # transposed: skipped
        nn.Flatten(2),
        nn.Conv1d(4, 3, 3, stride=2, padding="valid"),  # eligible
    )
    m[7].register_parameter("neuron_mask", nn.Parameter(torch.ones(5)))
    for i, mod in enumerate(m):
        if i != 6:
            for p in mod.parameters(recurse=False):
                p.requires_grad_(p.dim() == 1 and i == 7)  # only the mask trains (and conv 6)
    return m


def test_freeze_and_thaw_convs():
    model = _model().eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y_ref = model(x)
    y_ref.square().sum().backward()
    gx_ref = x.grad.clone()
    params = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert freeze_convs(model) == 3
    assert [type(model[i]).__name__ for i in (0, 3, 4, 5, 6, 7, 8, 10)] == [
        "FrozenConv2d", "FrozenConv2d", "Conv2d", "Conv2d", "Conv2d", "Conv2d", "ConvTranspose2d", "FrozenConv1d"]
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[0], FrozenConv2d)
    sd = model.state_dict(keep_vars=True)
    assert list(sd) == list(params) and all(sd[k] is params[k] for k in sd)
    x.grad = None
    y = model(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    y.square().sum().backward()
    torch.testing.assert_close(x.grad, gx_ref, rtol=1e-5, atol=1e-5)
    assert freeze_convs(model) == 0  # already frozen

    assert thaw_convs(model) == 3
    assert type(model[0]) is nn.Conv2d and type(model[10]) is nn.Conv1d
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


def test_frozen_model_saves_less():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 3))
    model.requires_grad_(False)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    _, plain, _ = saved_bytes(lambda: model(x))
    freeze_convs(model)
    _, frozen, _ = saved_bytes(lambda: model(x))
    assert frozen == sum(m.weight.numel() * 4 for m in model)
    assert plain - frozen == 4 * (x.numel() + 2 * 4 * 8 * 16 * 16)  # the three inputs


def test_compile_fullgraph_matches_eager():
    x, w, b, kw = make("2d_cl", True)

    def f(x):
        return torch.relu(frozen_conv(x, w, b, **kw)).square().sum()

    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [f(xs[0]), torch.compile(f, fullgraph=True)(xs[1])]
    for o in outs:
        o.backward()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-5)


def test_autocast_like_torch():
    x, w, b, kw = make("2d", True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = frozen_conv(xa, w, b, **kw), F.conv2d(xb, w, b, **kw)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    dy = torch.randn(y.shape).to(torch.bfloat16)
    y.backward(dy)
    y_ref.backward(dy)
    assert xa.grad.dtype == torch.float32
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-2, atol=1e-2)
