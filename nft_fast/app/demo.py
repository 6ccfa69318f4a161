"""The end-to-end demo (the README's main job): BadNets on Fashion-MNIST, purified by NFT.

Trains (or reuses from the cache, ``$NFT_FAST_CACHE`` or ``~/.cache/nft_fast``) a
BadNets-backdoored PreActResNet-18 (width 8) on the attacker's split of Fashion-MNIST,
purifies it with NFT (``preset``: "strong" by default, "reference" for the paper's settings)
on the defender's held-out 1% clean set (600 images), prints ACC / ASR / RA before and after,
and writes a report folder.
"""
from __future__ import annotations

import time
from typing import Optional
from pathlib import Path

from ..harness.runs import BackdoorSpec, cached_run
from ..config import NFTConfig
from ..outdir import Interrupted
from .pipeline import purify_to_folder
from .report import metrics_table

DEMO_SPEC = BackdoorSpec(attack="badnets", attack_params={"target": 0}, arch="preactresnet18", width=8, epochs=4,
                         rate=0.1, seed=0, clean_fraction=0.01)


def run_demo(out: Path, progress: bool = True, data_dir=None, spec: BackdoorSpec = DEMO_SPEC,
             preset: str = "strong", steps: Optional[int] = None, resume: bool = False) -> dict:
    """Train (or reuse) ``spec``'s backdoored model, purify it into ``out`` (replacing an earlier
    demo's outputs there; ``resume``: continue an interrupted purification) and print the result."""
    cfg = NFTConfig.preset(preset) if steps is None else NFTConfig.preset(preset, steps=steps)
    steps = cfg.steps
    t0 = time.perf_counter()
    try:
        run = cached_run(spec, data_dir, progress)
    except KeyboardInterrupt:
        raise Interrupted("the backdoored model's training was stopped and nothing was cached; run the demo again "
                          "to train it from the start") from None
    report = purify_to_folder(out, run=str(run.folder), data_dir=data_dir, config=cfg, progress=progress,
                              title=f"NFT demo: {spec.attack} on {spec.dataset}, {spec.arch} (width {spec.width})",
                              resume=resume, overwrite=True)
    before = dict(report["before"], seconds=run.run["train_seconds"])
    print()
    print(f"{spec.attack} backdoor, {spec.arch} width {spec.width} on {spec.dataset}; "
          f"NFT with {report['clean_samples']} clean images ({preset} preset, {steps} steps)")
    print(metrics_table({"backdoored (seconds: training)": before, "NFT purified (seconds: purification)": report["after"]}))
    sig = report.get("signal")
    if sig:
        b, a = sig["before"], sig["after"]
        print(f"poison-free signal (trigger-scan anomaly index; a backdoor is likely when the same class stays above 2 "
              f"with a trigger under half the backdoored model's median L1): backdoored {b['trigger_anomaly']:.2f} "
              f"(class {b['trigger_suspect']}, L1 {b['trigger_norm']:.1f}, median {b['trigger_median_norm']:.1f}), "
              f"purified {a['trigger_anomaly']:.2f} (class {a['trigger_suspect']}, L1 {a['trigger_norm']:.1f}): "
              f"{'backdoor likely still there' if sig['backdoor_likely'] else 'no large backdoor left'}")
        if b.get("trigger_mode"):
            print(f"decision from the signal: {b['trigger_mode']} (see report.md)")
    print(f"report: {Path(out) / 'report.md'} (+ report.json, masks_heatmap.png, masks_hist.png, rounds.png); "
          f"total {time.perf_counter() - t0:.0f} s")
    return report
