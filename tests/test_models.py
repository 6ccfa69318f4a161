"""The model zoo (nft_fast.models): every architecture builds, trains, takes masks, folds and
round-trips through infer_kwargs; the reference ResNet-18 keeps its keys and mask layout."""

import pytest
import torch

import nft_fast
from nft_fast import models
from nft_fast import reference as R

# the families of docs/model-families.md have their own tests: tests/test_model_families.py
FAMILIES = {"convnext_tiny", "vit_b_16", "swin_t", "mobilenet_v3_small", "efficientnet_b0", "r2plus1d_18", "mc3_18",
            "s3d", "resnet18_gn"}
ZOO = [a for a in models.ARCHS if a != "mlp" and a not in FAMILIES]
NUM_CLASSES = 7
WIDTH = 8
# arch -> list of (in_channels, input shape without the batch dim); image_size is the last dim
INPUTS = {a: [(1, (1, 28, 28))] for a in ZOO}
for _a in ("resnet18_imagenet", "resnet50_imagenet", "vit"):
    INPUTS[_a].append((3, (3, 32, 32)))
INPUTS["r3d18"] = [(1, (1, 4, 28, 28)), (3, (3, 8, 32, 32))]
CASES = [(a, c, s) for a in ZOO for c, s in INPUTS[a]]
IDS = [f"{a}-{'x'.join(map(str, s))}" for a, c, s in CASES]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(arch, in_channels, shape, width=WIDTH, num_classes=NUM_CLASSES):
    return models.build(arch, num_classes=num_classes, in_channels=in_channels, width=width, image_size=shape[-1])


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def test_arch_names():
    assert set(models.ARCHS) - FAMILIES == {"preactresnet18", "preactresnet18_backdoorbench", "resnet18", "resnet18_imagenet",
                                 "resnet50", "resnet50_imagenet", "vgg16_bn", "mobilenetv2", "r3d18", "vit", "mlp"}
    assert FAMILIES <= set(models.ARCHS)
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build("resnet19")


@pytest.mark.parametrize("arch,in_channels,shape", CASES, ids=IDS)
def test_forward_backward_masks_infer_fold(arch, in_channels, shape):
    torch.manual_seed(0)
    model = make(arch, in_channels, shape)
    x = torch.randn(3, *shape)
    # forward/backward of the plain model
    model.train()
    out = model(x)
    assert out.shape == (3, NUM_CLASSES)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())

    # infer_kwargs rebuilds a model whose state_dict loads strictly
    kw = models.infer_kwargs(arch, model.state_dict())
    assert all(type(v) is int for v in kw.values())
    assert kw["num_classes"] == NUM_CLASSES and kw["in_channels"] == in_channels and kw["width"] == WIDTH
    full = dict(num_classes=10, in_channels=3, width=64, image_size=shape[-1])
    full.update(kw)
    models.build(arch, **full).load_state_dict(model.state_dict())

    # masks: non-empty, never on the excluded stem norm
    exclude = models.default_exclude(arch)
    plain_keys = set(model.state_dict())
    sites = nft_fast.attach_masks(model, exclude=exclude)
    assert sites
    assert not {s.name for s in sites} & set(exclude)
    assert all(not hasattr(dict(model.named_modules())[e], "neuron_mask") for e in exclude)
    assert {s.kind for s in sites} == ({"ln"} if arch == "vit" else {"bn"})
    model.zero_grad()
    model(x).sum().backward()
    assert all(s.mask.grad is not None for s in sites)

    # fold random masks into a plain model of the same arch: same eval outputs
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in nft_fast.mask_parameters(model):
            p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)
        model.train()
        model(x)  # running statistics
    model.eval()
    folded = nft_fast.fold_masks(model)
    assert set(folded.state_dict()) == plain_keys
    plain = make(arch, in_channels, shape)
    plain.load_state_dict(folded.state_dict())
    plain.eval()
    with torch.no_grad():
        want, got = model(x), plain(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert (want - make(arch, in_channels, shape).eval()(x)).abs().max() > 0  # weights really moved


@pytest.mark.parametrize("arch", ["preactresnet18", "vit"])
def test_neuron_masks_fold(arch):
    # the nets whose Linear/Conv outputs are not all fed straight into a norm
    torch.manual_seed(0)
    c, shape = INPUTS[arch][0]
    model = make(arch, c, shape, width=4)
    x = torch.randn(2, *shape)
    sites = nft_fast.attach_masks(model, exclude=models.default_exclude(arch), neurons=True, example_input=x)
    assert {"linear", "conv"} & {s.kind for s in sites}
    with torch.no_grad():
        for p in nft_fast.mask_parameters(model):
            p.uniform_(0.1, 1.0)
        model.train()
        model(x)
    model.eval()
    plain = make(arch, c, shape, width=4)
    plain.load_state_dict(nft_fast.fold_masks(model).state_dict())
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(plain.eval()(x), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("arch", ZOO)
def test_width_scales_parameters_quadratically(arch):
    shape = INPUTS[arch][0][1]
    small, big = nparams(make(arch, 1, shape, width=8)), nparams(make(arch, 1, shape, width=16))
    assert 3.0 < big / small < 4.2, (small, big)


@pytest.mark.parametrize("arch", ZOO)
def test_infer_kwargs_round_trips_odd_widths(arch):
    shape = INPUTS[arch][0][1]
    for width in (1, 3, 5, 24, 40):
        m = make(arch, 1, shape, width=width)
        kw = models.infer_kwargs(arch, m.state_dict())
        rebuilt = models.build(arch, **{"image_size": shape[-1], **kw})
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_vit_infers_image_size_and_patch():
    for size, grid in ((28, 7), (32, 8), (40, 2), (64, 4)):
        m = models.build("vit", num_classes=3, in_channels=3, width=4, image_size=size)
        assert m.pos_embed.shape[1] == grid ** 2 + 1
        kw = models.infer_kwargs("vit", m.state_dict())
        models.build("vit", **kw).load_state_dict(m.state_dict())
    assert models.infer_kwargs("vit", {}) == {}


def test_default_exclude_names_the_stem_norm():
    assert models.default_exclude("resnet18") == ("bn1",)
    assert models.default_exclude("preactresnet18") == () and models.default_exclude("vit") == ()
    for arch in ZOO:
        c, shape = INPUTS[arch][0]
        mods = dict(make(arch, c, shape, width=4).named_modules())
        for name in models.default_exclude(arch):
            first_norm = next(n for n, m in mods.items() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)))
            assert name == first_norm


