"""Masks on the model families users bring (docs/model-families.md): ConvNeXt, torchvision ViT,
Swin, MobileNetV3, EfficientNet, R(2+1)D, MC3, S3D and a GroupNorm ResNet.

Per family: where attach_masks puts masks; one Purifier step on every available backend gives the
torch backend's masks; masked == folded outputs; the state_dict keys equal torchvision's (by name,
from the key specs below, written from torchvision's model sources) and the folded state_dict
loads strictly into a fresh model. Steps and folds run on small variants (fewer blocks, tiny
widths and inputs); key names do not depend on the width, so the key checks build the real depths.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_fast
from nft_fast import models
from nft_fast.masks import MaskedGroupNorm, MaskedLayerNorm, masked_class
from tests.helpers.backends import backend_param

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5  # classes

# family -> (small builder, input shape without the batch dim, attach_masks kwargs)
FAMILIES = {
    "convnext_tiny": (lambda: models.ConvNeXt(K, 3, 4, 16, depths=(1, 1, 1, 1), layer_scale=0.5), (3, 16, 16), {}),
    "vit_b_16": (lambda: models.VisionTransformer(K, 3, 2, 16, depth=2, heads=4), (3, 16, 16), {}),
    # window 2 on an 8x8 map: the shifted windows and their attention mask run
    "swin_t": (lambda: models.SwinTransformer(K, 3, 4, 16, depths=(2, 2), heads=(3, 6), window=2, patch=2),
               (3, 16, 16), {}),
    "mobilenet_v3_small": (lambda: models.MobileNetV3(K, 3, 4), (3, 16, 16), {}),
    "efficientnet_b0": (lambda: models.EfficientNet(K, 3, 4, depths=(1,) * 7), (3, 16, 16), {}),
    "r2plus1d_18": (lambda: models.R3D((1, 1, 1, 1), K, 3, 4, 16, "r2plus1d"), (3, 4, 16, 16), {}),
    "mc3_18": (lambda: models.R3D((1, 1, 1, 1), K, 3, 4, 16, "mc3"), (3, 4, 16, 16), {}),
    "s3d": (lambda: models.S3D(K, 3, 2, 16), (3, 4, 16, 16), {}),
    "resnet18_gn": (lambda: models.resnet18_gn(K, 3, 4), (3, 16, 16), {}),
}


def randomise_affine(model, seed=0):
    """Norm gammas/betas away from 1/0 (fresh norms would hide a mask on a scale-invariant path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


def build(family, seed=0):
    torch.manual_seed(seed)
    model = FAMILIES[family][0]()
    randomise_affine(model, seed)
    return model


def data(family, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *FAMILIES[family][1], generator=g), torch.randint(0, K, (n,), generator=g)


# --------------------------------------------------------------------------- where masks go

def kinds(sites):
    out = {}
    for s in sites:
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attach_masks_where_expected(family):
    model = build(family)
    norms = [n for n, m in model.named_modules()
             if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))]
    sites = nft_fast.attach_masks(model)
    assert [s.name for s in sites] == norms  # every norm, in module order, nothing else
    want = {"resnet18_gn": "gn", "mobilenet_v3_small": "bn", "efficientnet_b0": "bn", "r2plus1d_18": "bn",
            "mc3_18": "bn", "s3d": "bn"}.get(family, "ln")
    assert set(kinds(sites)) == {want}
    x, _ = data(family, 2)
    model(x).sum().backward()
    assert all(s.mask.grad is not None and s.mask.grad.abs().sum() > 0 for s in sites)


