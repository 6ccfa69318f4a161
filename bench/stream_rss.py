"""Peak memory of purifying from a large image folder: streamed (read a batch at a time, through
DataLoader workers or not) against the same images loaded whole into memory.

The folder is ImageNet-1%-like: ``--classes`` (100) classes x ``--per-class`` (128) JPEG images
of ``--size`` (64) pixels square, 12,800 images, generated once under ``--root`` (default
``/tmp/nft_stream_rss``; smooth random colour fields with noise, so JPEG sizes are realistic).
Each case is a fresh Python process running :func:`nft_fast.app.pipeline.purify_to_folder`
(the code behind ``nft-fast purify``) on a PreActResNet-18 of width 8 with random weights and
``--classes`` classes, with the reference preset plus BatchNorm recalibration (so the bounded
sample of :func:`nft_fast.purifier.gather`, 8,192 images, is read and held too):

* ``stream_w2``: ``--data FOLDER --workers 2`` (the folder streamed through two worker processes);
* ``stream_w0``: ``--data FOLDER`` (streamed, read in the main process);
* ``whole``: the folder's pixels as one ``.npz`` (uint8, written beforehand), loaded whole.

Measured per case: the main process's peak RSS (``os.wait4``'s ``ru_maxrss``, the largest of the
process and its waited-for workers) and, sampled every 50 ms from ``/proc``, the peak of the
whole process tree's summed RSS and PSS (PSS counts pages shared with the workers once).

Usage::

    OMP_NUM_THREADS=1 python bench/stream_rss.py [--cases stream_w2,stream_w0,whole] [--steps 60]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


# --- the folder ---------------------------------------------------------------------------------

def make_folder(root: Path, classes: int, per_class: int, size: int) -> Path:
    """``root/folder/c<k>/<i>.jpg``; reused when complete (a marker file names its shape)."""
    from PIL import Image

    folder = root / "folder"
    marker = folder / ".complete"
    want = f"{classes}x{per_class}x{size}"
    if marker.is_file() and marker.read_text() == want:
        return folder
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = folder / f"c{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (3,))
        for i in range(per_class):
            coarse = rng.integers(0, 256, (size // 8, size // 8, 3)).astype(np.float32)
            img = np.kron(coarse, np.ones((8, 8, 1), np.float32)) * 0.6 + base * 0.4
            img += rng.normal(0, 12, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
    marker.write_text(want)
    return folder


def make_npz(folder: Path, path: Path) -> Path:
    """The folder's pixels as ``x`` (uint8, N x 3 x H x W) and ``y``: the 'loaded whole' input."""
    from nft_fast.data import image_folder

    if not path.is_file():
        x, y, _ = image_folder(folder)
        np.savez(path, x=(x * 255).round().to(torch.uint8).numpy(), y=y.numpy())
    return path


# --- one case, in a child process ------------------------------------------------------------------

def child(args) -> None:
    from nft_fast import NFTConfig
    from nft_fast.app.pipeline import purify_to_folder

    cfg = NFTConfig(steps=args.steps, rounds=2, batch_size=args.batch_size, bn_recalibrate=True)
    t0 = time.perf_counter()
    report = purify_to_folder(args.out, checkpoint=args.checkpoint, arch="preactresnet18", data=args.data,
                              workers=args.workers, config=cfg, progress=False, overwrite=True)
    print(json.dumps({"seconds": time.perf_counter() - t0, "clean_samples": report["clean_samples"],
                      "threads": torch.get_num_threads()}))


# --- measuring -----------------------------------------------------------------------------------

def _tree(pid: int) -> list:
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _mem_kib(pid: int) -> tuple:
    try:
        rss = pss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
        return rss, pss
    except (OSError, ValueError):
        return 0, 0


