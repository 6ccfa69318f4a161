"""The purify loop, evaluation, and the demo's building blocks."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import nft_fast
from nft_fast import data as D
from nft_fast.models import resnet18


def small_setup(n=40, classes=4, size=12):
    torch.manual_seed(0)
    model = resnet18(classes, None, 1, 4)
    x = torch.rand(n, 1, size, size)
    y = torch.arange(n) % classes
    return model, TensorDataset(x, y)


def test_purify_dataset_history_and_input_untouched():
    model, ds = small_setup()
    orig = copy.deepcopy(model.state_dict())
    cfg = nft_fast.NFTConfig(steps=6, rounds=3, batch_size=8, lr=0.5)
    seen = []
    res = nft_fast.purify(model, ds, cfg, exclude=("bn1",), progress=False,
                          evaluate_fn=lambda m: (seen.append(m.training), {"acc": 0.5})[1])
    assert [h["round"] for h in res.history] == [1, 2, 3]
    assert [h["steps"] for h in res.history] == [2, 2, 2]
    assert [h["lr"] for h in res.history] == pytest.approx([cfg.round_lr(r) for r in range(3)])
    assert all(h["acc"] == 0.5 for h in res.history) and seen == [True] * 3
    assert res.samples_per_class == pytest.approx(10.0)
    assert all(torch.equal(v, orig[k]) for k, v in model.state_dict().items())  # copied, not modified
    assert not nft_fast.mask_parameters(model)
    masks = nft_fast.mask_parameters(res.model)
    assert len(masks) == 19 and any((m < 1).any() for m in masks)
    for l, m in enumerate(masks, 1):
        assert (m >= cfg.floor(l) - 1e-7).all() and (m <= 1).all()
    assert res.model.bn1.num_batches_tracked.item() == 6  # BN statistics update every step
    plain = res.folded()
    fresh = resnet18(4, None, 1, 4)
    fresh.load_state_dict(plain.state_dict())


def test_purify_records_evaluation_per_round():
    model, ds = small_setup()
    loader = DataLoader(ds, batch_size=16)
    poison = DataLoader(TensorDataset(ds.tensors[0], ds.tensors[1]), batch_size=16)
    res = nft_fast.purify(model, ds, nft_fast.NFTConfig(steps=4, rounds=2, batch_size=8), progress=False,
                          test_loader=loader, poison_loader=poison, target=0)
    for h in res.history:
        assert 0 <= h["acc"] <= 1 and 0 <= h["asr"] <= 1 and 0 <= h["ra"] <= 1 and h["n_clean"] == 40
    assert res.history[-1]["acc"] == pytest.approx(nft_fast.evaluate(res.model, loader)["acc"])


def test_purify_is_seeded_and_inplace_option():
    model, ds = small_setup()
    cfg = nft_fast.NFTConfig(steps=4, rounds=2, batch_size=8)
    a = nft_fast.purify(model, ds, cfg, progress=False)
    b = nft_fast.purify(model, ds, cfg, progress=False)
    c = nft_fast.purify(model, ds, cfg.replace(seed=1), progress=False)
    fa, fb, fc = (torch.cat([m.detach().flatten() for m in nft_fast.mask_parameters(r.model)]) for r in (a, b, c))
    assert torch.equal(fa, fb) and not torch.equal(fa, fc)
    r = nft_fast.purify(model, ds, cfg, inplace=True, progress=False)
    assert r.model is model and nft_fast.mask_parameters(model)


def test_purify_with_dataloader_restarts_it():
    model, ds = small_setup(n=12)
    loader = DataLoader(ds, batch_size=8)  # 2 batches per pass, 5 steps per round
    res = nft_fast.purify(model, loader, nft_fast.NFTConfig(steps=10, rounds=2, batch_size=8), progress=False)
    assert [h["steps"] for h in res.history] == [5, 5]
    assert res.samples_per_class == pytest.approx(3.0)


def test_purify_errors():
    model, _ = small_setup()
    with pytest.raises(ValueError, match="empty"):
        nft_fast.purify(model, TensorDataset(torch.zeros(0, 1, 12, 12), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="multiple of rounds"):
        nft_fast.NFTConfig(steps=7, rounds=5)
    with pytest.raises(ValueError, match="precision"):
        nft_fast.NFTConfig(precision="fp8")
    with pytest.raises(ValueError, match="samples_per_class"):
        m = copy.deepcopy(model)
        nft_fast.attach_masks(m)
        nft_fast.Purifier(m, samples_per_class=0)


def test_step_rejects_nan_inputs():
    model, ds = small_setup()
    nft_fast.attach_masks(model)
    p = nft_fast.Purifier(model, samples_per_class=10)
    x = ds.tensors[0][:8].clone()
    x[0, 0, 0, 0] = float("nan")
    masks = p.flat_masks()
    with pytest.raises(ValueError, match="NaN/inf"):  # refused before the step changes anything
        p.step(x, ds.tensors[1][:8], lam=0.5, perm=torch.arange(8))
    assert torch.equal(p.flat_masks(), masks) and p.steps_done == 0


def test_bf16_step_runs_and_tracks_fp32():
    model, ds = small_setup()
    nft_fast.attach_masks(model, exclude=("bn1",))
    twin = copy.deepcopy(model)
    x, y = ds.tensors[0][:16], ds.tensors[1][:16]
    p32 = nft_fast.Purifier(model, nft_fast.NFTConfig(), samples_per_class=10)
    p16 = nft_fast.Purifier(twin, nft_fast.NFTConfig(precision="bf16"), samples_per_class=10)
    i32 = p32.step(x, y, lam=0.4, perm=torch.arange(16).flip(0))
    i16 = p16.step(x, y, lam=0.4, perm=torch.arange(16).flip(0))
    assert i16["loss"] == pytest.approx(i32["loss"], rel=0.05)
    g32, g16 = p32._grad, p16._grad
    # bf16 keeps 8 mantissa bits: on this tiny random net the mask gradient agrees in direction (~0.89).
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.8


def test_evaluate_counts_acc_asr_ra():
    class Fixed(torch.nn.Module):
        """Predicts class 0 for inputs whose first pixel is 1, else the label stored in pixel 2."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            pred = torch.where(x[:, 0] > 0.5, torch.zeros_like(x[:, 1]), x[:, 1]).long()
            return torch.nn.functional.one_hot(pred, 3).float() + 0 * self.w

    clean = TensorDataset(torch.tensor([[0.0, 1], [0, 2], [0, 0], [0, 1]]), torch.tensor([1, 2, 0, 2]))
    # triggered: 2 hijacked to target 0, 1 keeps its label 2, 1 sample of the target class (ignored)
    poison = TensorDataset(torch.tensor([[1.0, 1], [1, 2], [0, 2], [1, 0]]), torch.tensor([1, 2, 2, 0]))
    m = Fixed().train()
    out = nft_fast.evaluate(m, DataLoader(clean, batch_size=3), DataLoader(poison, batch_size=3), target=0)
    assert out["acc"] == pytest.approx(0.75) and out["n_clean"] == 4
    assert out["asr"] == pytest.approx(2 / 3) and out["ra"] == pytest.approx(1 / 3) and out["n_poison"] == 3
    assert m.training  # mode restored
    with pytest.raises(ValueError, match="target"):
        nft_fast.evaluate(m, None, DataLoader(poison, batch_size=3))
    a2a = nft_fast.evaluate(m, None, DataLoader(poison, batch_size=3), target="all2all")
    assert a2a["n_poison"] == 4


def test_array_dataset_augment_keeps_shape():
    x = torch.rand(4, 1, 12, 12)
    ds = D.ArrayDataset(x, torch.arange(4), augment=True)
    torch.manual_seed(0)
    xi, yi = ds[1]
    assert xi.shape == (1, 12, 12) and yi == 1
    with pytest.raises(D.DataError):
        D.ArrayDataset(x, torch.arange(3))
