"""Data-parallel purification on the CPU: 2 gloo processes x 1 thread against 1 process x 2
threads, the same global batch, the same steps.

Per model: the mean step time of each, their ratio, and, for the 2 processes, the share of the
step spent in collectives: the one all-reduce of the flat mask-gradient buffer (``num_masks`` + 3
floats) and BatchNorm's global statistics (one all-reduce per BN layer forward, one backward).
Both are timed inside the step (``nft_fast.distributed.all_reduce_sum`` wrapped), on rank 0.

Usage::

    python bench/ddp.py [--models preactresnet18,resnet50] [--steps 20] [--out bench/results/ddp_cpu_...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

#: name -> (arch, build kwargs, input shape, batch size)
MODELS = {
    "preactresnet18": ("preactresnet18", dict(num_classes=10, in_channels=1, width=8, image_size=28), (1, 28, 28), 128),
    "resnet50": ("resnet50_imagenet", dict(num_classes=100, in_channels=3, width=16, image_size=64), (3, 64, 64), 64),
}


def _worker(name: str, steps: int, out: str) -> None:
    """One process of a measurement (the single process, or one rank under torchrun)."""
    import torch.distributed as dist

    import nft_fast
    from nft_fast import distributed, models
    from nft_fast.config import NFTConfig
    from nft_fast.purifier import Purifier

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        dist.init_process_group("gloo")
    arch, kw, shape, batch = MODELS[name]
    torch.manual_seed(0)
    model = models.build(arch, **kw)
    nft_fast.attach_masks(model, exclude=models.default_exclude(arch))
    p = Purifier(model, NFTConfig(batch_size=batch), samples_per_class=10.0, num_classes=kw["num_classes"])
    x, y = torch.rand((batch,) + shape), torch.randint(0, kw["num_classes"], (batch,))
    spent = {"grad": 0.0, "bn": 0.0, "grad_calls": 0, "bn_calls": 0}
    inner = distributed.all_reduce_sum

    def timed(t, w):
        t0 = time.perf_counter()
        r = inner(t, w)
        kind = "grad" if t.numel() == p.num_masks + 3 else "bn"
        spent[kind] += time.perf_counter() - t0
        spent[kind + "_calls"] += 1
        return r

    distributed.all_reduce_sum = timed
    for _ in range(3):  # warm-up
        p.step(x, y)
    for k in spent:
        spent[k] = 0 if k.endswith("calls") else 0.0
    if ranks > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        p.step(x, y)
    sec = (time.perf_counter() - t0) / steps
    if ranks > 1:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps({
            "step_s": sec, "num_masks": p.num_masks, "grad_allreduce_s": spent["grad"] / steps,
            "bn_allreduce_s": spent["bn"] / steps, "bn_allreduces_per_step": spent["bn_calls"] / steps,
            "grad_allreduces_per_step": spent["grad_calls"] / steps}))


def _run(cmd: list, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"ddp bench: {' '.join(cmd[:6])} ... failed (exit {r.returncode})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="preactresnet18,resnet50")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=f"bench/results/ddp_cpu_{time.strftime('%Y%m%d')}")
    args = ap.parse_args()
    rows = []
    me = str(Path(__file__).resolve())
    for name in args.models.split(","):
        one, two = Path(f"/tmp/ddp_bench_{name}_1.json"), Path(f"/tmp/ddp_bench_{name}_2.json")
        _run([sys.executable, me, "--worker", name, str(args.steps), str(one)], threads=2)
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", me, "--worker", name,
              str(args.steps), str(two)], threads=1)
        a, b = json.loads(one.read_text()), json.loads(two.read_text())
        arch, kw, shape, batch = MODELS[name]
        rows.append({"model": name, "arch": arch, **kw, "input": list(shape), "global_batch": batch,
                     "num_masks": a["num_masks"], "one_proc_2_threads_step_s": a["step_s"],
                     "two_procs_1_thread_step_s": b["step_s"], "speedup_2procs": a["step_s"] / b["step_s"],
                     "grad_allreduce_s": b["grad_allreduce_s"], "grad_allreduces_per_step": b["grad_allreduces_per_step"],
                     "bn_allreduce_s": b["bn_allreduce_s"], "bn_allreduces_per_step": b["bn_allreduces_per_step"],
                     "grad_allreduce_share": b["grad_allreduce_s"] / b["step_s"],
                     "bn_allreduce_share": b["bn_allreduce_s"] / b["step_s"]})
    from nft_fast import attach_masks, models
    r50 = models.build("resnet50_imagenet", num_classes=1000, in_channels=3, width=64, image_size=224)
    r50_masks = sum(s.numel for s in attach_masks(r50, exclude=models.default_exclude("resnet50_imagenet")))
    meta = {"cpu": platform.processor() or platform.machine(), "capability": torch.backends.cpu.get_cpu_capability(),
            "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "backend": "gloo", "steps": args.steps, "date": time.strftime("%Y-%m-%d"),
            "resnet50_224_1000_num_masks": r50_masks}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Data-parallel purification on the CPU (gloo)", "",
             f"{meta['date']}, {meta['cores']} cores, CPU capability {meta['capability']}, torch {meta['torch']}, "
             f"Python {meta['python']}; {args.steps} timed steps after 3 warm-up steps, reference config. "
             "2 processes x 1 thread (torchrun, gloo) against 1 process x 2 threads, the same global batch.", "",
             "| model | global batch | masks | 1 proc x 2 thr s/step | 2 procs x 1 thr s/step | speed-up | "
             "mask-grad all-reduce ms (share) | BN all-reduces/step, ms (share) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['arch']} w{r['width']}, {'x'.join(map(str, r['input']))}) | {r['global_batch']} | "
                     f"{r['num_masks']} | {r['one_proc_2_threads_step_s']:.3f} | {r['two_procs_1_thread_step_s']:.3f} | "
                     f"{r['speedup_2procs']:.2f}x | {1e3 * r['grad_allreduce_s']:.2f} "
                     f"({100 * r['grad_allreduce_share']:.1f}%) | {r['bn_allreduces_per_step']:.0f}, "
                     f"{1e3 * r['bn_allreduce_s']:.1f} ({100 * r['bn_allreduce_share']:.1f}%) |")
    lines += ["", f"The mask-gradient message is one all-reduce of `num_masks + 3` floats per step (ResNet-50 at "
              f"224x224 with 1,000 classes: {r50_masks} masks, {4 * (r50_masks + 3) / 1024:.0f} KiB)."]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
