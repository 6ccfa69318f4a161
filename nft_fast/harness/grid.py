"""The attacks x defenses grid on Fashion-MNIST (the paper's Table 1, measured here).

For every attack: train (or reuse) one backdoored model, then run every defense with the
defender's held-out clean set (``1pct``: 1% of the training split, 600 images) and with one
image per class (``oneshot``), and record ACC / ASR / RA. Averages are drops in points
(backdoored minus defended), as in the paper's Table 1.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from torch.utils.data import TensorDataset

from ..evaluation import evaluate
from .runs import BackdoorSpec, cached_run, poison_loader
from ..io import write_json, write_text
from ..outdir import FolderLock, Interrupted
from ..trigger import scan

SETTINGS = {"1pct": None, "oneshot": 1}


def _cell(rs: List[dict]) -> str:
    """ACC / ASR / RA of one model, or mean +- sd over the seeds' models."""
    if len(rs) == 1:
        r = rs[0]
        return f"{100 * r['acc']:.2f} / {100 * r['asr']:.2f} / {100 * r['ra']:.2f}"
    return " / ".join(f"{m:.2f} ± {sd:.2f}" for m, sd, _ in (_stats(rs, k) for k in ("acc", "asr", "ra")))


def _stats(rs: List[dict], key: str) -> tuple:
    """(mean, sample sd, worst) of ``key`` in % over ``rs``; worst is the highest ASR, the lowest ACC / RA."""
    v = np.array([100 * r[key] for r in rs], dtype=np.float64)
    sd = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return float(v.mean()), sd, float(v.max() if key == "asr" else v.min())


def _table(rows: List[dict], defenses: List[str], setting: str) -> List[str]:
    sel = [r for r in rows if r["setting"] == setting]
    attacks = list(dict.fromkeys(r["attack"] for r in sel))
    head = "| attack | " + " | ".join(f"{d} ACC / ASR / RA" for d in defenses) + " |"
    out = [head, "|---|" + "---:|" * len(defenses)]
    for a in attacks:
        cells = []
        for d in defenses:
            rs = [r for r in sel if r["attack"] == a and r["defense"] == d]
            cells.append("-" if not rs else _cell(rs))
        out.append(f"| {a} | " + " | ".join(cells) + " |")
    drops = []
    for d in defenses:
        rs = [r for r in sel if r["defense"] == d]
        if rs:
            asr = sum(100 * (r["asr_before"] - r["asr"]) for r in rs) / len(rs)
            acc = sum(100 * (r["acc_before"] - r["acc"]) for r in rs) / len(rs)
            drops.append(f"{asr:.2f} / {acc:.2f}")
        else:
            drops.append("-")
    out.append("| **avg drop** (ASR / ACC, points) | " + " | ".join(drops) + " |")
    return out


def _seed_table(rows: List[dict], defenses: List[str], setting: str) -> List[str]:
    """Per attack and defense over the seeds' models: ASR and ACC mean, sd and worst, ACC drop."""
    sel = [r for r in rows if r["setting"] == setting]
    out = ["| attack | defense | models (seeds) | ASR mean | ASR sd | ASR worst | ACC mean | ACC sd | ACC worst | "
           "ACC drop mean | RA mean | RA worst |", "|---|---|---|" + "---:|" * 9]
    for a in dict.fromkeys(r["attack"] for r in sel):
        for d in defenses:
            rs = [r for r in sel if r["attack"] == a and r["defense"] == d]
            if not rs:
                continue
            asr, acc, ra = _stats(rs, "asr"), _stats(rs, "acc"), _stats(rs, "ra")
            drop = sum(100 * (r["acc_before"] - r["acc"]) for r in rs) / len(rs)
            seeds = ",".join(str(r.get("seed", 0)) for r in rs)
            out.append(f"| {a} | {d} | {len(rs)} ({seeds}) | {asr[0]:.2f} | {asr[1]:.2f} | {asr[2]:.2f} | {acc[0]:.2f} | "
                       f"{acc[1]:.2f} | {acc[2]:.2f} | {drop:.2f} | {ra[0]:.2f} | {ra[2]:.2f} |")
    return out


