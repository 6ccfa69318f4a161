"""Class-agnostic feature-space trigger inversion (nft_fast.inversion) and its use in purify
(NFTConfig.trigger_kind="feature"). Tiny models and step counts: the whole file is fast."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from tests.helpers import nets
import nft_fast
from nft_fast import inversion as I
from nft_fast.config import PRESETS

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(steps=3, identity_steps=3, mask_steps=10, batch_size=16)


def image_case(n=24, seed=0):
    torch.manual_seed(seed)
    model = nets.user_sequential(num_classes=4)  # 12x12, one channel, Linear head
    g = torch.Generator().manual_seed(seed)
    return model, torch.rand(n, 1, 12, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def clip_case(n=6, seed=0):
    torch.manual_seed(seed)
    model = nets.Video3D(num_classes=4, width=4)
    g = torch.Generator().manual_seed(seed)
    return model, torch.rand(n, 3, 4, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("case", [image_case, clip_case], ids=["image", "clip"])
def test_shapes_2d_and_3d(case):
    model, x, y = case()
    head = I.split_classifier(model, x)
    f, out = I.features(model.eval(), x, head)
    assert f.shape == (x.shape[0], head.in_features) and out.shape == (x.shape[0], 4)
    trig = I.invert(model, x, y, **FAST)
    conv = nn.Conv2d if x.dim() == 4 else nn.Conv3d
    assert any(isinstance(m, conv) for m in trig.generator.modules())
    xg = trig.apply(x)
    assert xg.shape == x.shape and xg.dtype == x.dtype
    assert trig.mask.shape == (head.in_features,) and ((trig.mask > 0) & (trig.mask < 1)).all()
    assert trig.target is None and 0 <= trig.success <= 1
    s = I.flip_summary(model, x, trig)
    assert set(s) == {"inversion_flip_rate", "inversion_suspect", "inversion_concentration",
                      "inversion_target_rate", "inversion_distance"}
    assert abs(s["inversion_distance"] - trig.norm) < 1e-5


def test_odd_spatial_size_and_bound():
    g = I.Generator(2, 2, width=4, lo=0.0, hi=1.0, bound=0.05)
    with torch.no_grad():
        g.out.weight.mul_(100)  # a large raw delta: the projection must cap it
        x = torch.rand(5, 2, 7, 9)
        d = g.delta(x)
    assert d.shape == x.shape
    assert (d.flatten(1).pow(2).mean(1).sqrt() <= 0.05 + 1e-6).all()
    assert ((g(x) >= 0) & (g(x) <= 1)).all()
    with pytest.raises(ValueError, match="dims"):
        I.Generator(1, 1)


def test_deterministic_given_seed():
    model, x, y = image_case()
    a = I.invert(model, x, y, seed=3, **FAST)
    b = I.invert(model, x, y, seed=3, **FAST)
    c = I.invert(model, x, y, seed=4, **FAST)
    assert state_equal(a.generator, b.generator) and torch.equal(a.mask, b.mask)
    assert not state_equal(a.generator, c.generator)
    torch.manual_seed(11)
    r0 = torch.rand(3)
    torch.manual_seed(11)
    I.invert(model, x, y, seed=3, **FAST)
    assert torch.equal(torch.rand(3), r0)  # the caller's global RNG stream is untouched


def test_generator_starts_near_identity():
    model, x, y = image_case()
    torch.manual_seed(0)
    g = I.Generator(1, 2, width=8)
    with torch.no_grad():
        raw = (g(x) - x).abs().max()
    assert raw < 0.1  # scaled-down output layer
    trig = I.invert(model, x, y, **dict(FAST, steps=0, identity_steps=30))  # identity training only
    assert trig.norm < 0.01
    assert (trig.apply(x) - x).abs().max() < raw


def test_model_untouched_and_mode_restored():
    model, x, y = image_case()
    model.train()
    model[0].weight.requires_grad_(False)
    before = copy.deepcopy(model)
    req = [p.requires_grad for p in model.parameters()]
    trig = I.invert(model, x, y, **FAST)
    I.refresh(model, x, y, trig, steps=2, mask_steps=5, batch_size=16)
    I.flip_summary(model, x, trig)
    assert model.training and state_equal(model, before)  # BN running stats included
    assert [p.requires_grad for p in model.parameters()] == req
    model.eval()
    I.invert(model, x, y, **FAST)
    assert not model.training


def test_refresh_warm_starts_without_touching_the_old_trigger():
    model, x, y = image_case()
    trig = I.invert(model, x, y, **FAST)
    snap = copy.deepcopy(trig.generator.state_dict())
    new = I.refresh(model, x, y, trig, steps=3, mask_steps=5, batch_size=16)
    assert all(torch.equal(v, trig.generator.state_dict()[k]) for k, v in snap.items())
    assert not state_equal(new.generator, trig.generator)
    assert new.generator.bound == trig.generator.bound


def test_feature_mask_keeps_the_class_evidence():
    # features 0-3 carry the label (one-hot), 4-7 are noise the head barely uses
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    feats = torch.cat([3 * F.one_hot(y, 4).float(), torch.rand(200, 4, generator=g)], 1)
    head = nn.Linear(8, 4)
    with torch.no_grad():
        head.weight.copy_(torch.cat([2 * torch.eye(4), 0.3 * torch.randn(4, 4, generator=g)], 1))
        head.bias.zero_()
    w0 = head.weight.clone()
    m = I.feature_mask(head, feats, y, steps=200)
    assert m[:4].min() > 0.5 and m[4:].max() < 0.5, m
    pos = F.cross_entropy(head(m * feats), y)
    neg = F.cross_entropy(head((1 - m) * feats), y)
    assert pos < 0.1 < 1.0 < neg
    assert torch.equal(head.weight, w0)


def test_clear_error_without_a_final_linear():
    no_linear = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="no nn.Linear"):
        I.split_classifier(no_linear)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="no nn.Linear"):
        I.invert(no_linear, x, y, **FAST)
    after_head = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Tanh())  # output is not the Linear's
    with pytest.raises(ValueError, match="last nn.Linear's output"):
        I.split_classifier(after_head, x)
    with pytest.raises(ValueError, match="images"):
        I.invert(after_head, torch.rand(4, 64), y)


OLD_DEFAULTS = {  # NFTConfig() before trigger_kind existed: the reference settings
    "steps": 1000, "rounds": 5, "batch_size": 128, "lr": 0.05, "momentum": 0.95, "eta_min": 0.02,
    "mixup_alpha": 1.0, "reg_coef": 1e-3, "floor_alpha": 0.8, "floor_beta": 0.5, "seed": 0,
    "precision": "fp32", "channels_last": None, "adv_eps": 0.0, "adv_steps": 1, "adv_weight": 1.0,
    "trigger_weight": 0.0, "trigger_top": 1, "trigger_steps": 150, "trigger_l1": 0.01, "trigger_refresh": True,
    "trigger_blend": 0.0, "trigger_min_anomaly": 0.0, "bn_recalibrate": False, "reg_per_class": True,
    "cuda_graph": False,
}
NEW_DEFAULTS = {"trigger_kind": "patch", "inversion_steps": 800, "inversion_eps": 0.07, "inversion_mask_norm": 2.0}


def test_config_defaults_and_presets_unchanged():
    d = nft_fast.NFTConfig().to_dict()
    assert {k: d[k] for k in OLD_DEFAULTS} == OLD_DEFAULTS
    assert {k: d[k] for k in NEW_DEFAULTS} == NEW_DEFAULTS
    for name in ("reference", "strong", "auto"):
        assert "trigger_kind" not in PRESETS[name]
        assert nft_fast.NFTConfig.preset(name).trigger_kind == "patch"
    with pytest.raises(ValueError, match="trigger_kind"):
        nft_fast.NFTConfig(trigger_kind="pixel")
    with pytest.raises(ValueError, match="inversion_eps"):
        nft_fast.NFTConfig(inversion_eps=0.0)
    from nft_fast.harness.baselines import NFT_ABLATIONS
    feat = nft_fast.NFTConfig().replace(**NFT_ABLATIONS["nft_feature"])
    assert feat == nft_fast.NFTConfig.preset("strong", trigger_kind="feature")


def test_purify_with_feature_trigger():
    model, x, y = image_case(n=32)
    before = copy.deepcopy(model)
    cfg = nft_fast.NFTConfig(steps=4, rounds=2, batch_size=16, trigger_weight=1.0, trigger_kind="feature",
                             inversion_steps=3, bn_recalibrate=True)
    res = nft_fast.purify(model, TensorDataset(x, y), cfg, progress=False)
    assert state_equal(model, before)  # purify works on a copy
    h = res.history
    assert len(h) == 2 and h[0]["scan"]["trigger_unlearning"]
    assert {"inversion_flip_rate", "inversion_concentration", "trigger_seconds"} <= set(h[0]["scan"])
    assert "inversion_flip_rate" in h[-1]["inversion_after"]
    assert all("trigger_norm" in e for e in h)
    again = nft_fast.purify(model, TensorDataset(x, y), cfg, progress=False)
    assert torch.equal(torch.cat([m.flatten() for m in res.masks().values()]),
                       torch.cat([m.flatten() for m in again.masks().values()]))


def test_purifier_step_unlearns_the_whole_batch():
    model, x, y = image_case(n=16)
    nft_fast.attach_masks(model)
    p = nft_fast.Purifier(model, nft_fast.NFTConfig(steps=2, rounds=1, trigger_weight=1.0, trigger_kind="feature"))
    trig = I.invert(model, x, y, **FAST)
    seen = []
    orig = trig.apply
    trig.apply = lambda xb: (seen.append(xb.shape[0]), orig(xb))[1]
    p.triggers = [trig]
    info = p.step(x, y)
    assert seen == [16] and "trigger_loss" in info  # no class is left out
