"""What the oneDNN guard (nft_fast.layout.guard_convs) costs: training-step time of the zoo's
CIFAR ResNet-18 (B=64, 32x32) with and without it, channels_last and NCHW, 1 and 2 threads.

Each configuration runs in its own subprocess under ``ONEDNN_MAX_CPU_ISA=AVX2`` by default
(oneDNN's AVX2 kernels, where the bug lives, on any x86 CPU) so an unguarded run of a narrow
model, which aborts or hangs there, is reported as such instead of ending the benchmark.
Width 64 (the real model) has no affected convolution, so the guard installs nothing; width 4
has one (the first downsampling shortcut, 4 input channels).

    python bench/onednn_guard.py                 # widths 64,4; threads 1,2
    python bench/onednn_guard.py --isa ""        # the CPU's own oneDNN ISA
Writes bench/results/onednn_guard_<tag>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch, torch.nn.functional as F
width, threads, variant, steps, batch = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
from nft_fast import layout, models
torch.manual_seed(0)
m = models.build("resnet18", num_classes=10, in_channels=3, width=width, image_size=32).train()
cl = variant != "nchw"
if cl:
    m.to(memory_format=torch.channels_last)
guarded = layout.guard_convs(m) if variant == "channels_last+guard" else 0
opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
x = torch.randn(batch, 3, 32, 32)
x = x.contiguous(memory_format=torch.channels_last) if cl else x
y = torch.randint(0, 10, (batch,))
times = []
for i in range(steps + 3):
    t0 = time.perf_counter()
    loss = F.cross_entropy(m(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i >= 3:
        times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "guarded": guarded}))
"""

VARIANTS = ("channels_last+guard", "channels_last", "nchw")


def run_one(width: int, threads: int, variant: str, steps: int, batch: int, isa: str, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ONEDNN_MAX_CPU_ISA")}
    env["NFT_FAST_ONEDNN_GUARD"] = "1"  # guard_convs acts whatever the CPU: the variant decides if it is called
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, str(width), str(threads), variant, str(steps), str(batch)],
                           env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"hang (> {timeout:.0f} s)"}
    if r.returncode != 0:
        return {"status": f"crash (exit {r.returncode}: {(r.stderr.strip().splitlines() or ['?'])[-1][:80]})",
                "seconds": time.perf_counter() - t0}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {"status": "ok", "median_ms": 1e3 * statistics.median(out["times"]), "guarded": out["guarded"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,4")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--isa", default="AVX2", help="ONEDNN_MAX_CPU_ISA of the runs ('' = the CPU's own)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--tag", default=f"onednn_guard_cpu_{date.today():%Y%m%d}")
    args = ap.parse_args()
    import torch

    from nft_fast.machine import describe, machine_info

    rows = []
    for width in map(int, args.widths.split(",")):
        for threads in map(int, args.threads.split(",")):
            for variant in VARIANTS:
                r = run_one(width, threads, variant, args.steps, args.batch, args.isa, args.timeout)
                rows.append({"width": width, "threads": threads, "variant": variant, **r})
                print(rows[-1], flush=True)
    base = {(r["width"], r["threads"]): r.get("median_ms") for r in rows if r["variant"] == "channels_last"}
    nchw = {(r["width"], r["threads"]): r.get("median_ms") for r in rows if r["variant"] == "nchw"}
    machine = machine_info()
    lines = [f"# oneDNN guard: training-step cost ({date.today():%Y-%m-%d})", "",
             f"Machine: {describe(machine)}; runs with ONEDNN_MAX_CPU_ISA={args.isa or '(unset)'}, "
             f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}.",
             f"Zoo CIFAR ResNet-18, B={args.batch}, 32x32, fp32, SGD step; median of {args.steps} steps after 3 "
             "warm-up steps; one subprocess per row.", "",
             "| width | threads | variant | guarded convs | ms/step | / unguarded channels_last | / NCHW | status |",
             "|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ms, key = r.get("median_ms"), (r["width"], r["threads"])
        ratio = lambda d, ms=ms, key=key: f"{ms / d[key]:.3f}" if ms and d.get(key) else "-"
        lines.append(f"| {r['width']} | {r['threads']} | {r['variant']} | {r.get('guarded', '-')} | "
                     f"{f'{ms:.1f}' if ms else '-'} | {ratio(base)} | {ratio(nchw)} | {r['status']} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.tag}.json").write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
