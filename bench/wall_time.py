"""Wall time of a whole purification: the reference NFT (1,000 steps) against ``strong`` (trigger
search + 400 steps with the unlearning terms) on the demo's backdoored model.

Each preset runs in its own process with one thread; both processes run at the same time, one
per core (``--sequential`` runs them one after the other). Reports the purification's seconds
(``PurifyResult.seconds``), the trigger part (scan and search before the first round), and ACC /
ASR of the folded model on the full test set.

Usage::

    python bench/wall_time.py [--presets reference,strong] [--out bench/results/wall_time_...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _worker(preset: str, out: str) -> None:
    from torch.utils.data import TensorDataset

    from nft_fast import NFTConfig, evaluate, purify
    from nft_fast.app.demo import DEMO_SPEC
    from nft_fast.harness.runs import cached_run, poison_loader

    run = cached_run(DEMO_SPEC, progress=False, log=lambda *a: None)
    x, y = run.data.clean_set(per_class=60, seed=DEMO_SPEC.seed)
    t0 = time.perf_counter()
    res = purify(run.model, TensorDataset(x, y), NFTConfig.preset(preset), progress=False)
    wall = time.perf_counter() - t0
    scan = next((h["scan"] for h in res.history if isinstance(h, dict) and "scan" in h), {})
    m = evaluate(res.folded(), run.data.test_loader(), poison_loader(run.attack, run.data))
    Path(out).write_text(json.dumps({"preset": preset, "seconds": wall, "trigger_seconds": scan.get("trigger_seconds", 0.0),
                                     "steps": NFTConfig.preset(preset).steps, "acc": 100 * m["acc"], "asr": 100 * m["asr"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="reference,strong")
    ap.add_argument("--sequential", action="store_true")
    ap.add_argument("--out", default=f"bench/results/wall_time_cpu_{time.strftime('%Y%m%d')}")
    args = ap.parse_args()
    from nft_fast.app.demo import DEMO_SPEC
    from nft_fast.harness.runs import cached_run
    from nft_fast.machine import cpu_name

    cached_run(DEMO_SPEC, progress=False)  # trained and cached first, outside the timing
    env = dict(os.environ, OMP_NUM_THREADS="1")
    me = str(Path(__file__).resolve())
    presets = args.presets.split(",")
    with tempfile.TemporaryDirectory(prefix="nft_wall_time_") as tmp:  # private to this run
        outs = {p: str(Path(tmp) / f"{p}.json") for p in presets}
        procs = []
        for p in presets:
            procs.append(subprocess.Popen([sys.executable, me, "--worker", p, outs[p]], env=env))
            if args.sequential:
                procs[-1].wait()
        for pr in procs:
            if pr.wait() != 0:
                raise SystemExit("wall_time: a worker failed")
        rows = [json.loads(Path(outs[p]).read_text()) for p in presets]
    meta = {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "threads_per_process": 1, "parallel": not args.sequential,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    base = rows[0]["seconds"]
    lines = ["# Wall time of a whole purification (demo model)", "",
             f"{meta['date']}, {meta['cpu']}, {meta['cores']} cores, CPU capability {meta['capability']}, "
             f"torch {meta['torch']}; "
             f"one thread per preset, {'both at once (one core each)' if meta['parallel'] else 'one after the other'}. "
             "Demo model: PreActResNet-18 width 8, Fashion-MNIST BadNets seed 0, 600 clean images; ACC/ASR on the "
             "full test set.", "",
             f"| preset | steps | wall s | trigger part s | vs {rows[0]['preset']} | ACC % | ASR % |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['steps']} | {r['seconds']:.0f} | {r['trigger_seconds']:.0f} | "
                     f"{r['seconds'] / base:.2f}x | {r['acc']:.2f} | {r['asr']:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        main()
