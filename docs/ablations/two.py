"""A: adversarial masks; then C: weight fine-tune (MixUp [+adv]) with masks folded."""
import time, copy, argparse, numpy as np
import torch, torch.nn.functional as F
from rnp import load, evaluate
from nft_fast.masks import attach_masks, fold_masks
import os; torch.set_num_threads(int(os.environ.get("NT", "2")))
ap = argparse.ArgumentParser()
ap.add_argument("attack"); ap.add_argument("--eps", type=float, default=0.05); ap.add_argument("--k", type=int, default=1)
ap.add_argument("--lr", type=float, default=0.1); ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--per-class", type=int, default=None)
ap.add_argument("--ft-lr", type=float, default=0.01); ap.add_argument("--ft-steps", type=int, default=200)
ap.add_argument("--ft-eps", type=float, default=0.0); ap.add_argument("--thr", type=float, default=-1)
ap.add_argument("--every", type=int, default=100)
a = ap.parse_args()
run, test, pois = load(a.attack)
x, y = run.data.clean_set(per_class=a.per_class, seed=0)
print("base", {k: round(v, 4) for k, v in evaluate(run.model, test, pois).items()}, flush=True)
rng = np.random.default_rng(0); g = torch.Generator().manual_seed(0)
def make_pgd(net, eps, k):
    def pgd(xb, yb):
        d = (torch.rand(xb.shape, generator=g) * 2 - 1) * eps
        for _ in range(k):
            d.requires_grad_(True)
            loss = F.cross_entropy(net((xb + d).clamp(0, 1)), yb)
            gr, = torch.autograd.grad(loss, d)
            d = (d.detach() + 2.5 * eps / k * gr.sign()).clamp(-eps, eps)
        return (xb + d).clamp(0, 1).detach()
    return pgd
def train(net, params, lr, steps, eps, clamp, tag, wd=0.0):
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    pgd = make_pgd(net, eps, a.k); net.train(); t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(len(y), (128,), generator=g); xb, yb = x[idx], y[idx]
        lam = float(rng.beta(1, 1)); perm = torch.randperm(128, generator=g)
        out = net(lam * xb + (1 - lam) * xb[perm]); loss = lam * F.cross_entropy(out, yb) + (1 - lam) * F.cross_entropy(out, yb[perm])
        if eps > 0:
            loss = loss + F.cross_entropy(net(pgd(xb, yb)), yb)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        if clamp:
            with torch.no_grad():
                for p in params: p.clamp_(0, 1)
        if step % a.every == 0 or step == steps:
            e = evaluate(net, test, pois)
            print(f"{tag} step {step} {time.time()-t0:.0f}s acc {e['acc']:.4f} asr {e['asr']:.4f} ra {e['ra']:.4f}", flush=True)
net = copy.deepcopy(run.model); sites = attach_masks(net)
train(net, [s.mask for s in sites], a.lr, a.steps, a.eps, True, "A")
if a.thr >= 0:
    with torch.no_grad():
        n = 0
        for s in sites:
            sel = s.mask < a.thr; s.mask[sel] = 0; n += int(sel.sum())
    e = evaluate(net, test, pois); print(f"thr {a.thr} zeroed {n} acc {e['acc']:.4f} asr {e['asr']:.4f}")
zero = {s.name: (s.mask == 0).clone() for s in sites}
net = fold_masks(net)
params = [p for p in net.parameters()]
for p in params: p.requires_grad_(True)
# hard-zeroed neurons stay zero: keep their gamma at 0 through fine-tuning
hooks = []
for name, z in zero.items():
    w = net.get_submodule(name).weight
    if z.any(): w.register_hook(lambda gr, z=z: gr.masked_fill(z, 0))
train(net, params, a.ft_lr, a.ft_steps, a.ft_eps, False, "C", wd=5e-4)
