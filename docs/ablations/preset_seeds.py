"""``strong`` (with overrides) on a grid model, evaluated on the full test set with and without
BN recalibration afterwards.

Usage: ``python preset_seeds.py ATTACK SEED PURIFICATION_SEED '{"reg_coef": 0.08}'``; prints one
JSON row (ACC/ASR without recalibration, then with it, the scan's mode and anomaly).
"""
import copy
import json
import sys

import torch
from torch.utils.data import TensorDataset

from nft_fast import NFTConfig, evaluate
from nft_fast.harness.grid import SETTINGS
from nft_fast.harness.runs import poison_loader, cached_run
from nft_fast.purifier import purify, recalibrate_bn
from floor import spec

if __name__ == "__main__":
    torch.set_num_threads(1)
    attack, seed, pseed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    run = cached_run(spec(attack, seed), None, progress=False, log=lambda *a: None)
    test, poison = run.data.test_loader(), poison_loader(run.attack, run.data)
    x, y = run.data.clean_set(per_class=SETTINGS["1pct"], seed=seed)
    cfg = NFTConfig.preset("strong", seed=pseed, **overrides)
    res = purify(run.model, TensorDataset(x, y), cfg, progress=False)
    folded = res.folded()
    plain = evaluate(folded, test, poison)
    recal = copy.deepcopy(folded)
    recalibrate_bn(recal, x, cfg.batch_size, cfg.channels_last)
    after = evaluate(recal, test, poison)
    scan = res.history[0].get("scan", {})
    print(json.dumps({"attack": attack, "seed": seed, "pseed": pseed, "overrides": overrides,
                      "acc": round(100 * plain["acc"], 2), "asr": round(100 * plain["asr"], 2),
                      "acc_recal": round(100 * after["acc"], 2), "asr_recal": round(100 * after["asr"], 2),
                      "mode": scan.get("trigger_mode"), "anomaly": scan.get("trigger_anomaly")}), flush=True)
