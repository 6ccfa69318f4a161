"""Baseline defenses: fine-tuning (+MixUp), ANP, NFT ablations and the run_defense dispatch."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import nets
import nft_fast
from nft_fast.harness import baselines as B
from nft_fast.harness import datasets as D
from nft_fast import models


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return models.build("resnet18", num_classes=4, in_channels=1, width=4, image_size=12)


def toy_set(n=48, seed=0):
    x, y = D.toy_images(n, num_classes=4, size=12, seed=seed)
    return TensorDataset(x, y)


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def flat_params(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


# --- fine-tuning ------------------------------------------------------------------------

def test_finetune_trains_a_copy_and_records_rounds():
    model, ds = tiny_model(), toy_set()
    orig = copy.deepcopy(model)
    seen = []
    res = B.finetune(model, ds, steps=6, rounds=3, batch_size=16, lr=0.05, progress=False,
                     evaluate_fn=lambda m: (seen.append(m.training), {"acc": 0.25})[1])
    assert isinstance(res, nft_fast.PurifyResult)
    assert state_equal(model, orig)  # the caller's model is untouched
    assert not torch.equal(flat_params(res.model), flat_params(orig))
    assert [h["round"] for h in res.history] == [1, 2, 3] and [h["steps"] for h in res.history] == [2, 2, 2]
    lrs = [h["lr"] for h in res.history]
    assert lrs[0] == pytest.approx(0.05) and lrs[0] > lrs[1] > lrs[2] > 0  # cosine over the steps
    assert all(h["acc"] == 0.25 and h["loss"] > 0 for h in res.history) and seen == [True] * 3
    assert res.samples_per_class == pytest.approx(12.0)
    assert res.model.bn1.num_batches_tracked.item() == 6  # BN in train mode
    assert not nft_fast.mask_parameters(res.model) and res.model.training == model.training
    tiny_model(1).load_state_dict(res.model.state_dict())  # plain architecture


def test_finetune_mixup_differs_and_both_are_seeded():
    model, ds = tiny_model(), toy_set()
    kw = dict(steps=3, rounds=1, batch_size=16, progress=False)
    ft = [flat_params(B.finetune(model, ds, **kw).model) for _ in range(2)]
    mix = [flat_params(B.finetune(model, ds, mixup_alpha=1.0, **kw).model) for _ in range(2)]
    other = flat_params(B.finetune(model, ds, seed=1, **kw).model)
    assert torch.equal(ft[0], ft[1]) and torch.equal(mix[0], mix[1])
    assert not torch.equal(ft[0], mix[0]) and not torch.equal(ft[0], other)


def test_finetune_dataloader_is_restarted_and_global_rng_untouched():
    model, ds = tiny_model(), toy_set(n=20)
    loader = DataLoader(ds, batch_size=8)  # 3 batches per pass
    state = torch.get_rng_state()
    res = B.finetune(model, loader, steps=7, rounds=2, progress=False)
    assert [h["steps"] for h in res.history] == [3, 4]
    assert torch.equal(torch.get_rng_state(), state)


def test_finetune_folds_a_masked_input_and_validates():
    model, ds = tiny_model(), toy_set()
    nft_fast.attach_masks(model)
    res = B.finetune(model, ds, steps=1, rounds=1, batch_size=8, progress=False)
    assert not nft_fast.mask_parameters(res.model) and nft_fast.mask_parameters(model)
    with pytest.raises(ValueError, match="steps"):
        B.finetune(model, ds, steps=0)
    with pytest.raises(ValueError, match="empty"):
        B.finetune(model, TensorDataset(torch.zeros(0, 1, 12, 12), torch.zeros(0, dtype=torch.long)))


# --- ANP --------------------------------------------------------------------------------

def test_anp_perturbed_forward_is_the_official_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        net[1].bias.uniform_(-1, 1)
    ref = copy.deepcopy(net).train()
    nft_fast.attach_masks(net)
    tr = B.ANPTrainer(net, eps=0.4, seed=0)
    with torch.no_grad():
        net[1].neuron_mask.copy_(torch.tensor([1.0, 0.5, 0.2]))
    tr.reset_noise(rand_init=True)
    dw, db = tr.noise_w[0].detach(), tr.noise_b[0].detach()
    assert (dw.abs() <= 0.4).all() and (db.abs() <= 0.4).all() and (dw != 0).all()
    x = torch.randn(5, 1, 6, 6)
    h = ref[0](x)
    bn = ref[1]
    y = F.batch_norm(h, None, None, bn.weight * (net[1].neuron_mask + dw), bn.bias * (1 + db), True, 0.1, bn.eps)
    expect = ref[4](ref[3](ref[2](y)))
    torch.testing.assert_close(tr.forward(x, perturbed=True), expect)
    y_nat = F.batch_norm(h, None, None, bn.weight * net[1].neuron_mask, bn.bias, True, 0.1, bn.eps)
    torch.testing.assert_close(tr.forward(x), ref[4](ref[3](ref[2](y_nat))))


def test_anp_noise_ascent_and_masks_in_unit_interval():
    model, ds = tiny_model(), toy_set()
    x, y = ds.tensors[0][:32], ds.tensors[1][:32]
    nft_fast.attach_masks(model)
    tr = B.ANPTrainer(model, eps=0.4, mask_lr=5.0, seed=0)
    tr.reset_noise(rand_init=True)
    init = [t.detach().clone() for t in tr._noises()]
    loss_nat = F.cross_entropy(tr.forward(x), y)
    loss_rand = F.cross_entropy(tr.forward(x, perturbed=True), y)
    assert not torch.isclose(loss_nat, loss_rand)  # the perturbation changes the forward
    tr.gen.manual_seed(0)
    tr.attack(x, y)
    moved = [t.detach() - i for t, i in zip(tr._noises(), init)]
    # one signed ascent step of size eps / pgd_steps from the random start, not clipped (official)
    assert all((((d.abs() - 0.4).abs() < 1e-6) | (d == 0)).all() for d in moved)
    assert F.cross_entropy(tr.forward(x, perturbed=True), y) > loss_nat
    for _ in range(3):
        info = tr.step(x, y)
    assert info["loss"] == pytest.approx(0.2 * info["loss_nat"] + 0.8 * info["loss_rob"], rel=1e-5)
    masks = torch.cat([m.detach().flatten() for m in tr.masks])
    assert masks.min() >= 0 and masks.max() <= 1 and (masks < 1).any()
    assert len(tr.masks) == 20  # every BN, the stem's too (ANP masks all of them)
    clipped = B.ANPTrainer(copy.deepcopy(model), eps=0.4, clip_noise=True)
    clipped.attack(x, y)
    assert all((t.abs() <= 0.4 + 1e-6).all() for t in clipped._noises())


def test_anp_prunes_exactly_the_low_masks_of_the_original_model():
    model, ds = tiny_model(), toy_set()
    model.eval()
    orig = copy.deepcopy(model)
    res = B.anp(model, ds, iters=6, batch_size=16, mask_lr=2.0, threshold=0.3, log_every=3, progress=False,
                evaluate_fn=lambda m: {"acc": 0.5})
    assert isinstance(res, nft_fast.PurifyResult) and isinstance(res, B.ANPResult)
    assert state_equal(model, orig)  # input untouched
    assert [h.get("iter") for h in res.history[:2]] == [3, 6]
    last = res.history[-1]
    assert last["stage"] == "prune" and last["threshold"] == 0.3 and last["acc"] == 0.5
    assert last["num_neurons"] == sum(v.numel() for v in res.mask_values.values())
    assert 0 < last["pruned"] < last["num_neurons"]
    pruned = dict(res.model.named_modules())
    n = 0
    for name, m in res.mask_values.items():
        assert m.min() >= 0 and m.max() <= 1
        low = m <= 0.3
        g, g0 = pruned[name].weight, orig.get_submodule(name).weight
        assert (g[low] == 0).all() and torch.equal(g[~low], g0[~low])
        n += int(low.sum())
    assert n == last["pruned"]
    # everything but the pruned gammas is the original: weights, biases, running statistics
    so, sp = orig.state_dict(), res.model.state_dict()
    for k in so:
        if not (k.endswith(".weight") and k.rsplit(".", 1)[0] in res.mask_values):
            assert torch.equal(so[k], sp[k]), k
    assert not nft_fast.mask_parameters(res.model) and not res.model.training
    tiny_model(1).load_state_dict(res.model.state_dict())
    # other thresholds from the same masks, without re-optimising
    for th in (0.2, 0.3, 0.5):
        a, b = res.prune(th), B.anp_prune(model, res.mask_values, th)
        assert state_equal(a, b)
    assert state_equal(res.prune(0.3), res.model)
    k = 5
    by_k = res.prune(prune_by="number", prune_k=k)
    flat = torch.cat([v.flatten() for v in res.mask_values.values()])
    zeroed = torch.cat([(by_k.get_submodule(nm).weight == 0).flatten() for nm in res.mask_values])
    assert int(zeroed.sum()) == k and flat[zeroed].max() <= flat[~zeroed].min()


def test_anp_is_seeded_and_validates():
    model, ds = tiny_model(), toy_set()
    kw = dict(iters=2, batch_size=8, progress=False)
    a, b, c = B.anp(model, ds, **kw), B.anp(model, ds, **kw), B.anp(model, ds, seed=1, **kw)
    fa, fb, fc = (torch.cat([v.flatten() for v in r.mask_values.values()]) for r in (a, b, c))
    assert torch.equal(fa, fb) and not torch.equal(fa, fc)
    ex = B.anp(model, DataLoader(ds, batch_size=8), exclude=("bn1",), **kw)
    assert "bn1" not in ex.mask_values and len(ex.mask_values) == 19
    with pytest.raises(ValueError, match="prune_by"):
        B.anp(model, ds, prune_by="percent", **kw)
    with pytest.raises(ValueError, match="prune_k"):
        B.anp(model, ds, prune_by="number", **kw)
    with pytest.raises(ValueError, match="norm"):
        B.anp(models.build("mlp", 4, 1, 4, 12), ds, **kw)


def test_anp_lowers_the_attack_success_rate_of_a_real_backdoor():
    model, (xc, yc), test, poison = nets.toy_backdoor()
    before = nft_fast.evaluate(model, test, poison, target=0)
    assert before["asr"] > 0.5, before  # the backdoor is there
    res = B.anp(model, TensorDataset(xc, yc), iters=50, batch_size=32, threshold=0.2, progress=False,
                evaluate_fn=lambda m: nft_fast.evaluate(m, test, poison, target=0))
    after = res.history[-1]
    assert after["asr"] < before["asr"], (before, after)
    assert after["acc"] > 0.5, after


# --- NFT ablations and dispatch -----------------------------------------------------------

def test_ablation_configs():
    strong = nft_fast.NFTConfig.preset("strong")
    assert {k: B.NFT_ABLATIONS[k] for k in ("nft", "nft_no_mixup", "nft_no_reg", "nft_no_floor")} == {
        "nft": {}, "nft_no_mixup": {"mixup_alpha": 0.0}, "nft_no_reg": {"reg_coef": 0.0},
        "nft_no_floor": {"floor_alpha": 0.0}}
    assert nft_fast.NFTConfig().replace(**B.NFT_ABLATIONS["nft_strong"]) == strong
    base = nft_fast.NFTConfig()
    cfgs = {k: base.replace(**v) for k, v in B.NFT_ABLATIONS.items()}  # all pass NFTConfig validation
    assert cfgs["nft"] == base
    assert all(cfgs["nft_no_floor"].floor(l) == 0 for l in (1, 2, 19))
    model = tiny_model()
    nft_fast.attach_masks(model)
    p = nft_fast.Purifier(model, cfgs["nft_no_mixup"])
    assert all(p.draw(8)[0] == 1.0 for _ in range(3))  # lam = 1: plain cross-entropy


def test_no_floor_masks_go_below_the_default_floor():
    model, ds = tiny_model(), toy_set()
    cfg = nft_fast.NFTConfig(steps=4, rounds=1, batch_size=16, lr=20.0, eta_min=0.0)
    floors = torch.cat([torch.full((m.numel,), cfg.floor(l)) for l, m in
                        enumerate(nft_fast.attach_masks(copy.deepcopy(model), exclude=("bn1",)), 1)])

    def flat(res):
        return torch.cat([m.detach().flatten() for m in nft_fast.mask_parameters(res.model)])

    kw = dict(exclude=("bn1",), progress=False)
    m_nft = flat(B.run_defense("nft", model, ds, cfg, **kw))
    m_nofloor = flat(B.run_defense("nft_no_floor", model, ds, cfg, **kw))
    assert (m_nft >= floors - 1e-6).all()
    assert (m_nofloor < floors - 1e-3).any() and m_nofloor.min() >= 0


def test_run_defense_every_name_and_unknown():
    model, ds = tiny_model(), toy_set(n=16)
    orig = copy.deepcopy(model)
    cfg = nft_fast.NFTConfig(steps=2, rounds=1, batch_size=8)
    small = {"ft": dict(steps=2, rounds=1, batch_size=8), "ft_mixup": dict(steps=2, rounds=1, batch_size=8),
             "anp": dict(iters=2, batch_size=8)}
    assert set(B.DEFENSES) == {"none", "ft", "ft_mixup", "anp", *B.NFT_ABLATIONS}
    outs = {}
    for name in B.DEFENSES:
        res = B.run_defense(name, model, ds, cfg, progress=False, **small.get(name, {}))
        assert isinstance(res, nft_fast.PurifyResult), name
        tiny_model(1).load_state_dict(res.folded().state_dict())
        outs[name] = flat_params(res.folded())
    assert state_equal(model, orig)
    none = B.run_defense("none", model, ds)
    assert none.history == [] and none.model is not model and state_equal(none.model, model)
    assert not torch.equal(outs["ft"], outs["ft_mixup"])
    seeded = [B.run_defense("nft", model, ds, cfg, seed=s, progress=False).model for s in (0, 0, 1)]
    assert state_equal(seeded[0], seeded[1]) and not state_equal(seeded[0], seeded[2])
    with pytest.raises(ValueError, match="unknown defense 'fp'.*ft_mixup.*anp.*nft_no_floor"):
        B.run_defense("fp", model, ds)
