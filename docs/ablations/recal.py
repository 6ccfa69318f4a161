import sys, copy, time, torch, torch.nn as nn
from torch.utils.data import TensorDataset
from rnp import load, evaluate
from nft_fast import NFTConfig, purify
import os; torch.set_num_threads(int(os.environ.get("NT", "2")))
@torch.no_grad()
def recal(model, x, bs=128):
    m = copy.deepcopy(model)
    bns = [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    for b in bns: b.reset_running_stats(); b.momentum = None
    m.train()
    for i in range(0, len(x), bs): m(x[i:i+bs])
    for b, o in zip(bns, [b for b in model.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]): b.momentum = o.momentum
    return m
attack = sys.argv[1]; kw = eval("dict(" + (sys.argv[2] if len(sys.argv) > 2 else "") + ")")
run, test, pois = load(attack)
import os; x, y = run.data.clean_set(per_class=int(os.environ["PC"]) if os.environ.get("PC") else None, seed=0)
print("base", evaluate(run.model, test, pois)); print("base recal", evaluate(recal(run.model, x), test, pois))
t0 = time.time()
res = purify(run.model, TensorDataset(x, y), NFTConfig(**kw), progress=False, evaluate_fn=lambda m: {k: round(v, 4) for k, v in evaluate(m, test, pois).items() if k in ("acc", "asr")})
for h in res.history: print(h)
f = res.folded(); print(time.time() - t0, "final", evaluate(f, test, pois)); print("recal", evaluate(recal(f, x), test, pois), flush=True)
