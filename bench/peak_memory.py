"""Peak resident memory of ``nft-fast purify`` on the CPU, measured with ``/usr/bin/time -v``.

Cases (each a fresh ``python -m nft_fast purify`` process, so the number is the whole process:
interpreter, torch, model, data, optimizer state and the step's activations):

* ``demo``: the demo's model (PreActResNet-18 width 8, Fashion-MNIST, BadNets seed 0) with the
  ``strong`` preset on its 600-image clean set, as ``nft-fast demo`` purifies it (the run is
  trained and cached first when missing).
* ``resnet50``: ResNet-50 (ImageNet layout) at 224x224, random weights, 1000 classes, a
  random clean set of ``--images`` images, ``--steps`` mask steps at ``--batch-size`` (default
  128) with the reference preset (the mask step is what scales with the batch).

Usage::

    python bench/peak_memory.py [--cases demo,resnet50] [--batch-size 128] [--out bench/results/peak_memory_...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _measure(cmd: list, env: dict) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; its peak RSS in MiB and wall seconds."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    if p.returncode != 0 or m is None:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-3000:])
        raise SystemExit(f"peak_memory: {' '.join(cmd[:4])} ... failed (exit {p.returncode})")
    return {"peak_rss_mib": int(m.group(1)) / 1024, "seconds": wall}


def _demo_case(tmp: Path, env: dict) -> dict:
    from nft_fast.app.demo import DEMO_SPEC as spec  # the demo's own backdoored-model recipe
    from nft_fast.harness.runs import cached_run

    run = cached_run(spec, progress=False).folder  # trained once and cached, outside the measurement
    cmd = [sys.executable, "-m", "nft_fast", "purify", "--run", str(run), "--out", str(tmp / "demo"),
           "--preset", "strong", "--no-progress"]
    return {"case": "demo", "model": "PreActResNet-18 w8, 1x28x28, 10 classes", "clean_images": 600,
            "preset": "strong", "batch_size": 128, **_measure(cmd, env)}


def _resnet50_case(tmp: Path, env: dict, batch_size: int, images: int, steps: int) -> dict:
    from safetensors.torch import save_file

    from nft_fast.models import build

    torch.manual_seed(0)
    model = build("resnet50_imagenet", num_classes=1000)
    ckpt = tmp / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    del model
    rng = np.random.default_rng(0)
    x = rng.random((images, 3, 224, 224), dtype=np.float32)
    y = np.arange(images) % 1000
    data = tmp / "clean.npz"
    np.savez(data, x=x, y=y)
    del x
    cmd = [sys.executable, "-m", "nft_fast", "purify", "--checkpoint", str(ckpt), "--arch", "resnet50_imagenet",
           "--data", str(data), "--out", str(tmp / "r50"), "--preset", "reference", "--steps", str(steps),
           "--rounds", "1", "--batch-size", str(batch_size), "--no-progress"]
    return {"case": "resnet50", "model": "ResNet-50 (ImageNet layout), 3x224x224, 1000 classes",
            "clean_images": images, "preset": f"reference, {steps} steps", "batch_size": batch_size,
            **_measure(cmd, env)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="demo,resnet50")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for case in a.cases.split(","):
            row = _demo_case(Path(d), env) if case == "demo" else _resnet50_case(Path(d), env, a.batch_size, a.images,
                                                                                   a.steps)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if a.out:
        Path(a.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        lines = ["# Peak memory of `nft-fast purify` (CPU, `/usr/bin/time -v`)", "",
                 f"{meta['cpu']}, capability {meta['cpu_capability']}, {meta['threads']} threads, torch {meta['torch']}, "
                 f"python {meta['python']}, {meta['date']}. Regenerate: `python bench/peak_memory.py --out ...`.", "",
                 "| case | model | clean images | preset | batch | peak RSS (GiB) | wall (s) |",
                 "|---|---|---:|---|---:|---:|---:|"]
        lines += [f"| {r['case']} | {r['model']} | {r['clean_images']} | {r['preset']} | {r['batch_size']} | "
                  f"{r['peak_rss_mib'] / 1024:.2f} | {r['seconds']:.0f} |" for r in rows]
        Path(a.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
