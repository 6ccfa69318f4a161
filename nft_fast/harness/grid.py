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

from torch.utils.data import TensorDataset

from ..evaluation import evaluate
from .runs import BackdoorSpec, cached_run, poison_loader
from ..io import write_json, write_text
from ..trigger import scan

SETTINGS = {"1pct": None, "oneshot": 1}


def _table(rows: List[dict], defenses: List[str], setting: str) -> List[str]:
    sel = [r for r in rows if r["setting"] == setting]
    attacks = list(dict.fromkeys(r["attack"] for r in sel))
    head = "| attack | " + " | ".join(f"{d} ACC / ASR / RA" for d in defenses) + " |"
    out = [head, "|---|" + "---:|" * len(defenses)]
    for a in attacks:
        cells = []
        for d in defenses:
            r = next((r for r in sel if r["attack"] == a and r["defense"] == d), None)
            cells.append("-" if r is None else f"{100 * r['acc']:.2f} / {100 * r['asr']:.2f} / {100 * r['ra']:.2f}")
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


def write_tables(rows: List[dict], defenses: List[str], out: Path, command: str, note: str = "",
                 title: str = "Fashion-MNIST") -> None:
    md = [f"# {title} backdoor grid", "",
          "Per cell: ACC / ASR / RA in %. `none` is the backdoored model. Last row: average ASR drop / ACC drop in "
          "points over the attacks (the paper's Table 1 reports 95.56 / 1.81 for NFT on CIFAR-10).", "",
          f"Regenerate: `{command}`", ""] + ([note, ""] if note else [])
    for setting in dict.fromkeys(r["setting"] for r in rows):
        n = next(r["clean_samples"] for r in rows if r["setting"] == setting)
        md += [f"## {setting} ({n} clean images)", ""] + _table(rows, defenses, setting) + [""]
    sig = [r for r in rows if "trigger_anomaly" in r]
    if sig:
        md += ["## poison-free signal (trigger scan of the defended model) next to ASR", "",
               "Anomaly index of the smallest synthesized trigger (Neural Cleanse MAD rule: above 2 = a class is "
               "reachable with an abnormally small trigger, i.e. a backdoor is likely still there) and its class.", "",
               "| attack | setting | defense | anomaly before (suspect) | ASR % after | anomaly after | suspect after | "
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
        cells = [next((f"{r['seconds']:.0f}" for r in rows if (r["attack"], r["setting"], r["defense"]) == (a, s, d)), "-")
                 for d in defenses]
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
    seed: int = 0,
    signal: Sequence[str] = (),
    signal_steps: int = 100,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> List[dict]:
    """Train (or reuse) one backdoored model per attack, run every defense in every clean-data
    setting, and write ``grid.md`` / ``grid.json`` into ``out`` after each row."""
    attacks, defenses, settings, signal = list(attacks), list(defenses), list(settings), list(signal)
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"unknown settings {bad}; known: {', '.join(SETTINGS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    join = ",".join
    command = _grid_command(attacks=join(attacks), defenses=join(defenses), settings=join(settings), dataset=dataset,
                            arch=arch, width=width, epochs=epochs, train_subset=train_subset, seed=seed,
                            signal=join(signal) if signal else None, out=str(out))
    rows: List[dict] = []
    for attack in attacks:
        spec = BackdoorSpec(attack=attack, attack_params={"target": 0}, arch=arch, width=width, dataset=dataset,
                            epochs=epochs, seed=seed, train_subset=train_subset)
        run = cached_run(spec, data_dir, progress=progress)
        test, poison = run.data.test_loader(), poison_loader(run.attack, run.data)
        base = evaluate(run.model, test, poison)
        for setting in settings:
            x, y = run.data.clean_set(per_class=SETTINGS[setting], seed=seed)
            for d in defenses:
                row = _run_row(attack, setting, d, run, x, y, test, poison, base, d in signal, signal_steps, seed,
                               progress)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_tables(rows, defenses, out, command, title=f"{spec.dataset} / {spec.arch} (width {spec.width})")
    return rows
