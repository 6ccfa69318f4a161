"""The poison-free signal next to the measured ASR: purify a grid model with a preset, then
scan the backdoored and the purified model with `strong`'s search.

Usage: ``python signal.py ATTACK SEED SETTING PRESET`` (SETTING: 1pct or oneshot; PRESET:
reference or strong); prints one JSON row (ACC/ASR, the scan summaries before and after).
"""
import json
import sys

import torch
from torch.utils.data import TensorDataset
from nft_fast import NFTConfig, evaluate
from nft_fast.harness.grid import SETTINGS
from nft_fast.harness.runs import poison_loader, cached_run
from nft_fast.purifier import purify, find_triggers
from floor import spec

if __name__ == "__main__":
    torch.set_num_threads(1)
    attack, seed, setting, preset = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    run = cached_run(spec(attack, seed), None, progress=False, log=lambda *a: None)
    test, poison = run.data.test_loader(), poison_loader(run.attack, run.data)
    x, y = run.data.clean_set(per_class=SETTINGS[setting], seed=seed)
    cfg = NFTConfig.preset(preset)
    scfg = NFTConfig.preset("strong")
    res = purify(run.model, TensorDataset(x, y), cfg, progress=False)
    plain = res.folded()
    m = evaluate(plain, test, poison)
    before = res.history[0].get("scan") or find_triggers(run.model, x, y, scfg).summary()
    after = find_triggers(plain, x, y, scfg).summary()
    keys = ("trigger_anomaly", "trigger_suspect", "trigger_norm", "trigger_median_norm", "trigger_success")
    print(json.dumps({"attack": attack, "seed": seed, "setting": setting, "preset": preset,
                      "acc": round(100 * m["acc"], 2), "asr": round(100 * m["asr"], 2),
                      "before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}}), flush=True)
