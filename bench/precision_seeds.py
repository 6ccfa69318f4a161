"""Purification quality of several step configurations over several seeds, side by side.

Each (precision, backend) configuration purifies the same backdoored model (the demo's cached
run by default) with ``nft-fast purify`` once per seed; the table gives every run's ACC and ASR
and each configuration's per-seed differences to the first one. The fp32 backends differ only in
rounding (same arithmetic, other summation orders), so their spread is the floor under which a
difference between precisions means nothing on one seed.

    python bench/precision_seeds.py --configs fp32:cpp fp32:torch bf16:cpp --seeds 0 1 2 3 4
    python bench/precision_seeds.py --work /tmp/noise --no-run      # only tabulate finished runs

Runs whose folder under ``--work`` already holds a report.json are not repeated. Output:
``bench/results/<tag>.{md,json}``.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def demo_run_dir() -> Path:
    """The demo's cached backdoored model, trained first if the cache lacks it."""
    from nft_fast.app.demo import DEMO_SPEC
    from nft_fast.harness.runs import cache_dir, cached_run

    cached_run(DEMO_SPEC)
    return cache_dir() / "runs" / DEMO_SPEC.key()


def run_one(run_dir: Path, out: Path, precision: str, backend: str, seed: int, preset: str, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "nft_fast", "purify", "--run", str(run_dir), "--preset", preset, "--seed", str(seed),
           "--precision", precision, "--backend", backend, "--out", str(out), "--no-progress"]
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {r.returncode}); see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["fp32:cpp", "fp32:torch", "bf16:cpp"],
                    help="precision:backend pairs; the first is the baseline of the differences")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--preset", default="strong")
    ap.add_argument("--run", type=Path, default=None, help="backdoored run folder (default: the demo's)")
    ap.add_argument("--work", type=Path, default=Path("runs/precision_seeds"), help="folder of the purify runs")
    ap.add_argument("--no-run", action="store_true", help="only tabulate runs already in --work")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--prior", nargs="+", type=Path, default=[],
                    help="results JSON this script wrote before (same preset and run shape): runs missing "
                         "from --work are taken from them; a run in both must give the same ACC / ASR")
    ap.add_argument("--tag", default=f"precision_seeds_{date.today():%Y%m%d}")
    args = ap.parse_args()

    configs = [tuple(c.split(":")) for c in args.configs]
    if any(len(c) != 2 for c in configs):
        raise SystemExit(f"--configs: expected precision:backend pairs, got {args.configs}")
    args.work.mkdir(parents=True, exist_ok=True)
    run_dir = args.run or demo_run_dir()
    res, seen, prior, from_prior, rerun = {}, {}, {}, set(), []
    for f in args.prior:
        pj = json.loads(f.read_text())
        if pj["preset"] != args.preset:
            raise SystemExit(f"--prior {f}: preset {pj['preset']}, not {args.preset}")
        if seen.setdefault("shape", pj["config"]) != pj["config"]:
            raise SystemExit(f"--prior {f}: run shape {pj['config']} differs from {seen['shape']}")
        for key, v in pj["runs"].items():
            prior[key] = (v["acc"], v["asr"], f)
    for seed in args.seeds:
        for prec, backend in configs:
            out = args.work / f"{prec}_{backend}_s{seed}"
            key = f"{prec}:{backend}/s{seed}"
            if not (out / "report.json").exists():
                if key in prior:
                    res[f"{prec}:{backend}", seed] = prior[key][:2]
                    from_prior.add((f"{prec}:{backend}", seed))
                    continue
                if args.no_run:
                    continue
                if out.exists():
                    raise SystemExit(f"{out} exists without a report.json (a failed run?): remove it first")
                print(f"purify {prec} {backend} seed {seed} ...", flush=True)
                run_one(run_dir, out, prec, backend, seed, args.preset, args.threads)
            rep = json.loads((out / "report.json").read_text())
            res[f"{prec}:{backend}", seed] = (100 * rep["after"]["acc"], 100 * rep["after"]["asr"])
            if key in prior:
                now, then = res[f"{prec}:{backend}", seed], prior[key]
                rerun.append(f"{key}: {now[0]:.2f} / {now[1]:.2f} now, {then[0]:.2f} / {then[1]:.2f} in "
                             f"`{then[2].name}`" + ("" if max(abs(now[0] - then[0]), abs(now[1] - then[1])) < 1e-6
                                                    else " (NOT REPRODUCED)"))
            shape = {k: rep["config"][k] for k in ("steps", "rounds", "batch_size", "lr")}
            if seen.setdefault("shape", shape) != shape:
                raise SystemExit(f"{out}: {shape} differs from the other runs' {seen['shape']} in {args.work}")

    names = [f"{p}:{b}" for p, b in configs]
    base = names[0]
    import torch

    from nft_fast.machine import cpu_bf16_warning, describe, machine_info

    torch.set_num_threads(args.threads)  # what each run had (OMP_NUM_THREADS), for the record
    machine, slow_bf16 = machine_info(), cpu_bf16_warning()
    sh = seen.get("shape", {})
    lines = [f"# Purification quality by step configuration ({args.preset} preset: {sh.get('steps')} steps, "
             f"{sh.get('rounds')} rounds, batch {sh.get('batch_size')}, lr {sh.get('lr')}; {date.today():%Y-%m-%d})", "",
             f"Machine: {describe(machine)}."
             + (f" Note: {slow_bf16}." if slow_bf16 and any(p == "bf16" for p, _ in configs) else ""),
             "", f"Backdoored model: `{run_dir}`. ACC / ASR in %; d = configuration minus `{base}` on the same seed."
             + (f" Runs marked * are taken from {', '.join(f'`{f.name}`' for f in args.prior)}; the others ran "
                "now." if from_prior else ""),
             "", "| seed | " + " | ".join(f"{n} ACC / ASR" for n in names) + " | "
             + " | ".join(f"d {n} ACC / ASR" for n in names[1:]) + " |",
             "|---:|" + "---:|" * (2 * len(names) - 1)]
    for seed in args.seeds:
        cells, diffs = [], []
        for n in names:
            v = res.get((n, seed))
            cells.append(f"{v[0]:.2f} / {v[1]:.2f}{'*' if (n, seed) in from_prior else ''}" if v else "-")
            if n != base:
                b = res.get((base, seed))
                diffs.append(f"{v[0] - b[0]:+.2f} / {v[1] - b[1]:+.2f}" if v and b else "-")
        lines.append(f"| {seed} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    lines.append("")
    summary = {}
    for n in names:
        vals = [res[n, s] for s in args.seeds if (n, s) in res]
        if len(vals) < 2:
            continue
        acc, asr = [v[0] for v in vals], [v[1] for v in vals]
        s = {"n": len(vals), "acc_mean": statistics.mean(acc), "acc_sd": statistics.stdev(acc),
             "asr_mean": statistics.mean(asr), "asr_sd": statistics.stdev(asr)}
        if n != base:
            d = [(res[n, x][0] - res[base, x][0], res[n, x][1] - res[base, x][1])
                 for x in args.seeds if (n, x) in res and (base, x) in res]
            s["d_acc"] = [round(a, 2) for a, _ in d]
            s["d_asr"] = [round(b, 2) for _, b in d]
            s["max_abs_d_acc"] = max(abs(a) for a, _ in d)
            s["max_abs_d_asr"] = max(abs(b) for _, b in d)
        summary[n] = s
        extra = (f"; d ACC mean {statistics.mean(s['d_acc']):+.2f}, max |d| {s['max_abs_d_acc']:.2f}; "
                 f"d ASR mean {statistics.mean(s['d_asr']):+.2f}, max |d| {s['max_abs_d_asr']:.2f}") if "d_acc" in s else ""
        lines.append(f"- `{n}` ({s['n']} seeds): ACC {s['acc_mean']:.2f} +- {s['acc_sd']:.2f}, "
                     f"ASR {s['asr_mean']:.2f} +- {s['asr_sd']:.2f}{extra}")
    if rerun:
        lines += ["", "Runs repeated from --prior (same code, same seed: they should agree exactly):", ""]
        lines += [f"- {r}" for r in rerun]
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    (out_dir / f"{args.tag}.json").write_text(json.dumps(
        {"preset": args.preset, "config": sh, "run": str(run_dir), "seeds": args.seeds, "configs": names,
         "runs": {f"{n}/s{s}": {"acc": v[0], "asr": v[1], "prior": (n, s) in from_prior} for (n, s), v in res.items()},
         "repeated": rerun, "summary": summary, "machine": machine},
        indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
