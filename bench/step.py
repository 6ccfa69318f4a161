"""Time one NFT step, side by side, as ratios: the reference as written, nft_fast per
backend, and the mask-free floor. Writes JSON + markdown under bench/results/.

    python bench/step.py                      # CPU: CIFAR ResNet-18, B=64, 32x32
    python bench/step.py --batch 128 --steps 50 --warmup 10

Variants (same weights, same data, same lam/perm every step):
  reference  nft_fast.reference as written: every weight requires grad (autograd computes
             weight gradients it never uses) and Regularization() computes L1, L2 and Linf.
  nft_fast[backend]  Purifier.step (frozen weights, fused analytic mask update).
  floor      the same network without masks, frozen, forward + the data gradient down to
             the output of the first masked layer (the least a mask gradient can cost).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_fast
from nft_fast import reference as R
from nft_fast.models import resnet18

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, steps: int, warmup: int, device: torch.device) -> dict:
    for i in range(warmup):
        fn(i)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for i in range(steps):
        t0 = time.perf_counter()
        fn(warmup + i)
        _sync(device)
        ts.append(time.perf_counter() - t0)
    out = {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "steps": steps}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def build_variants(width: int, batch: int, size: int, device: torch.device, layouts=("channels_last", "nchw")):
    """name -> (step function, layout). nft_fast rows are compared with the floor of their layout."""
    torch.manual_seed(0)
    ref = R.ResNet18(num_classes=10, width=width).to(device)
    state = {k: v for k, v in ref.state_dict().items() if "neuron_mask" not in k}
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    g = torch.Generator().manual_seed(0)
    lams = [float(v) for v in torch.rand(1024, generator=g)]
    perms = [torch.randperm(batch, generator=g).to(device) for _ in range(16)]

    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(R.mask_params(ref), lr=0.05, momentum=0.95)
    ref.train()

    def reference_step(i):  # as written: NCHW fp32, every weight requiring grad
        lam, perm = lams[i % 1024], perms[i % 16]
        R.Regularization(ref)  # the official loop computes all three norms every step
        R.nft_step(ref, crit, opt, x, y, lam, perm, samples_per_class=50.0)

    variants = {"reference": (reference_step, "nchw")}

    def make_fast(backend, cl):
        m = resnet18(10, None, 3, width).to(device)
        m.load_state_dict(state)
        nft_fast.attach_masks(m, exclude=("bn1",))
        p = nft_fast.Purifier(m, nft_fast.NFTConfig(channels_last=cl), samples_per_class=50.0)

        def step(i):
            with nft_fast.use_backend(backend):
                p.step(x, y, lam=lams[i % 1024], perm=perms[i % 16])
        return step

    def make_floor(cl):
        mf = torch.channels_last if cl else torch.contiguous_format
        floor = resnet18(10, None, 3, width).to(device).to(memory_format=mf)
        floor.load_state_dict(state)
        floor.train().requires_grad_(False)
        # Data gradient down to the output of the first masked layer (layer1.0.bn1).
        floor.layer1[0].bn1.register_forward_hook(lambda mod, inp, out: out.requires_grad_())

        def floor_step(i):
            lam, perm = lams[i % 1024], perms[i % 16]
            xs = x.contiguous(memory_format=mf)
            xm = lam * xs + (1 - lam) * xs[perm]
            out = floor(xm)
            loss = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])
            loss.backward()
            float(loss.detach())  # Purifier.step reads its loss too
        return floor_step

    for layout in layouts:
        cl = layout == "channels_last"
        for b in ("torch", "cpp", "cuda"):
            if nft_fast.ops.backend_available(b) and nft_fast.ops._device_ok(b, device):
                variants[f"nft_fast[{b}] {layout}"] = (make_fast(b, cl), layout)
        variants[f"floor {layout}"] = (make_floor(cl), layout)
    return variants


def env_info(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(), "build": nft_fast.build_info(),
    }
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--layouts", default="channels_last,nchw", help="comma-separated: channels_last, nchw")
    ap.add_argument("--tag", default=None, help="file name stem under bench/results/")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    variants = build_variants(args.width, args.batch, args.size, device, tuple(args.layouts.split(",")))
    rows = {}
    for name, (fn, layout) in variants.items():
        rows[name] = dict(_time(fn, args.steps, args.warmup, device), layout=layout)
        print(f"{name:>28}: {rows[name]['median_ms']:9.2f} ms/step (median of {args.steps})", flush=True)
    ref_ms = rows["reference"]["median_ms"]
    for name, r in rows.items():
        r["speedup_vs_reference"] = ref_ms / r["median_ms"]
        r["ratio_to_floor"] = r["median_ms"] / rows[f"floor {r['layout']}"]["median_ms"] if name != "reference" else None
    workload = f"CIFAR ResNet-18 (width {args.width}), B={args.batch}, {args.size}x{args.size}, fp32"
    result = {"workload": workload, "env": env_info(device), "args": vars(args), "rows": rows}
    tag = args.tag or f"step_{device.type}_b{args.batch}_w{args.width}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# NFT step: {workload}", "", f"{result['env']['device']}; torch {torch.__version__}; {result['env']['date']}", "",
             "| variant | ms/step (median) | speed-up vs reference | ratio to floor (same layout) |", "|---|---:|---:|---:|"]
    for name, r in rows.items():
        floor = "" if r["ratio_to_floor"] is None else f"{r['ratio_to_floor']:.3f}"
        lines.append(f"| {name} | {r['median_ms']:.2f} | {r['speedup_vs_reference']:.2f}x | {floor} |")
    (RESULTS / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
