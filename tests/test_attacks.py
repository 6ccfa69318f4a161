"""Backdoor attacks: trigger placement, sample selection, labels, determinism, serialisation,
and short real trainings (BadNets reaches a high ASR; InputAware's generator gets trained)."""
import json

import pytest
import torch

from nft_fast import models
from nft_fast.harness.attacks import ATTACKS, Attack, InputAware, attack_from_dict, build_attack, train_backdoored
from nft_fast.harness.datasets import toy_images
from nft_fast.evaluation import evaluate

STATIC = ["badnets", "blend", "sig", "trojan", "wanet"]
DIRTY = ["badnets", "blend", "trojan", "wanet"]
CORNER = {"badnets": 3, "trojan": 4}  # patch side on 28x28


pytestmark = pytest.mark.usefixtures("one_thread")


def images(n=40, c=1, s=28, seed=0, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, s, s, generator=g)
    y = torch.arange(n) % num_classes
    return x, y[torch.randperm(n, generator=g)]


@pytest.fixture(params=[(1, 28), (3, 32)], ids=["1x28", "3x32"])
def data(request):
    c, s = request.param
    return images(40, c, s)


def test_registry_and_errors():
    assert set(ATTACKS) == {"badnets", "blend", "sig", "trojan", "wanet", "inputaware"}
    assert isinstance(build_attack("BadNets"), Attack) and build_attack("input-aware").name == "inputaware"
    with pytest.raises(ValueError, match="known: badnets"):
        build_attack("nope")
    with pytest.raises(ValueError, match="all-to-one"):
        build_attack("sig", all2all=True)
    with pytest.raises(ValueError, match="unknown parameter"):
        build_attack("blend", strength=3)
    with pytest.raises(ValueError, match="target"):
        build_attack("badnets", target=10)
    with pytest.raises(ValueError, match="rate"):
        build_attack("badnets").poison_train(*images(4), rate=1.5)


@pytest.mark.parametrize("name", list(CORNER))
def test_corner_triggers_only_touch_the_corner(name):
    x, _ = images(8)
    out = build_attack(name).apply(x)
    s = CORNER[name]
    inside = torch.zeros(28, 28, dtype=torch.bool)
    inside[-s:, -s:] = True
    assert torch.equal(out[..., ~inside], x[..., ~inside])
    assert (out[..., inside] != x[..., inside]).all()
    if name == "badnets":
        checker = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]])  # 1 where (i + j) is even
        assert torch.allclose(out[..., -3:, -3:], 0.4 * x[..., -3:, -3:] + 0.6 * checker)
    else:  # pasted, not blended: the same patch on every image
        assert torch.equal(out[0, ..., -s:, -s:], out[1, ..., -s:, -s:])
        assert set(out[..., inside].unique().tolist()) <= {0.0, 1.0}
    x3, _ = images(4, 3, 32)
    assert build_attack("trojan").apply(x3)[..., -5:, -5:].shape == (4, 3, 5, 5)  # size ~ H / 7


@pytest.mark.parametrize("name", ["blend", "sig", "wanet"])
def test_global_triggers_stay_in_range(name, data):
    x, _ = data
    x = x.clone()
    x[:2] = x[:2].round()  # exact 0s and 1s: SIG must clip
    out = build_attack(name).apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out != x).float().mean() > 0.5
    if name == "blend":
        noise = build_attack("blend").apply(torch.zeros_like(x)) / 0.2  # the fixed noise image
        assert torch.allclose(out, 0.8 * x + 0.2 * noise, atol=1e-6)
        assert torch.equal(noise[0], noise[1]) and 0 <= noise.min() and noise.max() <= 1 and noise.std() > 0.2
    if name == "sig":
        w = x.shape[-1]
        v = (20 / 255) * torch.sin(2 * torch.pi * torch.arange(w) * 6 / w)
        assert torch.allclose(out, (x + v).clamp(0, 1), atol=1e-6)


