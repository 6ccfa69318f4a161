"""The ASR floor: a model trained by the grid's recipe on unpoisoned data (rate 0), evaluated on
each attack's triggered test set (the triggers of the backdoored run with the same seed).

Usage: ``python floor.py SEED`` (trains the clean model into the cache on first use).
"""
import json
import sys

import torch

from nft_fast import evaluate
from nft_fast.harness.runs import BackdoorSpec, cached_run, poison_loader

ATTACKS = ("badnets", "blend", "trojan", "sig", "wanet", "inputaware")


def spec(attack: str, seed: int, rate: float = 0.1) -> BackdoorSpec:
    return BackdoorSpec(attack=attack, attack_params={"target": 0}, arch="preactresnet18", width=8,
                        dataset="fashion-mnist", epochs=4, seed=seed, rate=rate)


if __name__ == "__main__":
    torch.set_num_threads(1)
    seed = int(sys.argv[1])
    clean = cached_run(spec("badnets", seed, rate=0.0), None, progress=False)
    for attack in ATTACKS:
        run = cached_run(spec(attack, seed), None, progress=False, log=lambda *a: None)
        m = evaluate(clean.model, run.data.test_loader(), poison_loader(run.attack, run.data))
        print(json.dumps({"seed": seed, "attack": attack, "acc": round(100 * m["acc"], 2),
                          "asr": round(100 * m["asr"], 2)}), flush=True)
