"""``nft-fast`` command line: purify a checkpoint, run the demo, show the build."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader, TensorDataset

from . import models
from .config import NFTConfig
from .data import ArrayDataset, DataError, check_clean_set, load_arrays
from .evaluation import evaluate
from .io import CheckpointError, load_into, load_state_dict, save_state_dict, write_json, write_text
from .ops import BackendUnavailable
from .masks import attach_masks, fold_masks, mask_sites
from .purifier import purify

OUTPUTS = ("purified.safetensors", "masks.safetensors", "report.json", "report.md")


class UsageError(ValueError):
    """A problem with what the user asked for; reported in one line with exit code 2."""


def _add_cfg_args(p: argparse.ArgumentParser) -> None:
    d = NFTConfig()
    g = p.add_argument_group("NFT hyper-parameters (defaults: the reference settings)")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--rounds", type=int, default=d.rounds)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)
    g.add_argument("--backend", choices=("auto", "torch", "cpp", "cuda", "triton"), default="auto")


def _cfg_from(args) -> NFTConfig:
    return NFTConfig(steps=args.steps, rounds=args.rounds, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                     precision=args.precision)


def _check_out_dir(out: Path, inputs: List[Optional[str]]) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".nft-fast-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output directory {out} cannot be written: {e.strerror or e}") from None
    ins = {Path(p).resolve() for p in inputs if p}
    for name in OUTPUTS:
        if (out / name).resolve() in ins:
            raise UsageError(f"refusing to overwrite the input file {out / name}: choose another --out")


def _loader(x, y, yt=None, batch_size: int = 256) -> DataLoader:
    ts = (x, y) if yt is None else (x, y, yt)
    return DataLoader(TensorDataset(*ts), batch_size=batch_size)


def _fmt_pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def markdown_table(rows: Dict[str, Dict[str, float]]) -> str:
    lines = ["| model | ACC % | ASR % | RA % | seconds |", "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        secs = r.get("seconds")
        lines.append(f"| {name} | {_fmt_pct(r.get('acc'))} | {_fmt_pct(r.get('asr'))} | {_fmt_pct(r.get('ra'))} | "
                     f"{'-' if secs is None else f'{secs:.1f}'} |")
    return "\n".join(lines)


def _load_eval_set(path: str, what: str, like: torch.Tensor):
    x, y, yt = load_arrays(path)
    if not torch.isfinite(x).all():
        raise DataError(f"the {what} ({path}) has NaN/inf values")
    if x.shape[1:] != like.shape[1:]:
        raise DataError(f"the {what} ({path}) has samples of shape {tuple(x.shape[1:])} (channels first), the clean set {tuple(like.shape[1:])}")
    return x, y, yt


def run_purify(args) -> dict:
    out = Path(args.out)
    _check_out_dir(out, [args.checkpoint, args.data, args.test_data, args.poison_data])
    if args.arch not in models.ARCHS:
        raise UsageError(f"unknown --arch {args.arch!r}; known: {', '.join(sorted(models.ARCHS))}")
    state = load_state_dict(args.checkpoint)
    x, y, _ = load_arrays(args.data)
    kw = dict(num_classes=10, in_channels=x.shape[1], width=64, image_size=x.shape[-1])
    kw.update(models.infer_kwargs(args.arch, state))
    if x.shape[1] != kw["in_channels"]:
        raise DataError(f"the clean set has {x.shape[1]} channels but the checkpoint expects {kw['in_channels']}")
    model = models.build(args.arch, **kw)
    load_into(model, state, f"checkpoint {args.checkpoint} (--arch {args.arch})")
    check_clean_set(x, y, kw["num_classes"])
    exclude = tuple(args.exclude) if args.exclude is not None else models.default_exclude(args.arch)
    attach_masks(model, exclude=exclude, neurons=args.neurons)
    sites = mask_sites(model)
    if not sites:
        raise UsageError(f"the model has nothing to mask: no affine norm layers{'' if args.neurons else ' (try --neurons to mask Linear/Conv outputs)'}"
                         f"{' after --exclude ' + ' '.join(exclude) if exclude else ''}")
    test = poison = None
    if args.test_data:
        xt, yt, _ = _load_eval_set(args.test_data, "test set", x)
        test = _loader(xt, yt)
    if args.poison_data:
        xp, yp, ytp = _load_eval_set(args.poison_data, "poisoned test set", x)
        poison = _loader(xp, yp, ytp if ytp is not None else torch.full_like(yp, args.target))
    if args.backend != "auto":
        from .ops import set_backend

        set_backend(args.backend)
    cfg = _cfg_from(args)
    evaluate_fn = (lambda m: evaluate(m, test, poison)) if (test or poison) else None
    before = evaluate(model, test, poison) if evaluate_fn else {}
    result = purify(model, ArrayDataset(x, y, augment=args.augment), cfg, num_classes=kw["num_classes"], inplace=True,
                    evaluate_fn=evaluate_fn, progress=not args.no_progress)
    plain = fold_masks(result.model)
    after = evaluate(plain, test, poison) if evaluate_fn else {}
    save_state_dict(plain.state_dict(), out / "purified.safetensors")
    save_state_dict({s.name + ".neuron_mask": s.mask.detach() for s in sites}, out / "masks.safetensors")
    report = {
        "checkpoint": str(args.checkpoint), "arch": args.arch, "arch_kwargs": kw, "exclude": list(exclude),
        "clean_samples": int(x.shape[0]), "samples_per_class": result.samples_per_class, "config": cfg.to_dict(),
        "mask_layers": len(sites), "mask_entries": sum(s.numel for s in sites),
        "before": before, "after": dict(after, seconds=result.seconds), "history": result.history,
        "outputs": {"model": str(out / "purified.safetensors"), "masks": str(out / "masks.safetensors")},
    }
    write_json(out / "report.json", report)
    rows = {"backdoored": before, "NFT purified": report["after"]}
    write_text(out / "report.md", f"# NFT purification of {args.checkpoint}\n\n{markdown_table(rows)}\n")
    return report


def cmd_purify(args) -> int:
    report = run_purify(args)
    if report["before"] or report["after"].get("acc") is not None:
        print(markdown_table({"backdoored": report["before"], "NFT purified": report["after"]}))
    print(f"purified model: {report['outputs']['model']}  ({report['mask_layers']} masked layers, "
          f"{report['after']['seconds']:.1f} s)")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, epochs=args.epochs, progress=not args.no_progress)
    return 0


def cmd_info(args) -> int:
    from . import ops
    from ._build import build_info

    print(json.dumps({"build": build_info(), "ops": ops.implementations()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nft-fast", description="Purify backdoored networks with Neural mask Fine-Tuning (NFT).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("purify", help="purify a checkpoint with a small clean set",
                       description="Learn NFT masks on a clean set, fold them into the weights and write the purified model "
                                   "(purified.safetensors), the masks and a JSON/markdown report into --out. "
                                   "Checkpoints are loaded without executing code.")
    p.add_argument("--checkpoint", required=True, help="state dict: .safetensors, or a torch file (loaded weights_only)")
    p.add_argument("--arch", required=True, help=f"architecture: {', '.join(sorted(models.ARCHS))}")
    p.add_argument("--data", required=True, help="clean set: .npz/.safetensors with arrays x (N,C,H,W) and y (N,)")
    p.add_argument("--out", required=True, help="output directory (created; inputs are never overwritten)")
    p.add_argument("--test-data", help="clean test set (.npz/.safetensors with x, y) for ACC")
    p.add_argument("--poison-data", help="triggered test set (x, y true labels, optional y_target) for ASR/RA")
    p.add_argument("--target", type=int, default=0, help="attack target class when --poison-data has no y_target")
    p.add_argument("--exclude", nargs="*", default=None, help="module names left unmasked (default: the arch's stem BN)")
    p.add_argument("--neurons", action="store_true", help="also mask Linear/Conv outputs not followed by a norm")
    p.add_argument("--augment", action="store_true", help="random crop (pad 4) + flip on the clean set, as the reference")
    p.add_argument("--no-progress", action="store_true")
    _add_cfg_args(p)
    p.set_defaults(func=cmd_purify)

    d = sub.add_parser("demo", help="end-to-end demo: backdoor a small built-in model, purify it, report",
                       description="Train (or reuse) a BadNets-backdoored ResNet-18 on a built-in synthetic task, "
                                   "purify it with NFT and print ACC/ASR/RA before and after.")
    d.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    d.add_argument("--steps", type=int, default=NFTConfig().steps)
    d.add_argument("--epochs", type=int, default=6, help="epochs of backdoor training")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    i = sub.add_parser("info", help="what was built (C++/CUDA extension, Triton) and which backends serve which op",
                       description="Print build_info() and the op/backend table as JSON.")
    i.set_defaults(func=cmd_info)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, BackendUnavailable) as e:
        print(f"nft-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