@pytest.mark.parametrize("name", STATIC)
def test_apply_is_per_sample_deterministic_and_pure(name, data):
    x, _ = data
    x0 = x.clone()
    atk = build_attack(name, seed=3)
    out = atk.apply(x)
    assert torch.equal(x, x0)
    assert torch.equal(out, build_attack(name, seed=3).apply(x))
    assert torch.equal(out[5:6], atk.apply(x[5:6])) and torch.equal(out[:7], atk.apply(x[:7]))
    other = build_attack(name, seed=4).apply(x)
    assert torch.equal(out, other) == (name in ("badnets", "sig"))


@pytest.mark.parametrize("all2all", [False, True])
@pytest.mark.parametrize("name", DIRTY)
def test_poison_train_dirty_label(name, all2all, data):
    x, y = data
    x0, y0 = x.clone(), y.clone()
    atk = build_attack(name, target=2, all2all=all2all, seed=1)
    xp, yp, flags = atk.poison_train(x, y, rate=0.3)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert flags.dtype == torch.bool and flags.shape == y.shape
    n_cand = len(y) if all2all else int((y != 2).sum())
    assert int(flags.sum()) == round(0.3 * n_cand)
    assert torch.equal(flags, yp != y)
    assert torch.equal(yp[flags], (y[flags] + 1) % 10 if all2all else torch.full_like(y[flags], 2))
    assert torch.equal(xp[flags], atk.apply(x[flags]))
    _, noise = atk.select(y, 0.3)
    clean = ~flags
    clean[noise] = False
    assert torch.equal(xp[clean], x[clean])
    if name == "wanet":  # noise mode: cross_ratio x poisoned, warped with a jittered grid, labels kept
        assert len(noise) == round(2 * int(flags.sum())) and not flags[noise].any()
        assert torch.equal(yp[noise], y[noise])
        assert (xp[noise] != x[noise]).any() and not torch.equal(xp[noise], atk.apply(x[noise]))
    else:
        assert len(noise) == 0
    again = build_attack(name, target=2, all2all=all2all, seed=1).poison_train(x, y, rate=0.3)
    assert all(torch.equal(a, b) for a, b in zip((xp, yp, flags), again))
    other = build_attack(name, target=2, all2all=all2all, seed=2).poison_train(x, y, rate=0.3)[2]
    assert not torch.equal(other, flags)


def test_poison_train_sig_is_clean_label(data):
    x, y = data
    atk = build_attack("sig", target=3)
    assert atk.clean_label
    xp, yp, flags = atk.poison_train(x, y, rate=0.5)
    assert torch.equal(yp, y)
    assert (y[flags] == 3).all() and int(flags.sum()) == round(0.5 * int((y == 3).sum()))
    assert torch.equal(xp[~flags], x[~flags]) and torch.equal(xp[flags], atk.apply(x[flags]))
    assert not build_attack("sig", target=3).poison_train(x, y, rate=0.0)[2].any()


@pytest.mark.parametrize("name", STATIC)
def test_poison_test(name, data):
    x, y = data
    xt, yt, ytg = build_attack(name, target=1).poison_test(x, y)
    keep = y != 1
    assert torch.equal(yt, y[keep]) and (ytg == 1).all() and len(xt) == int(keep.sum())
    assert torch.equal(xt, build_attack(name, target=1).apply(x[keep]))
    if name != "sig":
        xt, yt, ytg = build_attack(name, all2all=True, num_classes=10).poison_test(x, y)
        assert torch.equal(yt, y) and torch.equal(ytg, (y + 1) % 10)