def test_family_specific_sites():
    # ConvNeXt: the NHWC LayerNorm in each block and the LayerNorm2d of stem, downsampling and head
    m = build("convnext_tiny")
    names = {s.name: type(s.module) for s in nft_fast.attach_masks(m, exclude=models.default_exclude("convnext_tiny"))}
    assert "features.0.1" not in names and names["features.2.0"] is masked_class(models.LayerNorm2d)
    assert names["features.1.0.block.2"] is MaskedLayerNorm and "classifier.0" in names
    # neurons: the pointwise Linears; the 7x7 depthwise conv feeds the LayerNorm through a permute
    m = build("convnext_tiny")
    x, _ = data("convnext_tiny", 2)
    sites = {s.name: s.kind for s in nft_fast.attach_masks(m, neurons=True, example_input=x)}
    assert sites["features.1.0.block.3"] == "linear" and sites["features.1.0.block.5"] == "linear"
    # Swin: qkv / proj run as modules here, so they take neuron masks (torchvision's read the weights)
    m = build("swin_t")
    x, _ = data("swin_t", 2)
    sites = {s.name: s.kind for s in nft_fast.attach_masks(m, neurons=True, example_input=x)}
    assert sites["features.1.1.attn.qkv"] == "linear" and sites["features.1.1.attn.proj"] == "linear"
    assert sites["features.1.1.norm1"] == "ln" and "head" not in sites
    # SE blocks: fc1 (-> activation) and fc2 (-> gate) take neuron masks; convs feeding a BN do not
    for fam, se in (("mobilenet_v3_small", "features.1.block.1"), ("efficientnet_b0", "features.1.0.block.1")):
        m = build(fam)
        x, _ = data(fam, 2)
        sites = {s.name: s.kind for s in nft_fast.attach_masks(m, neurons=True, example_input=x)}
        assert sites[f"{se}.fc1"] == "conv" and sites[f"{se}.fc2"] == "conv", fam
        assert "features.0.0" not in sites and "features.0.1" in sites
    # R(2+1)D: the mid BN of every (2+1)D pair is a site of its own
    m = build("r2plus1d_18")
    names = [s.name for s in nft_fast.attach_masks(m, exclude=models.default_exclude("r2plus1d_18"))]
    assert "layer1.0.conv1.0.1" in names and "layer1.0.conv1.1" in names and "stem.4" not in names


def test_vit_neuron_masks_skip_the_attention_out_proj():
    """nn.MultiheadAttention reads out_proj.weight itself: a mask there would not act, yet fold."""
    x, _ = data("vit_b_16", 2)
    for kw in ({}, {"example_input": x}):
        m = build("vit_b_16")
        names = {s.name for s in nft_fast.attach_masks(m, neurons=True, **kw)}
        assert "encoder.layers.encoder_layer_0.mlp.0" in names and "encoder.layers.encoder_layer_0.mlp.3" in names
        assert not any("self_attention" in n for n in names)


def test_modules_whose_forward_never_runs_are_not_masked():
    """torchvision's Swin attention passes qkv.weight / proj.weight to a function: with an example
    input such Linears are found and left unmasked."""

    class FunctionalAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.qkv = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(F.linear(self.norm(x), self.qkv.weight, self.qkv.bias).relu())

    m = FunctionalAttn()
    names = {s.name for s in nft_fast.attach_masks(m, neurons=True, example_input=torch.randn(2, 8))}
    assert names == {"norm"}


def test_layernorm_subclass_with_its_own_forward():
    """A user's channels-first LayerNorm (torchvision's LayerNorm2d: permute, F.layer_norm, permute)
    keeps its own forward with gamma * m; nft_fast's LayerNorm2d runs the dispatched op on NHWC."""

    class TVLayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    a, b = TVLayerNorm2d(6, eps=1e-6).double(), models.LayerNorm2d(6, eps=1e-6).double()
    randomise_affine(a)
    b.load_state_dict(a.state_dict())
    nft_fast.attach_masks(a)
    nft_fast.attach_masks(b)
    with torch.no_grad():
        a.neuron_mask.uniform_(0.1, 1)
        b.neuron_mask.copy_(a.neuron_mask)
    torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
    ref = F.layer_norm(x.movedim(1, -1), (6,), a.weight * a.neuron_mask, a.bias, 1e-6).movedim(-1, 1)
    torch.testing.assert_close(a(x), ref, rtol=1e-12, atol=1e-12)
    assert a._parameters["weight"] is a.weight and isinstance(a.weight, nn.Parameter)  # restored after the call
    folded = nft_fast.fold_masks(nn.Sequential(a))
    assert type(folded[0]) is TVLayerNorm2d
    torch.testing.assert_close(folded(x), ref, rtol=1e-12, atol=1e-12)


