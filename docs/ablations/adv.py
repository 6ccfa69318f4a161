"""Mask learning with adversarial inputs (PGD, L-inf) + MixUp."""
import time, copy, argparse, numpy as np
import torch, torch.nn as nn, torch.nn.functional as F
from rnp import load, evaluate
from nft_fast.masks import attach_masks
import os; torch.set_num_threads(int(os.environ.get("NT", "2")))
ap = argparse.ArgumentParser()
ap.add_argument("attack"); ap.add_argument("--eps", type=float, default=0.1); ap.add_argument("--k", type=int, default=5)
ap.add_argument("--lr", type=float, default=0.1); ap.add_argument("--steps", type=int, default=500)
ap.add_argument("--per-class", type=int, default=None); ap.add_argument("--w", type=float, default=1.0)
ap.add_argument("--mix", type=float, default=1.0); ap.add_argument("--reg", type=float, default=0.0)
ap.add_argument("--weights", action="store_true"); ap.add_argument("--bs", type=int, default=128)
ap.add_argument("--every", type=int, default=100); ap.add_argument("--advmix", action="store_true")
a = ap.parse_args()
run, test, pois = load(a.attack)
x, y = run.data.clean_set(per_class=a.per_class, seed=0)
print("base", evaluate(run.model, test, pois))
net = copy.deepcopy(run.model)
if a.weights:
    params = [p for p in net.parameters()]
    for p in params: p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=5e-4)
else:
    sites = attach_masks(net); params = [s.mask for s in sites]
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9)
bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
rng = np.random.default_rng(0); g = torch.Generator().manual_seed(0)
def pgd(xb, yb):
    saved = [(m.momentum) for m in bns]
    for m in bns: m.momentum = 0.0
    d = (torch.rand(xb.shape, generator=g) * 2 - 1) * a.eps
    for _ in range(a.k):
        d.requires_grad_(True)
        loss = F.cross_entropy(net((xb + d).clamp(0, 1)), yb)
        gr, = torch.autograd.grad(loss, d)
        d = (d.detach() + 2.5 * a.eps / a.k * gr.sign()).clamp(-a.eps, a.eps)
    for m, s in zip(bns, saved): m.momentum = s
    return (xb + d).clamp(0, 1).detach()
net.train(); t0 = time.time()
for step in range(1, a.steps + 1):
    idx = torch.randint(len(y), (a.bs,), generator=g); xb, yb = x[idx], y[idx]
    lam = float(rng.beta(a.mix, a.mix)) if a.mix > 0 else 1.0; perm = torch.randperm(a.bs, generator=g)
    xm = lam * xb + (1 - lam) * xb[perm]
    out = net(xm); loss = lam * F.cross_entropy(out, yb) + (1 - lam) * F.cross_entropy(out, yb[perm])
    if a.eps > 0 and a.w > 0:
        xa = pgd(xm if a.advmix else xb, yb)
        loss = loss + a.w * F.cross_entropy(net(xa), yb)
    if a.reg and not a.weights: loss = loss + a.reg * sum((1 - p).abs().sum() for p in params)
    opt.zero_grad(); loss.backward(); opt.step()
    if not a.weights:
        with torch.no_grad():
            for p in params: p.clamp_(0, 1)
    if step % a.every == 0:
        e = evaluate(net, test, pois)
        mn = torch.cat([p.detach().flatten() for p in params]) if not a.weights else torch.zeros(1)
        print(f"step {step} {time.time()-t0:.0f}s loss {loss.item():.3f} acc {e['acc']:.4f} asr {e['asr']:.4f} ra {e['ra']:.4f} mask<0.2 {(mn<0.2).sum().item()} mean {mn.mean():.3f}", flush=True)
