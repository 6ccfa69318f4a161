"""Cost of the trigger search against the number of classes: the per-class patch scan
(``nft_fast.trigger.scan``, the ``strong`` preset), the class-agnostic patch search
(``nft_fast.trigger.search``, ``trigger_search="agnostic"``) and the class-agnostic feature
inversion (``nft_fast.inversion.invert``, ``trigger_kind="feature"``), side by side in one run
(``--methods`` picks a subset).

A synthetic task (``toy_images``: K classes, one clean image per class, at least 100 images) and
an untrained zoo ResNet-18: the cost of a search does not depend on what the model learnt. The
scan runs ``--scan-steps`` per class (the preset's 150 by default); where K x steps would take too
long, ``--max-scan-seconds`` stops the scan after the classes it finished and the table gives the
measured seconds per class and the linear extrapolation to all K.

    python bench/classes_scale.py --classes 10 100 1000 --tag classes_scale_cpu_2core_$(date +%Y%m%d)

Output: ``bench/results/<tag>.{md,json}``.
"""
import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def one(k: int, args) -> dict:
    from nft_fast import models
    from nft_fast.harness.datasets import toy_images
    from nft_fast.inversion import invert
    from nft_fast.trigger import search, synthesize

    n = max(100, k)
    x, y = toy_images(n, num_classes=k, size=args.size, seed=0)
    torch.manual_seed(0)
    model = models.build("resnet18", num_classes=k, in_channels=1, width=args.width, image_size=args.size).eval()
    row = {"classes": k, "clean_images": n}
    if "search" in args.methods:
        t0 = time.perf_counter()
        search(model, x, y, restarts=args.restarts, steps=args.scan_steps, batch_size=args.batch_size, seed=0)
        row["search_seconds"] = time.perf_counter() - t0
    if "inversion" in args.methods:
        t0 = time.perf_counter()
        invert(model, x, y, steps=args.inversion_steps, batch_size=args.batch_size, seed=0)
        row["inversion_seconds"] = time.perf_counter() - t0
    if "scan" not in args.methods:
        return row
    t0 = time.perf_counter()
    done = 0
    for c in range(k):  # scan() in the loop form, so a budget can stop it between classes
        synthesize(model, x, y, c, steps=args.scan_steps, batch_size=args.batch_size, seed=0)
        done += 1
        if time.perf_counter() - t0 > args.max_scan_seconds:
            break
    scan_s = time.perf_counter() - t0
    row.update(scan_classes_run=done, scan_seconds=scan_s, scan_seconds_per_class=scan_s / done,
               scan_seconds_all_classes=scan_s / done * k, scan_extrapolated=done < k)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--scan-steps", type=int, default=150, help="per class (the strong preset's trigger_steps)")
    ap.add_argument("--inversion-steps", type=int, default=800, help="generator steps (NFTConfig.inversion_steps)")
    ap.add_argument("--restarts", type=int, default=4, help="agnostic search restarts (NFTConfig.trigger_restarts)")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["scan", "search", "inversion"],
                    help="comma-separated subset of scan,search,inversion")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--max-scan-seconds", type=float, default=120.0)
    ap.add_argument("--tag", default=f"classes_scale_cpu_{date.today():%Y%m%d}")
    args = ap.parse_args()
    from nft_fast.machine import describe, machine_info

    rows = [one(k, args) for k in args.classes]
    machine = machine_info()
    lines = [f"# Trigger search cost against the number of classes ({date.today():%Y-%m-%d})", "",
             f"Machine: {describe(machine)}. Untrained zoo ResNet-18 (width {args.width}), {args.size}x{args.size} "
             f"grey synthetic images, max(100, K) clean images, batch {args.batch_size}. Patch scan: "
             f"{args.scan_steps} steps per class; agnostic search: {args.restarts} x {args.scan_steps} steps; feature "
             f"inversion: {args.inversion_steps} generator steps (+ its identity and mask steps). `*`: extrapolated "
             "from the classes run within the budget; `-`: not run.", "",
             "| classes | scan s / class | scan s, all classes | agnostic search s | inversion s |",
             "|---:|---:|---:|---:|---:|"]

    def cell(r, key, fmt="{:.0f}"):
        return fmt.format(r[key]) if key in r else "-"

    for r in rows:
        star = "*" if r.get("scan_extrapolated") else ""
        lines.append(f"| {r['classes']} | {cell(r, 'scan_seconds_per_class', '{:.2f}')} | "
                     f"{cell(r, 'scan_seconds_all_classes')}{star} | {cell(r, 'search_seconds')} | "
                     f"{cell(r, 'inversion_seconds')} |")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    (out / f"{args.tag}.json").write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