def test_groupnorm_mask_is_on_gamma_and_folds():
    torch.manual_seed(0)
    gn = nn.GroupNorm(2, 6).double()
    randomise_affine(gn)
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64)
    nft_fast.attach_masks(gn)
    assert isinstance(gn, MaskedGroupNorm) and gn.neuron_mask.shape == (6,)
    with torch.no_grad():
        gn.neuron_mask.uniform_(0.1, 1)
    want = F.group_norm(x, 2, gn.weight * gn.neuron_mask, gn.bias, gn.eps)  # beta untouched
    torch.testing.assert_close(gn(x), want, rtol=1e-12, atol=1e-12)
    assert nft_fast.ops.implementations()["masked_gn"] == ("torch",)
    for backend in ("cpp", "triton", "cuda"):  # no kernel: every backend runs the torch implementation
        if nft_fast.ops.backend_available(backend):
            with nft_fast.use_backend(backend):
                assert nft_fast.ops.resolved_backend("masked_gn", x.device) == "torch"
                torch.testing.assert_close(gn(x), want, rtol=0, atol=0)
    plain = nft_fast.fold_masks(nn.Sequential(gn))
    assert type(plain[0]) is nn.GroupNorm
    torch.testing.assert_close(plain(x), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- one Purifier step per backend

def _purifier(family, neurons):
    model = build(family)
    x, y = data(family, 6)
    nft_fast.attach_masks(model, neurons=neurons, example_input=x[:2] if neurons else None)
    return nft_fast.Purifier(model, nft_fast.NFTConfig(lr=0.1, seed=3), samples_per_class=2.0, num_classes=K), x, y


BACKENDS = [backend_param(b) for b in ("cpp", "triton", "cuda")]
# the transformer and SE families also take neuron masks (Linear / SE 1x1 convs) in the step
NEURONS = ("convnext_tiny", "vit_b_16", "swin_t", "mobilenet_v3_small", "efficientnet_b0")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_step_matches_torch(family, backend):
    """One step from the same state with the same lam/perm: loss, masks (the update) and norm
    buffers as on the torch backend. The first step's update is lr times the gradient, so this
    compares every mask gradient the backend's kernels produce."""
    neurons = family in NEURONS
    (pt, x, y), (pf, _, _) = _purifier(family, neurons), _purifier(family, neurons)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))
    m0 = pt.flat_masks()
    torch.manual_seed(7)  # the same dropout masks in both steps
    with nft_fast.use_backend("torch"):
        lt = pt.step(x, y, lam=0.7, perm=perm)["loss"]
    torch.manual_seed(7)
    with nft_fast.use_backend(backend):
        lf = pf.step(x, y, lam=0.7, perm=perm)["loss"]
    assert lf == pytest.approx(lt, rel=1e-5)
    want, got = pt.flat_masks() - m0, pf.flat_masks() - m0
    assert want.abs().max() > 1e-4  # the masks moved
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())
    for (n, bt), bf in zip(pt.model.named_buffers(), pf.model.buffers()):
        torch.testing.assert_close(bf.float(), bt.float(), rtol=1e-4, atol=1e-5, msg=n)


# --------------------------------------------------------------------------- fold

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype,neurons", [(torch.float32, False), (torch.float64, True)])
def test_fold_equals_masked(family, dtype, neurons):
    model = build(family).to(dtype)
    x, _ = data(family, 3)
    x = x.to(dtype)
    plain_keys = list(model.state_dict())
    nft_fast.attach_masks(model, neurons=neurons, example_input=x[:2] if neurons else None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in nft_fast.mask_parameters(model):
            p.copy_((torch.rand(p.shape, generator=g) * 0.9 + 0.1).to(dtype))
        model.train()
        model(x)  # running statistics
    model.eval()
    folded = nft_fast.fold_masks(model)
    assert list(folded.state_dict()) == plain_keys and not nft_fast.mask_parameters(folded)
    fresh = FAMILIES[family][0]().to(dtype)
    fresh.load_state_dict(folded.state_dict())  # strict
    fresh.eval()
    with torch.no_grad():
        want, got = model(x), fresh(x)
        unmasked = build(family).to(dtype).eval()
        unmasked.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("neuron_mask")})
        moved = (want - unmasked(x)).abs().max()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-6, err
    assert moved > 1e-3 * want.abs().max()  # the masks changed the function


# --------------------------------------------------------------------------- torchvision key layouts
# Written from torchvision's model sources (torchvision/models/convnext.py, vision_transformer.py,
# swin_transformer.py, mobilenetv3.py, efficientnet.py, video/resnet.py, video/s3d.py): module
# names, and torch's state_dict order (a module's own parameters, then its buffers, then its
# children in registration order). Checked by name only: torchvision is not importable here.

def _w(p, bias=False):
    return [p + "weight"] + ([p + "bias"] if bias else [])


