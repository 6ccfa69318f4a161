"""The ASR floor: a model trained by the grid's recipe on unpoisoned data (rate 0), evaluated on
each attack's triggered test set (the triggers of the backdoored run with the same seed).

Usage: ``python floor.py SEED`` (trains the clean model into the cache on first use).
"""
import dataclasses
import json
import sys

import torch

from nft_fast import evaluate
from nft_fast.app.demo import DEMO_SPEC
from nft_fast.harness.runs import BackdoorSpec, cached_run, poison_loader

ATTACKS = ("badnets", "blend", "trojan", "sig", "wanet", "inputaware")


def spec(attack: str, seed: int, rate: float = DEMO_SPEC.rate) -> BackdoorSpec:
    """The grid's model of ``attack`` and ``seed``: the demo's recipe (PreActResNet-18 width 8,
    Fashion-MNIST, 4 epochs, target 0)."""
    return dataclasses.replace(DEMO_SPEC, attack=attack, seed=seed, rate=rate)


if __name__ == "__main__":
    torch.set_num_threads(1)
    seed = int(sys.argv[1])
    clean = cached_run(spec("badnets", seed, rate=0.0), None, progress=False)
    for attack in ATTACKS:
        run = cached_run(spec(attack, seed), None, progress=False, log=lambda *a: None)
        m = evaluate(clean.model, run.data.test_loader(), poison_loader(run.attack, run.data))
        print(json.dumps({"seed": seed, "attack": attack, "acc": round(100 * m["acc"], 2),
                          "asr": round(100 * m["asr"], 2)}), flush=True)