def write_tables(rows: List[dict], defenses: List[str], out: Path, command: str, note: str = "",
                 title: str = "Fashion-MNIST") -> None:
    md = [f"# {title} backdoor grid", "",
          "Per cell: ACC / ASR / RA in % (mean ± sd over the backdoored models when there are several seeds). "
          "`none` is the backdoored model. Last row: average ASR drop / ACC drop in points over the attacks "
          "(and seeds; the paper's Table 1 reports 95.56 / 1.81 for NFT on CIFAR-10).", "",
          f"Regenerate: `{command}`", ""] + ([note, ""] if note else [])
    for setting in dict.fromkeys(r["setting"] for r in rows):
        n = next(r["clean_samples"] for r in rows if r["setting"] == setting)
        md += [f"## {setting} ({n} clean images)", ""] + _table(rows, defenses, setting) + [""]
        if len({r.get("seed", 0) for r in rows}) > 1:
            md += [f"### {setting}: over the backdoored models (one per seed; worst = highest ASR, lowest ACC/RA)", ""]
            md += _seed_table(rows, defenses, setting) + [""]
    sig = [r for r in rows if "trigger_anomaly" in r]
    if sig:
        md += ["## poison-free signal (trigger scan of the defended model) next to ASR", "",
               "Anomaly index of the smallest synthesized trigger (Neural Cleanse MAD rule: above 2 = a class is "
               "reachable with an abnormally small trigger, i.e. a backdoor is likely still there) and its class.", "",
               "| attack | setting | defense | anomaly before (class) | ASR % after | anomaly after | flagged class after | "
               "trigger L1 / median after |", "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in sig:
            before = f"{r['anomaly_before']:.2f} ({r['suspect_before']})" if "anomaly_before" in r else "-"
            md.append(f"| {r['attack']} | {r['setting']} | {r['defense']} | {before} | {100 * r['asr']:.2f} | "
                      f"{r['trigger_anomaly']:.2f} | {r['trigger_suspect']} | {r['trigger_norm']:.1f} / "
                      f"{r['trigger_median_norm']:.1f} |")
        md.append("")
    md += ["## seconds per defense (2 CPU cores)", "", "| attack | setting | " + " | ".join(defenses) + " |",
           "|---|---|" + "---:|" * len(defenses)]
    for (a, s) in dict.fromkeys((r["attack"], r["setting"]) for r in rows):
        cells = []
        for d in defenses:
            secs = [r["seconds"] for r in rows if (r["attack"], r["setting"], r["defense"]) == (a, s, d)]
            cells.append(f"{sum(secs) / len(secs):.0f}" if secs else "-")
        md.append(f"| {a} | {s} | " + " | ".join(cells) + " |")
    write_text(out / "grid.md", "\n".join(md) + "\n")
    write_json(out / "grid.json", rows)


def _grid_command(**kw) -> str:
    """The ``nft-fast grid`` command line that reproduces a grid (written above its tables)."""
    return "nft-fast grid " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kw.items() if v is not None)


def _run_row(attack: str, setting: str, defense: str, run, x, y, test, poison, base: dict,
             signal: bool, signal_steps: int, seed: int, progress: bool) -> dict:
    """One defense on one backdoored model and clean set: ACC/ASR/RA, time, scan signals."""
    from .baselines import run_defense

    t0 = time.perf_counter()
    res = run_defense(defense, run.model, TensorDataset(x, y), progress=progress)
    seconds = time.perf_counter() - t0
    model = res.folded() if hasattr(res, "folded") else res.model
    m = evaluate(model, test, poison)
    row = {"attack": attack, "setting": setting, "defense": defense, "clean_samples": int(x.shape[0]),
           "acc": m["acc"], "asr": m["asr"], "ra": m["ra"], "seconds": seconds,
           "acc_before": base["acc"], "asr_before": base["asr"], "ra_before": base["ra"]}
    scan0 = next((h["scan"] for h in res.history if isinstance(h, dict) and "scan" in h), None)
    if scan0:  # the purifier's own scan of the backdoored model
        row["anomaly_before"] = scan0["trigger_anomaly"]
        row["suspect_before"] = scan0["trigger_suspect"]
    if signal:  # the poison-free trust signal, next to the ASR it should track
        sig = scan(model, x, y, steps=signal_steps, seed=seed).summary()
        row.update({k: sig[k] for k in ("trigger_anomaly", "trigger_suspect", "trigger_norm", "trigger_median_norm")})
    return row


#: Row keys naming what, besides the cell (attack, setting, defense, seed), made a row: a rerun
#: into the same folder reuses a finished row only when they match.
SPEC_KEYS = ("dataset", "arch", "width", "epochs", "train_subset")


def _cell_key(r: dict) -> tuple:
    return r.get("attack"), r.get("setting"), r.get("defense"), r.get("seed", 0)


