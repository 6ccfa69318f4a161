"""Experiment: unlearn-then-recover masks (RNP-style) + NFT stage."""
import sys, time, copy
import torch, torch.nn.functional as F
from torch.utils.data import TensorDataset, DataLoader
from nft_fast.harness.runs import BackdoorSpec, cached_run
from nft_fast.evaluation import evaluate
from nft_fast.masks import attach_masks
import os; torch.set_num_threads(int(os.environ.get("NT", "2")))

def load(attack):
    spec = BackdoorSpec(attack=attack, attack_params={"target": 0}, arch="preactresnet18", width=8, epochs=4, seed=0)
    run = cached_run(spec, progress=False, log=lambda *a: None)
    g = torch.Generator().manual_seed(1)
    xt, yt = run.data.test
    idx = torch.randperm(len(yt), generator=g)[:3000]
    test = DataLoader(TensorDataset(xt[idx], yt[idx]), batch_size=1000)
    xp, yp, ytp = run.attack.poison_test(xt[idx], yt[idx])
    pois = DataLoader(TensorDataset(xp, yp, ytp), batch_size=1000)
    return run, test, pois

def batches(x, y, bs, g):
    while True:
        idx = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - bs + 1 if len(y) >= bs else 1, bs):
            j = idx[i:i + bs]
            yield x[j], y[j]

def unlearn(model, x, y, lr=0.01, stop=0.2, max_epochs=50, seed=0):
    net = copy.deepcopy(model); net.train()
    for p in net.parameters(): p.requires_grad_(True)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    bs = min(128, len(y))
    for ep in range(max_epochs):
        idx = torch.randperm(len(y), generator=g); corr = n = 0
        for i in range(0, len(y), bs):
            j = idx[i:i+bs]
            out = net(x[j]); loss = -F.cross_entropy(out, y[j])
            opt.zero_grad(); loss.backward(); opt.step()
            corr += (out.argmax(1) == y[j]).sum().item(); n += len(j)
        if corr / n <= stop:
            break
    return net, ep + 1, corr / n

def recover(unl, x, y, lr=0.2, epochs=20, bias=False, seed=0, reg=0.0):
    net = copy.deepcopy(unl)
    sites = attach_masks(net)
    masks = [s.mask for s in sites]
    opt = torch.optim.SGD(masks, lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed); net.train()
    bs = min(128, len(y))
    for ep in range(epochs):
        idx = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            j = idx[i:i+bs]
            loss = F.cross_entropy(net(x[j]), y[j])
            if reg: loss = loss + reg * sum((1 - m).abs().sum() for m in masks)
            opt.zero_grad(); loss.backward(); opt.step()
            with torch.no_grad():
                for m in masks: m.clamp_(0, 1)
    return {s.name: s.mask.detach().clone() for s in sites}

def prune(model, masks, thr, bias=False):
    out = copy.deepcopy(model); k = 0
    for n, m in masks.items():
        mod = out.get_submodule(n); sel = m <= thr; k += int(sel.sum())
        with torch.no_grad():
            mod.weight[sel] = 0
            if bias: mod.bias[sel] = 0
    return out, k

if __name__ == "__main__":
    attack = sys.argv[1]; per_class = None if len(sys.argv) < 3 or sys.argv[2] == "all" else int(sys.argv[2])
    run, test, pois = load(attack)
    x, y = run.data.clean_set(per_class=per_class, seed=0)
    base = evaluate(run.model, test, pois); print("base", {k: round(v, 4) for k, v in base.items() if k in ("acc", "asr")})
    t0 = time.time()
    unl, eps, acc = unlearn(run.model, x, y)
    print(f"unlearn epochs {eps} acc {acc:.3f} {time.time()-t0:.1f}s", evaluate(unl, test, pois)["acc"])
    masks = recover(unl, x, y)
    print(f"recover {time.time()-t0:.1f}s")
    flat = torch.cat(list(masks.values()))
    print("mask quantiles", [round(float(q), 3) for q in torch.quantile(flat, torch.tensor([0.01, 0.05, 0.1, 0.25, 0.5]))], "n", flat.numel())
    for thr in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7):
        for b in (False, True):
            pm, k = prune(run.model, masks, thr, b)
            e = evaluate(pm, test, pois)
            print(f"thr {thr} bias {b} pruned {k} acc {e['acc']:.4f} asr {e['asr']:.4f} ra {e['ra']:.4f}", flush=True)