RESNET18_KEYS = {
    "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
    "layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn2.running_var", "layer1.1.conv2.weight",
    "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight", "layer2.0.shortcut.1.running_mean",
    "layer4.1.bn2.bias", "linear.weight", "linear.bias",
}


def test_resnet18_keys_unchanged():
    sd = models.resnet18(10, None, 3, 4).state_dict()
    assert RESNET18_KEYS <= set(sd)
    assert len(sd) == 122  # 20 BNs x 5 + 20 convs + 2 head
    assert not any("downsample" in k or k.startswith("fc.") for k in sd)
    assert "layer1.0.shortcut" in dict(models.resnet18(10, None, 3, 4).named_modules())
    # torchvision-layout variant
    tv = set(models.build("resnet18_imagenet", width=4).state_dict())
    assert {"layer2.0.downsample.0.weight", "layer2.0.downsample.1.weight", "fc.weight"} <= tv
    assert {k.replace("downsample", "shortcut").replace("fc.", "linear.") for k in tv} == set(sd)


def test_reference_resnet18_mask_layout():
    ref = R.ResNet18(num_classes=10)
    masks = R.mask_params(ref)
    assert len(masks) == 19 and sum(m.numel() for m in masks) == 4736
    assert type(ref.bn1) is torch.nn.BatchNorm2d
    sites = nft_fast.attach_masks(models.resnet18(10), exclude=models.default_exclude("resnet18"))
    assert len(sites) == 19 and sum(s.numel for s in sites) == 4736


def test_torchvision_parameter_counts_at_width_64():
    # counts of torchvision's resnet18/resnet50/mobilenet_v2/r3d_18 with a 10-class head
    for arch, n in (("resnet18_imagenet", 11181642), ("resnet50_imagenet", 23528522), ("mobilenetv2", 2236682),
                    ("r3d18", 33171402), ("resnet18", 11173962)):
        with torch.device("meta"):
            assert nparams(models.build(arch, num_classes=10)) == n, arch


def test_r3d18_takes_single_frames_and_vgg_tiny_images():
    m = models.build("r3d18", num_classes=5, in_channels=1, width=4, image_size=28).eval()
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    v = models.build("vgg16_bn", num_classes=5, in_channels=1, width=4, image_size=16).eval()
    assert v(torch.randn(2, 1, 16, 16)).shape == (2, 5)


def test_preact_structure():
    m = models.build("preactresnet18", width=4)
    names = dict(m.named_modules())
    assert "bn1" not in names and "bn" in names and "linear" in names
    assert "layer2.0.shortcut.0" in names and "layer2.0.shortcut.1" not in names and "layer1.0.shortcut" not in names
    assert [n for n in names if n.startswith("layer1.0.")] == ["layer1.0.bn1", "layer1.0.conv1", "layer1.0.bn2", "layer1.0.conv2"]