def finished_rows(out: Path, spec: dict) -> dict:
    """The rows of ``out/grid.json`` made with ``spec`` (:data:`SPEC_KEYS`), by cell; rows
    without those keys (written before they were recorded) are not reused."""
    try:
        rows = json.loads((out / "grid.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(rows, list):
        return {}
    return {_cell_key(r): r for r in rows
            if isinstance(r, dict) and all(k in r and r[k] == v for k, v in spec.items())}


def run_grid(
    out: Union[str, os.PathLike],
    *,
    attacks: Sequence[str] = ("badnets", "blend", "trojan", "sig", "wanet", "inputaware"),
    defenses: Sequence[str] = ("none", "ft", "ft_mixup", "anp", "nft"),
    settings: Sequence[str] = ("1pct", "oneshot"),
    dataset: str = "fashion-mnist",
    arch: str = "preactresnet18",
    width: int = 8,
    epochs: int = 5,
    train_subset: Optional[int] = None,
    seeds: Sequence[int] = (0,),
    signal: Sequence[str] = (),
    signal_steps: int = 100,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> List[dict]:
    """Train (or reuse) one backdoored model per attack and seed, run every defense in every
    clean-data setting, and write ``grid.md`` / ``grid.json`` into ``out`` after each row.

    A seed makes an independent backdoored model: it seeds the defender/attacker split, the
    poisoning and the training, and picks the one-shot images. With several seeds the tables
    give mean ± sd and the worst model per attack and defense.

    Rerun with the same ``out`` (after Ctrl-C or a crash), it reuses the finished rows of
    ``grid.json`` for the same attack, setting, defense and seed (and the same dataset, arch,
    width, epochs, train_subset; for a ``signal`` defense, the same ``signal_steps``) and runs
    only the rest. One run at a time per ``out`` (a lock file)."""
    attacks, defenses, settings, signal = list(attacks), list(defenses), list(settings), list(signal)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, at least one, got {seeds}")
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"unknown settings {bad}; known: {', '.join(SETTINGS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out)
    lock.acquire(print)
    rows: List[dict] = []
    try:
        return _grid(out, rows, attacks, defenses, settings, dataset, arch, width, epochs, train_subset, seeds, signal,
                     signal_steps, data_dir, progress)
    except KeyboardInterrupt:
        raise Interrupted(f"{len(rows)} finished rows are in {out / 'grid.json'}; run the same command again to "
                          "continue (finished cells are skipped)") from None
    finally:
        lock.release()


def _grid(out: Path, rows: List[dict], attacks, defenses, settings, dataset, arch, width, epochs, train_subset, seeds,
          signal, signal_steps, data_dir, progress) -> List[dict]:
    join = ",".join
    command = _grid_command(attacks=join(attacks), defenses=join(defenses), settings=join(settings), dataset=dataset,
                            arch=arch, width=width, epochs=epochs, train_subset=train_subset,
                            seeds=join(map(str, seeds)),
                            signal=join(signal) if signal else None, out=str(out))
    made = dict(dataset=dataset, arch=arch, width=width, epochs=epochs, train_subset=train_subset)
    done = finished_rows(out, made)

    def reusable(attack, setting, d, seed) -> Optional[dict]:
        r = done.get((attack, setting, d, seed))
        if r is not None and d in signal and not ("trigger_anomaly" in r and r.get("signal_steps") == signal_steps):
            return None
        return r

    title = f"{dataset} / {arch} (width {width})"
    reused = 0
    for attack in attacks:
        for seed in seeds:
            run = test = poison = base = None
            for setting in settings:
                x = y = None
                for d in defenses:
                    row = reusable(attack, setting, d, seed)
                    if row is None:
                        if run is None:  # only when a cell of this model is left to run
                            spec = BackdoorSpec(attack=attack, attack_params={"target": 0}, arch=arch, width=width,
                                                dataset=dataset, epochs=epochs, seed=seed, train_subset=train_subset)
                            run = cached_run(spec, data_dir, progress=progress)
                            test, poison = run.data.test_loader(), poison_loader(run.attack, run.data)
                            base = evaluate(run.model, test, poison)
                        if x is None:
                            x, y = run.data.clean_set(per_class=SETTINGS[setting], seed=seed)
                        row = _run_row(attack, setting, d, run, x, y, test, poison, base, d in signal, signal_steps,
                                       seed, progress)
                        row.update(made, seed=seed)
                        if d in signal:
                            row["signal_steps"] = signal_steps
                        print(json.dumps(row), flush=True)
                    else:
                        reused += 1
                    rows.append(row)
                    write_tables(rows, defenses, out, command, title=title)
    if reused:
        print(f"grid: reused {reused} finished rows of {out / 'grid.json'}", flush=True)
    return rows
