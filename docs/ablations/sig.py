import sys, torch
from rnp import load
from nft_fast.evaluation import adversarial_signal
import os; torch.set_num_threads(int(os.environ.get("NT", "2")))
for a in sys.argv[1].split(","):
    run, test, pois = load(a); x, y = run.data.clean_set(seed=0)
    for eps in (0.02, 0.05, 0.1):
        print(a, eps, adversarial_signal(run.model, x, y, eps=eps), flush=True)
