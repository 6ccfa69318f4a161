"""attach_masks / mask_parameters / fold_masks on the kinds of models users bring."""
import copy

import pytest
import torch
import torch.nn as nn

import nft_fast
from nft_fast import reference as R
from nft_fast.masks import MaskedBatchNorm2d, MaskedLinear

from tests.helpers import nets

CASES = {
    "tv_resnet": (lambda: nets.TVResNet(), lambda: torch.randn(4, 3, 32, 32)),
    "video3d": (lambda: nets.Video3D(), lambda: torch.randn(3, 3, 4, 8, 8)),
    "vit": (lambda: nets.TinyViT(), lambda: torch.randn(3, 3, 16, 16)),
    "sequential": (lambda: nets.user_sequential(), lambda: torch.randn(5, 1, 12, 12)),
}


def randomise_masks(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in nft_fast.mask_parameters(model):
            m.copy_(torch.rand(m.shape, generator=g) * 0.9 + 0.1)


def warm_stats(model, x):
    model.train()
    with torch.no_grad():
        model(x)  # non-trivial running statistics
    model.eval()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("neurons", [False, True])
def test_fold_equals_masked_and_loads_into_original_class(case, neurons):
    build, data = CASES[case]
    torch.manual_seed(0)
    model, x = build(), data()
    original_keys = set(model.state_dict())
    sites = nft_fast.attach_masks(model, neurons=neurons)
    assert sites and [s.layer for s in sites] == list(range(1, len(sites) + 1))
    assert all(p.requires_grad == n.endswith("neuron_mask") for n, p in model.named_parameters())
    randomise_masks(model)
    warm_stats(model, x)
    before = copy.deepcopy(model.state_dict())
    folded = nft_fast.fold_masks(model)
    assert not nft_fast.mask_parameters(folded)
    for k, v in model.state_dict().items():  # the masked model is untouched
        assert torch.equal(v, before[k]), k
    plain = build()
    plain.load_state_dict(folded.state_dict())  # strict: the original class takes it
    assert set(folded.state_dict()) == original_keys
    plain.eval()
    with torch.no_grad():
        want, got = model(x), plain(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    assert (want - build().eval()(x)).abs().max() > 1e-3  # the masks really changed the function


def test_resnet_sites_and_exclude_is_exact_name():
    model = nets.TVResNet()
    sites = nft_fast.attach_masks(model, exclude=("bn1",))
    names = [s.name for s in sites]
    assert "bn1" not in names and "layer1.0.bn1" in names and "layer2.0.downsample.1" in names
    assert all(s.kind == "bn" for s in sites)
    assert [p is s.mask for p, s in zip(nft_fast.mask_parameters(model), sites)] == [True] * len(sites)
    assert isinstance(model.layer1[0].bn1, MaskedBatchNorm2d) and isinstance(model.layer1[0].bn1, nn.BatchNorm2d)


def test_exclude_glob_and_unknown_name():
    model = nets.TVResNet()
    sites = nft_fast.attach_masks(model, exclude=("bn1", "layer2.*"))
    assert all(s.name.startswith("layer1") for s in sites)
    with pytest.raises(ValueError, match="does not exist: 'layer9.bn'"):
        nft_fast.attach_masks(nets.TVResNet(), exclude=("layer9.bn",))


def test_neuron_masks_skip_layers_fed_into_a_norm_and_the_head():
    model = nets.user_sequential()
    sites = nft_fast.attach_masks(model, neurons=True)
    by_name = {s.name: s.kind for s in sites}
    # 0: conv -> BN (skipped), 1: BN, 3: conv -> ReLU (masked), 6: linear -> BN1d (skipped),
    # 7: BN1d, 9: linear (masked), 11: the head (skipped by default)
    assert by_name == {"1": "bn", "3": "conv", "7": "bn", "9": "linear"}
    assert isinstance(model[9], MaskedLinear)
    model2 = nets.user_sequential()
    sites2 = nft_fast.attach_masks(model2, neurons=True, mask_head=True, example_input=torch.randn(2, 1, 12, 12))
    assert {s.name for s in sites2} == {"1", "3", "7", "9", "11"}


def test_traced_detection_on_vit():
    model = nets.TinyViT()
    sites = nft_fast.attach_masks(model, neurons=True, example_input=torch.randn(2, 3, 16, 16))
    names = {s.name for s in sites}
    assert "blocks.0.attn.qkv" in names and "blocks.0.mlp.0" in names and "head" not in names
    assert "blocks.0.norm1" in names and "norm" in names


def test_attach_is_idempotent_and_keeps_reference_masks():
    model = nets.TVResNet()
    a = nft_fast.attach_masks(model)
    b = nft_fast.attach_masks(model)
    assert [s.name for s in a] == [s.name for s in b] and all(x.mask is y.mask for x, y in zip(a, b))
    ref = R.ResNet18(num_classes=10, width=4)
    sites = nft_fast.attach_masks(ref, exclude=("bn1",))
    assert len(sites) == 19 and all(isinstance(s.module, R.Masked_BN2d) for s in sites)


def test_fold_reference_model_into_plain_resnet():
    from nft_fast.models import resnet18

    torch.manual_seed(0)
    ref = R.ResNet18(num_classes=10, width=4)
    randomise_masks(ref)
    x = torch.randn(4, 3, 32, 32)
    warm_stats(ref, x)
    folded = nft_fast.fold_masks(ref)
    plain = resnet18(10, None, 3, 4)
    plain.load_state_dict(folded.state_dict())
    plain.eval()
    torch.testing.assert_close(plain(x), ref(x), rtol=1e-6, atol=1e-6)
    assert type(folded.layer1[0].bn1) is nn.BatchNorm2d


def test_non_affine_norms_are_not_masked():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(16, 2))
    assert nft_fast.attach_masks(model) == []
    lazy = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match="lazy"):
        nft_fast.attach_masks(lazy)


def test_purifier_rejects_a_model_without_masks():
    with pytest.raises(ValueError, match="nothing to mask"):
        nft_fast.Purifier(nets.TVResNet(), samples_per_class=5)
