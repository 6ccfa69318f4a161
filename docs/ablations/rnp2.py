import sys, time, torch
from rnp import *
attack = sys.argv[1]; reg = float(sys.argv[2]); per_class = None if len(sys.argv) < 4 else int(sys.argv[3])
run, test, pois = load(attack)
x, y = run.data.clean_set(per_class=per_class, seed=0)
t0 = time.time()
unl, eps, acc = unlearn(run.model, x, y)
masks = recover(unl, x, y, reg=reg)
print(f"unlearn {eps} ep acc {acc:.3f}; total {time.time()-t0:.1f}s")
torch.save(masks, f"/tmp/exp/masks_{attack}_{reg}_{per_class}.pt")
names = list(masks); flat = torch.cat([masks[n] for n in names]); lay = torch.cat([torch.full((masks[n].numel(),), i) for i, n in enumerate(names)])
order = torch.sort(flat, stable=True).indices
print("lowest 30:", [(names[lay[i]].replace('layer','L'), round(float(flat[i]),3)) for i in order[:30]])
for k in (3, 6, 10, 15, 20, 30, 45):
    sel = set(order[:k].tolist()); pm = copy.deepcopy(run.model); off = 0
    for n in names:
        mod = pm.get_submodule(n); c = masks[n].numel()
        with torch.no_grad():
            for i in range(c):
                if off + i in sel: mod.weight[i] = 0
        off += c
    e = evaluate(pm, test, pois)
    print(f"k {k} acc {e['acc']:.4f} asr {e['asr']:.4f} ra {e['ra']:.4f}", flush=True)