def _hwm_kib(pid: int) -> int:
    """The process's own peak RSS so far (``VmHWM``)."""
    try:
        return next(int(ln.split()[1]) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if ln.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return 0


def measure(cmd: list, env: dict) -> dict:
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"rss": 0, "pss": 0, "procs": 0, "main": 0, "worker": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = _tree(p.pid)
            mem = [_mem_kib(q) for q in pids]
            peak["rss"] = max(peak["rss"], sum(m[0] for m in mem))
            peak["pss"] = max(peak["pss"], sum(m[1] for m in mem))
            peak["procs"] = max(peak["procs"], len(pids))
            peak["main"] = max(peak["main"], _hwm_kib(p.pid))
            peak["worker"] = max([peak["worker"], *(_hwm_kib(q) for q in pids[1:])])
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    t.join()
    if p.returncode != 0:
        sys.stderr.write(out[-3000:] + err[-3000:])
        raise SystemExit(f"stream_rss: {' '.join(map(str, cmd[:6]))} ... failed (exit {p.returncode})")
    info = json.loads(out.strip().splitlines()[-1])
    return {"peak_rss_mib": ru.ru_maxrss / 1024, "main_peak_rss_mib": peak["main"] / 1024,
            "worker_peak_rss_mib": peak["worker"] / 1024, "tree_peak_rss_mib": peak["rss"] / 1024,
            "tree_peak_pss_mib": peak["pss"] / 1024, "processes": peak["procs"], **info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp/nft_stream_rss")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=128)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--cases", default="stream_w2,stream_w0,whole")
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--tag", default=None, help="output stem (default stream_rss_cpu_<date>)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from nft_fast.io import save_state_dict
    from nft_fast.models import build

    root = Path(args.root)
    t0 = time.perf_counter()
    folder = make_folder(root, args.classes, args.per_class, args.size)
    n = args.classes * args.per_class
    disk = sum(f.stat().st_size for f in folder.rglob("*.jpg"))
    print(f"folder: {folder} ({n} JPEG images, {args.size}x{args.size}, {disk / 2**20:.0f} MiB; "
          f"{time.perf_counter() - t0:.0f} s)", flush=True)
    torch.manual_seed(0)
    ckpt = root / "model.safetensors"
    save_state_dict(build("preactresnet18", num_classes=args.classes, in_channels=3, width=8,
                          image_size=args.size).state_dict(), ckpt)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cases = [c for c in args.cases.split(",") if c]
    rows = []
    for case in cases:
        if case == "whole":
            data, workers = make_npz(folder, root / "folder.npz"), 0
        elif case.startswith("stream_w"):
            data, workers = folder, int(case[len("stream_w"):])
        else:
            raise SystemExit(f"unknown case {case!r}")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", str(data), "--checkpoint", str(ckpt),
               "--out", str(root / f"out_{case}"), "--workers", str(workers), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)]
        row = {"case": case, "workers": workers, **measure(cmd, env)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    stem = args.tag or f"stream_rss_cpu_{date}"
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "cores": os.cpu_count(), "omp_num_threads": env["OMP_NUM_THREADS"], "torch": torch.__version__,
               "python": platform.python_version()}
    try:
        machine["cpu"] = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                              if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    setup = {"images": n, "classes": args.classes, "per_class": args.per_class, "size": args.size, "format": "JPEG q90",
             "folder_mib": disk / 2**20, "model": "PreActResNet-18 width 8, random weights",
             "config": f"reference preset, steps {args.steps}, rounds 2, batch {args.batch_size}, bn_recalibrate"}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps({"machine": machine, "setup": setup, "rows": rows}, indent=2) + "\n")
    names = {"stream_w2": "streamed, 2 workers", "stream_w0": "streamed, main process", "whole": "loaded whole (.npz)"}
    lines = [
        f"# Peak memory: purifying from a {n:,}-image folder ({date})", "",
        f"{n:,} JPEG images ({args.classes} classes x {args.per_class}, {args.size}x{args.size} RGB, "
        f"{disk / 2**20:.0f} MiB on disk), {setup['model']}, {setup['config']} (`nft_fast.app.pipeline.purify_to_folder`, "
        "one fresh process per case, `bench/stream_rss.py`).", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, CPU capability {machine['cpu_capability']}, "
        f"OMP_NUM_THREADS={machine['omp_num_threads']}, torch {machine['torch']}, Python {machine['python']}.", "",
        "| case | peak RSS, ru_maxrss (MiB) | main process VmHWM (MiB) | one worker VmHWM (MiB) "
        "| tree peak RSS (MiB) | tree peak PSS (MiB) | processes | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        worker = f"{r['worker_peak_rss_mib']:.0f}" if r["workers"] else "-"
        lines.append(f"| {names.get(r['case'], r['case'])} | {r['peak_rss_mib']:.0f} | {r['main_peak_rss_mib']:.0f} | "
                     f"{worker} | {r['tree_peak_rss_mib']:.0f} | {r['tree_peak_pss_mib']:.0f} | {r['processes']} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", "Peak RSS: `os.wait4`'s `ru_maxrss`, the largest peak of any single process of the case (the main "
              "process or one of its DataLoader workers). VmHWM: each process's own peak RSS from `/proc/<pid>/status`, "
              "sampled every 50 ms (the last sample before exit; the kernel can leave it below the true peak "
              "when memory is returned with madvise, so `ru_maxrss` is the peak to quote). Tree: RSS and PSS of the main "
              "process and its "
              "workers summed, sampled every 50 ms (a short spike between samples is missed; RSS counts the pages "
              "a worker shares with the main process in both, PSS splits them).", ""]
    (results / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {results / stem}.md/.json")


if __name__ == "__main__":
    main()