def _bn(p):
    return [p + s for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def _cna(p, bn=True):
    """Conv{2,3}dNormActivation: 0 conv (no bias), 1 BatchNorm."""
    return _w(p + "0.") + (_bn(p + "1.") if bn else _w(p + "1.", True))


def convnext_tiny_keys():
    k = _w("features.0.0.", True) + _w("features.0.1.", True)
    for s, n in enumerate((3, 3, 9, 3)):
        f = 1 + 2 * s
        for i in range(n):
            p = f"features.{f}.{i}."
            k += [p + "layer_scale"] + _w(p + "block.0.", True) + _w(p + "block.2.", True) + _w(p + "block.3.", True) \
                + _w(p + "block.5.", True)
        if s < 3:
            k += _w(f"features.{f + 1}.0.", True) + _w(f"features.{f + 1}.1.", True)
    return k + _w("classifier.0.", True) + _w("classifier.2.", True)


def vit_b_16_keys():
    k = ["class_token"] + _w("conv_proj.", True) + ["encoder.pos_embedding"]
    for i in range(12):
        p = f"encoder.layers.encoder_layer_{i}."
        k += _w(p + "ln_1.", True) + [p + "self_attention.in_proj_weight", p + "self_attention.in_proj_bias"] \
            + _w(p + "self_attention.out_proj.", True) + _w(p + "ln_2.", True) + _w(p + "mlp.0.", True) + _w(p + "mlp.3.", True)
    return k + _w("encoder.ln.", True) + _w("heads.head.", True)


def swin_t_keys():
    k = _w("features.0.0.", True) + _w("features.0.2.", True)
    for s, n in enumerate((2, 2, 6, 2)):
        f = 1 + 2 * s
        for i in range(n):
            p = f"features.{f}.{i}."
            k += _w(p + "norm1.", True) + [p + "attn.relative_position_bias_table", p + "attn.relative_position_index"] \
                + _w(p + "attn.qkv.", True) + _w(p + "attn.proj.", True) + _w(p + "norm2.", True) + _w(p + "mlp.0.", True) \
                + _w(p + "mlp.3.", True)
        if s < 3:
            k += _w(f"features.{f + 1}.reduction.") + _w(f"features.{f + 1}.norm.", True)
    return k + _w("norm.", True) + _w("head.", True)


def _mb_block(p, expand, se):
    k, j = [], 0
    if expand:
        k, j = _cna(p + "0."), 1
    k += _cna(f"{p}{j}.")
    if se:
        j += 1
        k += _w(f"{p}{j}.fc1.", True) + _w(f"{p}{j}.fc2.", True)
    return k + _cna(f"{p}{j + 1}.")


def mobilenet_v3_small_keys():
    # (expanded != input, use_se) of the 11 inverted residual blocks of mobilenet_v3_small
    blocks = [(False, True), (True, False), (True, False)] + [(True, True)] * 8
    k = _cna("features.0.")
    for i, (expand, se) in enumerate(blocks, start=1):
        k += _mb_block(f"features.{i}.block.", expand, se)
    return k + _cna("features.12.") + _w("classifier.0.", True) + _w("classifier.3.", True)


def efficientnet_b0_keys():
    k = _cna("features.0.")
    for s, (ratio, n) in enumerate(((1, 1), (6, 2), (6, 2), (6, 3), (6, 3), (6, 4), (6, 1)), start=1):
        for i in range(n):
            k += _mb_block(f"features.{s}.{i}.block.", ratio != 1, True)
    return k + _cna("features.8.") + _w("classifier.1.", True)


def _video_resnet_keys(stem, conv):
    k = list(stem)
    for layer in range(1, 5):
        for b in range(2):
            p = f"layer{layer}.{b}."
            k += conv(p + "conv1.0.") + _bn(p + "conv1.1.") + conv(p + "conv2.0.") + _bn(p + "conv2.1.")
            if layer > 1 and b == 0:
                k += _w(p + "downsample.0.") + _bn(p + "downsample.1.")
    return k + _w("fc.", True)


def r2plus1d_18_keys():
    stem = _w("stem.0.") + _bn("stem.1.") + _w("stem.3.") + _bn("stem.4.")
    return _video_resnet_keys(stem, lambda p: _w(p + "0.") + _bn(p + "1.") + _w(p + "3."))


def mc3_18_keys():
    return _video_resnet_keys(_w("stem.0.") + _bn("stem.1."), _w)


def s3d_keys():
    tsc = lambda p: _cna(p + "0.") + _cna(p + "1.")  # noqa: E731  TemporalSeparableConv
    k = tsc("features.0.") + _cna("features.2.") + tsc("features.3.")
    for i in (5, 6, 8, 9, 10, 11, 12, 14, 15):  # SepInceptionBlock3D (4, 7 and 13 are max-pools)
        p = f"features.{i}."
        k += _cna(p + "branch0.") + _cna(p + "branch1.0.") + tsc(p + "branch1.1.") + _cna(p + "branch2.0.") \
            + tsc(p + "branch2.1.") + _cna(p + "branch3.1.")
    return k + _w("classifier.1.", True)


def resnet18_gn_keys():
    """torchvision resnet18(norm_layer=GroupNorm): the resnet18 names, GroupNorm has no buffers."""
    k = _w("conv1.") + _w("bn1.", True)
    for layer in range(1, 5):
        for b in range(2):
            p = f"layer{layer}.{b}."
            k += _w(p + "conv1.") + _w(p + "bn1.", True) + _w(p + "conv2.") + _w(p + "bn2.", True)
            if layer > 1 and b == 0:
                k += _w(p + "downsample.0.") + _w(p + "downsample.1.", True)
    return k + _w("fc.", True)


# arch -> (key spec, (num_classes, image_size) and parameter count of torchvision's model at width 64,
# the "num_params" of its published weights)
TV = {
    "convnext_tiny": (convnext_tiny_keys, (1000, 224), 28589128),
    "vit_b_16": (vit_b_16_keys, (1000, 224), 86567656),
    "swin_t": (swin_t_keys, (1000, 224), 28288354),
    "mobilenet_v3_small": (mobilenet_v3_small_keys, (1000, 224), 2542856),
    "efficientnet_b0": (efficientnet_b0_keys, (1000, 224), 5288548),
    "r2plus1d_18": (r2plus1d_18_keys, (400, 112), 31505325),
    "mc3_18": (mc3_18_keys, (400, 112), 11695440),
    "s3d": (s3d_keys, (400, 224), 8320048),
    "resnet18_gn": (resnet18_gn_keys, (1000, 224), 11689512),
}


@pytest.mark.parametrize("arch", sorted(TV))
def test_torchvision_keys_and_strict_reload(arch):
    spec, (classes, size), nparams = TV[arch]
    with torch.device("meta"):  # the real network: names and parameter count
        full = models.build(arch, num_classes=classes, in_channels=3, width=64, image_size=size)
    assert list(full.state_dict()) == spec()
    assert sum(p.numel() for p in full.parameters()) == nparams
    # a narrow build has the same names; masked, it holds them plus the masks; folded, it
    # loads strictly into a fresh unmasked model
    small = models.build(arch, num_classes=K, in_channels=3, width=4, image_size=28)
    assert list(small.state_dict()) == spec()
    nft_fast.attach_masks(small, exclude=models.default_exclude(arch))
    assert [k for k in small.state_dict() if not k.endswith(".neuron_mask")] == spec()
    fresh = models.build(arch, num_classes=K, in_channels=3, width=4, image_size=28)
    fresh.load_state_dict(nft_fast.fold_masks(small).state_dict())


@pytest.mark.parametrize("arch", sorted(TV))
def test_registered_archs_infer_and_run(arch):
    """The zoo entry: a forward on 28x28 images (4-frame clips for the video nets), the stem norm
    excluded by default, and infer_kwargs rebuilding odd widths exactly."""
    dims = models.input_dims(arch)
    assert dims == (5 if arch in ("r2plus1d_18", "mc3_18", "s3d") else 4)
    m = models.build(arch, num_classes=K, in_channels=1, width=2, image_size=28).eval()
    x = torch.randn(2, 1, *((4,) if dims == 5 else ()), 28, 28)
    with torch.no_grad():
        assert m(x).shape == (2, K)
    names = dict(m.named_modules())
    assert all(n in names for n in models.default_exclude(arch))
    for width in (1, 3, 5, 24, 40):
        with torch.device("meta"):
            m = models.build(arch, num_classes=K, in_channels=1, width=width, image_size=28)
        kw = models.infer_kwargs(arch, m.state_dict())
        assert kw == {"num_classes": K, "in_channels": 1, "width": width, **({"image_size": 28} if arch == "vit_b_16" else {})}
