"""Report folders: JSON, a markdown table and PNG plots (masks per layer with their floor,
mask histogram, ACC/ASR per round)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..io import write_json, write_text
from ..machine import describe


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def metrics_table(rows: Dict[str, Dict[str, float]]) -> str:
    """Markdown table of ACC / ASR / RA (%) and seconds per named model."""
    lines = ["| model | ACC % | ASR % | RA % | seconds |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        secs = r.get("seconds")
        lines.append(f"| {name} | {_pct(r.get('acc'))} | {_pct(r.get('asr'))} | {_pct(r.get('ra'))} | "
                     f"{'-' if secs is None else f'{secs:.1f}'} |")
    return "\n".join(lines)


#: Every file :func:`write_report` may write into a report folder (plots only with matplotlib).
REPORT_FILES = ("report.json", "report.md")
PLOTS = ("masks_heatmap.png", "masks_hist.png", "rounds.png")
HEATMAP, HISTOGRAM, ROUNDS = PLOTS

NO_PLOTS = 'plots skipped: matplotlib is not installed (pip install "nft_fast[report]")'


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_masks(masks: Sequence[np.ndarray], names: Sequence[str], floors: Sequence[float], path: Path) -> None:
    """Heatmap: one row per masked layer (channels sorted ascending), next to its floor mu(l)."""
    plt = _plt()
    width = max(m.size for m in masks)
    grid = np.full((len(masks), width), np.nan)
    for i, m in enumerate(masks):
        v = np.sort(m.ravel())
        grid[i, : v.size] = v
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 0.32 * len(masks) + 2), gridspec_kw={"width_ratios": [4, 1.3]},
                                  sharey=True)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"{i + 1}: {n}" for i, n in enumerate(names)], fontsize=7)
    ax.set_xlabel("channel (sorted by mask value)")
    ax.set_title("learned masks per layer")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    ys = np.arange(len(masks))
    ax2.plot([float(m.min()) for m in masks], ys, "o", ms=3, label="min mask")
    ax2.plot([float(m.mean()) for m in masks], ys, "s", ms=3, label="mean mask")
    ax2.plot(list(floors), ys, "r-", lw=1.2, label="floor mu(l)")
    ax2.set_xlim(-0.02, 1.02)
    ax2.set_xlabel("value")
    ax2.legend(fontsize=7, loc="lower right")
    ax2.set_title("floor")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histogram(masks: Sequence[np.ndarray], path: Path) -> None:
    plt = _plt()
    allm = np.concatenate([m.ravel() for m in masks])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(allm, bins=50, range=(0, 1), color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("mask value")
    ax.set_ylabel("neurons")
    ax.set_title(f"{allm.size} masks: mean {allm.mean():.3f}, {np.mean(allm < 0.5) * 100:.1f}% below 0.5")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rounds(history: List[dict], before: Dict[str, float], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    rounds = [0] + [h["round"] for h in history]
    for key, style in (("acc", "o-"), ("asr", "s-"), ("ra", "^-")):
        if key in before and all(key in h for h in history):
            ax.plot(rounds, [100 * before[key]] + [100 * h[key] for h in history], style, label=key.upper())
    ax.set_xlabel("round (0 = backdoored model)")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_xticks(rounds)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("ACC / ASR / RA after each round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_CONFIDENT = ("the backdoored model's smallest trigger stood out beyond doubt (anomaly index at least "
              "`trigger_confident`), so that patch trigger was unlearned at `trigger_confident_weight`")
_UNIVERSAL_TURNS = "in turn with universal perturbations of the suspect class (`trigger_universal`)"
_MODES = {
    "confident": _CONFIDENT,
    "confident+universal": f"{_CONFIDENT}, {_UNIVERSAL_TURNS} at `trigger_weight`",
    "patch+universal": "the backdoored model's smallest trigger did not stand out beyond doubt, so it was unlearned "
                       f"{_UNIVERSAL_TURNS}, at `trigger_weight`",
    "patch": "the suspect class's patch trigger was unlearned at `trigger_weight`",
}


def _decision(scan: dict) -> str:
    """The line that says how the purifier chose to unlearn, from its scan of the backdoored model."""
    mode = scan.get("trigger_mode")
    if not scan.get("trigger_unlearning", True):
        return "Decision: no anomalous class, so nothing was unlearned (the reference objective ran)."
    return f"Decision (`{mode}`): {_MODES[mode]}." if mode in _MODES else ""


def write_report(out: Path, report: dict, masks: Optional[Dict[str, np.ndarray]] = None,
                 floors: Optional[Sequence[float]] = None, title: str = "NFT purification") -> List[Path]:
    """Write report.json, report.md and the plots; returns the files. Without matplotlib (the
    ``report`` extra) the plots are skipped with a warning and a note in report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    files = [out / "report.json", out / "report.md"]
    rows = {"backdoored": report.get("before", {}), "NFT purified": report.get("after", {})}
    md = [f"# {title}", "", metrics_table(rows), ""]
    if report.get("machine"):
        md += [f"Machine: {describe(report['machine'])}.", ""]
    sig = report.get("signal")
    if sig:
        b, a = sig["before"], sig["after"]
        md += ["## Poison-free signal (trigger scan of the clean set)", "",
               "The smallest trigger found per class; anomaly index above 2 (Neural Cleanse's rule) means one class "
               "is reachable with an abnormally small trigger. After purification a backdoor is likely still there when "
               "the suspect class stays above 2 and its trigger is still under half the backdoored model's median "
               "L1 (every class's trigger grows as the masks close shortcuts, so the easiest class of a clean model "
               "can stand out with a large trigger).", "",
               "| model | anomaly index | suspect class | its trigger L1 | median L1 |", "|---|---:|---:|---:|---:|",
               f"| backdoored | {b['trigger_anomaly']:.2f} | {b['trigger_suspect']} | {b['trigger_norm']:.1f} | "
               f"{b['trigger_median_norm']:.1f} |",
               f"| purified | {a['trigger_anomaly']:.2f} | {a['trigger_suspect']} | {a['trigger_norm']:.1f} | "
               f"{a['trigger_median_norm']:.1f} |", "",
               _decision(b), "",
               ("**Verdict: a backdoor is likely still there (the same class stays anomalous with a small trigger) -- "
                "do not ship this model.**")
               if sig.get("backdoor_likely") else
               "Verdict: no anomalously small trigger left for the suspect class (a large backdoor is unlikely; "
               "this does not prove ASR is 0).", ""]
    try:
        _plt()
        have_plt = True
    except ImportError:
        have_plt = False
        if masks or report.get("history"):
            warnings.warn(f"nft_fast: {NO_PLOTS}", stacklevel=2)
            md += [f"_{NO_PLOTS}_", ""]
    if have_plt and masks:
        names = list(masks)
        plot_masks([masks[n] for n in names], names, floors or [0.0] * len(names), out / HEATMAP)
        plot_histogram(list(masks.values()), out / HISTOGRAM)
        md += [f"![masks per layer]({HEATMAP})", "", f"![mask histogram]({HISTOGRAM})", ""]
        files += [out / HEATMAP, out / HISTOGRAM]
    if have_plt and report.get("history") and report.get("before"):
        plot_rounds(report["history"], report["before"], out / ROUNDS)
        md += [f"![per round]({ROUNDS})", ""]
        files.append(out / ROUNDS)
    write_text(out / "report.md", "\n".join(md))
    return files