@pytest.mark.parametrize("name", STATIC)
def test_to_dict_round_trip(name, data):
    x, _ = data
    params = {"badnets": {"alpha": 0.5}, "blend": {"alpha": 0.3}, "sig": {"delta": 0.1, "f": 4},
              "trojan": {"size": 5}, "wanet": {"k": 3, "s": 0.7, "cross_ratio": 1.0}}[name]
    atk = build_attack(name, target=4, seed=7, num_classes=8, **params)
    d = json.loads(json.dumps(atk.to_dict()))
    assert d["name"] == name and d["target"] == 4 and d["seed"] == 7 and d["num_classes"] == 8
    assert atk.state_dict() == {}
    back = attack_from_dict(d, atk.state_dict())
    assert type(back) is type(atk) and back.to_dict() == atk.to_dict()
    assert torch.equal(back.apply(x), atk.apply(x))


def tiny_inputaware_run():
    x, y = toy_images(64, num_classes=4, size=12, seed=0)
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=4, in_channels=1, width=4, image_size=12)
    before = [p.detach().clone() for p in model.parameters()]
    atk = build_attack("inputaware", num_classes=4, seed=5, mask_epochs=1, width=8)
    with pytest.raises(RuntimeError, match="not trained"):
        atk.apply(x)
    info = train_backdoored(model, x, y, atk, rate=0.25, epochs=1, batch_size=32, seed=0, progress=False)
    assert info["poisoned"] == 2 * 8 and info["seconds"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return atk, x, y


def test_inputaware_trains_and_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    atk, x, y = tiny_inputaware_run()
    x0 = x.clone()
    pattern, mask = atk.generate(x[:2])
    assert (pattern[0] - pattern[1]).abs().mean() > 1e-3  # input-dependent
    assert 0 <= mask.min() and mask.max() <= 1 and 0 <= pattern.min() and pattern.max() <= 1
    out = atk.apply(x)
    assert torch.equal(x, x0) and out.min() >= 0 and out.max() <= 1 and (out != x).any()
    cross = atk.apply(x[:4], source=x[4:8])
    assert not torch.equal(cross, out[:4])
    xt, yt, ytg = atk.poison_test(x, y)
    assert torch.equal(yt, y[y != 0]) and (ytg == 0).all() and torch.equal(xt, out[y != 0])
    xp, yp, flags = atk.poison_train(x, y, 0.5)
    assert torch.equal(flags, yp != y) and torch.equal(xp[~flags], x[~flags])

    save_file(atk.state_dict(), str(tmp_path / "atk.safetensors"))
    d = json.loads(json.dumps(atk.to_dict()))
    back = attack_from_dict(d, load_file(str(tmp_path / "atk.safetensors")))
    assert isinstance(back, InputAware) and back.to_dict() == atk.to_dict()
    assert torch.equal(back.apply(x), out)
    with pytest.raises(ValueError, match="generator weights"):
        InputAware().load_state_dict({})


def test_badnets_training_reaches_high_asr():
    x, y = toy_images(2000, num_classes=4, size=12, seed=0)
    xt, yt = toy_images(400, num_classes=4, size=12, seed=2)
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=4, in_channels=1, width=8, image_size=12)
    atk = build_attack("badnets", target=0, num_classes=4)
    info = train_backdoored(model, x, y, atk, rate=0.2, epochs=3, batch_size=32, lr=0.05, seed=0, progress=False)
    assert info["poisoned"] == round(0.2 * int((y != 0).sum()))
    xp, yp, ytg = atk.poison_test(xt, yt)
    res = evaluate(model, [(xt, yt)], [(xp, yp, ytg)])
    assert res["acc"] > 0.9 and res["asr"] > 0.8, res


def test_patch_attacks_stamp_every_frame_of_a_clip():
    from nft_fast.harness.attacks import BadNets, Blend, Trojan

    x = torch.rand(3, 1, 5, 12, 12)
    for cls in (BadNets, Trojan):
        a = cls(target=0, num_classes=4)
        xt = a.apply(x)
        frames = [a.apply(x[:, :, t]) for t in range(5)]  # the image trigger, frame by frame
        assert all(torch.equal(xt[:, :, t], f) for t, f in enumerate(frames))
        assert not torch.equal(xt, x)
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\), got shape"):
        Blend(target=0, num_classes=4).apply(x)
