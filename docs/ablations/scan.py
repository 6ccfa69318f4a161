import sys, time, torch
from rnp import load
from nft_fast.trigger import scan
import os; torch.set_num_threads(int(os.environ.get("NT", "2")))
l1 = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
for a in sys.argv[1].split(","):
    run, test, pois = load(a); x, y = run.data.clean_set(seed=0)
    t0 = time.time(); r = scan(run.model, x, y, l1=l1)
    print(a, f"{time.time()-t0:.0f}s", r.summary(), [round(t.norm, 1) for t in r.triggers], [round(t.success, 2) for t in r.triggers], flush=True)
