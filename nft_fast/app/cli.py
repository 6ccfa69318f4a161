"""``nft-fast`` command line: train a backdoored model, purify it, evaluate, demo, grid."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from .. import distributed, models
from ..config import PRESETS, NFTConfig
from ..evaluation import evaluate
from ..machine import machine_info
from ..ops import BackendUnavailable
from .pipeline import UsageError, check_metrics, check_out_dir, inputs_from_files, purify_to_folder
from .report import metrics_table


def _add_cfg_args(p: argparse.ArgumentParser) -> None:
    d = NFTConfig()
    g = p.add_argument_group("NFT hyper-parameters (defaults: the preset's; the reference preset is the paper's "
                             "settings)")
    g.add_argument("--preset", choices=tuple(PRESETS), default="reference",
                   help="reference: the paper's NFT; strong: + trigger unlearning (docs/purification.md)")
    # None = the preset's value: a default here would silently replace it (strong: 400 steps, 2 rounds)
    g.add_argument("--steps", type=int, default=None, help=f"mask-learning steps (reference: {d.steps})")
    g.add_argument("--rounds", type=int, default=None, help=f"learning-rate restarts (reference: {d.rounds})")
    g.add_argument("--batch-size", type=int, default=None, help=f"(reference: {d.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"(reference: {d.lr})")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)
    g.add_argument("--backend", choices=("auto", "torch", "cpp", "cuda", "triton"), default="auto")


def _cfg_from(args) -> NFTConfig:
    given = {k: getattr(args, k) for k in ("steps", "rounds", "batch_size", "lr") if getattr(args, k) is not None}
    try:
        return NFTConfig.preset(args.preset, seed=args.seed, precision=args.precision, **given)
    except ValueError as e:
        names = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())
        raise UsageError(f"{e} (--preset {args.preset}{', ' + names if names else ''})") from None


def run_purify(args: argparse.Namespace, title: str = "NFT purification") -> dict:
    """:func:`~nft_fast.app.pipeline.purify_to_folder` with the ``purify`` command's arguments."""
    return purify_to_folder(
        args.out, run=args.run, checkpoint=args.checkpoint, arch=args.arch, data=args.data, test_data=args.test_data,
        poison_data=args.poison_data, target=args.target, per_class_k=args.per_class, exclude=args.exclude,
        neurons=args.neurons, augment=args.augment, workers=args.workers, data_dir=args.data_dir, config=_cfg_from(args),
        backend=args.backend, progress=not args.no_progress, title=title, resume=args.resume, overwrite=args.overwrite,
        backdoorbench=getattr(args, "backdoorbench", None), trust_pickle=getattr(args, "trust_pickle", False))


def cmd_purify(args) -> int:
    # under torchrun every rank purifies its share of each batch; rank 0 writes and prints
    with distributed.from_env():
        report = run_purify(args)
    if "rank" in report:
        return 0
    if report["before"]:
        print(metrics_table({"backdoored": report["before"], "NFT purified": report["after"]}))
    print(f"purified model: {report['outputs']['model']}  ({report['mask_layers']} masked layers, "
          f"{report['after']['seconds']:.1f} s); report: {Path(args.out) / 'report.md'}")
    return 0


def _spec_from(args):
    from ..harness.runs import BackdoorSpec

    params = {"target": args.target, "all2all": args.all2all}
    return BackdoorSpec(attack=args.attack, attack_params=params, arch=args.arch, width=args.width, dataset=args.dataset,
                        rate=args.rate, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        clean_fraction=args.clean_fraction, train_subset=args.train_subset)


def cmd_train_backdoor(args) -> int:
    from ..harness.runs import RUN_FILES, check_spec, run_folder, train

    if args.arch not in models.ARCHS:
        raise UsageError(f"unknown --arch {args.arch!r}; known: {', '.join(sorted(models.ARCHS))}")
    check_spec(_spec_from(args), "train-backdoor", lambda f: "--" + f.replace("_", "-"))
    if args.resume and args.attack == "inputaware":
        raise UsageError("--resume: inputaware trains its generators jointly and saves no epoch checkpoints; "
                         "run without --resume")
    out = Path(args.out)
    check_out_dir(out, [], RUN_FILES)
    folder = run_folder(out, resume=args.resume, overwrite=args.overwrite)
    folder.check()
    spec = _spec_from(args)
    run = folder.run(lambda: train(spec, out, args.data_dir, progress=not args.no_progress, folder=folder))
    m = run["metrics"]
    print(metrics_table({f"backdoored ({args.attack})": dict(m, seconds=run["train_seconds"])}))
    print(f"run folder: {out} (model.safetensors, run.json)")
    return 0


def cmd_evaluate(args) -> int:
    from ..harness.runs import load_run, poison_loader

    if args.run:
        run = load_run(args.run, args.data_dir, checkpoint=args.checkpoint)
        m = evaluate(run.model, run.data.test_loader(), poison_loader(run.attack, run.data))
    else:
        if not (args.checkpoint and args.arch and args.test_data):
            raise UsageError("give --run DIR [--checkpoint CKPT], or --checkpoint, --arch and --test-data [--poison-data]")
        ins = inputs_from_files(args.checkpoint, args.arch, args.test_data, args.test_data, args.poison_data,
                                args.target)
        m = evaluate(ins.model, ins.test, ins.poison)
        check_metrics(m, f"evaluating checkpoint {args.checkpoint} on {args.test_data}")
    print(metrics_table({str(args.checkpoint or Path(args.run) / "model.safetensors"): m}))
    if args.json:
        print(json.dumps(m))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), progress=not args.no_progress, data_dir=args.data_dir, preset=args.preset,
             resume=args.resume)
    return 0


def _seeds(args) -> List[int]:
    if args.seeds is None:
        return [args.seed]
    try:
        return [int(v) for v in args.seeds.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None


def cmd_grid(args) -> int:
    from ..harness.grid import run_grid

    split = lambda v: [x for x in (v or "").split(",") if x]  # noqa: E731
    run_grid(args.out, attacks=split(args.attacks), defenses=split(args.defenses), settings=split(args.settings),
             dataset=args.dataset, arch=args.arch, width=args.width, epochs=args.epochs,
             train_subset=args.train_subset, seeds=_seeds(args), signal=split(args.signal),
             signal_steps=args.signal_steps, data_dir=args.data_dir, progress=not args.no_progress)
    return 0


def cmd_info(args) -> int:
    from .. import ops
    from .._build import build_info

    from ..machine import cpu_bf16_warning

    notes = [n for n in (cpu_bf16_warning(),) if n]
    print(json.dumps({"build": build_info(), "machine": machine_info(), "notes": notes, "ops": ops.implementations()},
                     indent=2))
    return 0


def _add_data_dir(p) -> None:
    p.add_argument("--data-dir", default=None, help="folder of the dataset files (default: $NFT_FAST_DATA_DIR or "
                                                    "/usr/share/datasets/fashion-mnist)")


def _add_purify(sub) -> None:
    """The ``purify`` command."""
    p = sub.add_parser("purify", help="purify a checkpoint with a small clean set",
                       description="Learn NFT masks on a clean set, fold them into the weights and write the purified model "
                                   "(purified.safetensors), the masks and a report (JSON, markdown, plots) into --out. "
                                   "Checkpoints are loaded without executing code. Under `torchrun --nproc_per_node N "
                                   "-m nft_fast purify ...` the N processes share each batch (gloo; the same result as "
                                   "one process) and rank 0 writes the outputs.")
    p.add_argument("--run", help="a `train-backdoor` run folder: model, clean set and test sets come from it")
    p.add_argument("--backdoorbench", metavar="DIR",
                   help="a BackdoorBench attack folder (record/<name>/ with attack_result.pt): model, 5%% clean "
                        "training subset and test sets come from it and the original dataset (its data_path, or "
                        "--data-dir); docs/backdoorbench.md")
    p.add_argument("--trust-pickle", action="store_true",
                   help="with --backdoorbench: unpickle attack_result.pt in full, which runs any code it holds "
                        "(needed when it stores PIL images); only for files you trust")
    p.add_argument("--checkpoint", help="state dict: .safetensors, or a torch file (loaded weights_only); "
                                        "with --run, evaluated/purified instead of the run's own model")
    p.add_argument("--arch", help=f"architecture: {', '.join(sorted(models.ARCHS))}")
    p.add_argument("--data", help="clean set: .npz/.safetensors with arrays x (N,C,H,W) and y (N,), or a folder with "
                                  "one sub-folder per class of images, or of clips (a folder of frames or a "
                                  ".pt/.npy/.safetensors file each); a folder is streamed, never loaded whole")
    p.add_argument("--out", required=True, help="output directory (created; outputs already in it are replaced "
                                                "only with --overwrite; inputs are never overwritten)")
    p.add_argument("--test-data", help="clean test set (.npz/.safetensors with x, y) for ACC")
    p.add_argument("--poison-data", help="triggered test set (x, y true labels, optional y_target) for ASR/RA")
    p.add_argument("--target", type=int, default=0, help="attack target class when --poison-data has no y_target")
    p.add_argument("--per-class", type=int, default=None, help="use only k clean samples per class (1: one-shot)")
    p.add_argument("--exclude", nargs="*", default=None, help="module names left unmasked (default: the arch's stem norm)")
    p.add_argument("--neurons", action="store_true", help="also mask Linear/Conv outputs not followed by a norm")
    p.add_argument("--augment", action="store_true", help="random crop (pad 4) + flip on the clean set, as the reference")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="DataLoader worker processes reading a --data folder (default 0: read in the main process)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last round (same inputs and options; the "
                        "result is identical to an uninterrupted run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs already in --out (only those files)")
    p.add_argument("--no-progress", action="store_true")
    _add_data_dir(p)
    _add_cfg_args(p)
    p.set_defaults(func=cmd_purify)


def _add_train_backdoor(sub) -> None:
    """The ``train-backdoor`` command."""
    t = sub.add_parser("train-backdoor", help="train a backdoored model on Fashion-MNIST (CPU-sized)",
                       description="Poison the attacker's split (the defender's clean set is held out, disjoint) and train; "
                                   "writes model.safetensors and run.json (attack, splits, metrics) into --out.")
    t.add_argument("--attack", default="badnets", help="badnets, blend, sig, trojan, wanet, inputaware")
    t.add_argument("--arch", default="preactresnet18")
    t.add_argument("--width", type=int, default=8, help="first-stage channels (64 = the standard network)")
    t.add_argument("--dataset", default="fashion-mnist")
    t.add_argument("--rate", type=float, default=0.1, help="poison rate")
    t.add_argument("--target", type=int, default=0)
    t.add_argument("--all2all", action="store_true")
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--clean-fraction", type=float, default=0.01, help="held out as the defender's clean set")
    t.add_argument("--train-subset", type=int, default=None, help="train on this many attacker samples (CPU time)")
    t.add_argument("--out", required=True, help="run folder (created; a run already in it is replaced only with "
                                                "--overwrite)")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted training in --out from its last epoch (same options)")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    t.add_argument("--no-progress", action="store_true")
    _add_data_dir(t)
    t.set_defaults(func=cmd_train_backdoor)


def _add_evaluate(sub) -> None:
    """The ``evaluate`` command."""
    e = sub.add_parser("evaluate", help="ACC / ASR / RA of a checkpoint",
                       description="Evaluate a run's model (or --checkpoint against a run's test sets), or a checkpoint "
                                   "against .npz test sets.")
    e.add_argument("--run")
    e.add_argument("--checkpoint")
    e.add_argument("--arch")
    e.add_argument("--test-data")
    e.add_argument("--poison-data")
    e.add_argument("--target", type=int, default=0)
    e.add_argument("--json", action="store_true", help="also print the metrics as JSON")
    _add_data_dir(e)
    e.set_defaults(func=cmd_evaluate)


def _add_demo(sub) -> None:
    """The ``demo`` command."""
    d = sub.add_parser("demo", help="end-to-end demo: BadNets on Fashion-MNIST, purified with 1%% clean data",
                       description="Train (or reuse a cached) BadNets PreActResNet-18 on Fashion-MNIST, purify it with NFT "
                                   "on 1%% clean data and print ACC/ASR/RA before and after; writes a report folder.")
    d.add_argument("--out", default="runs/demo", help="report folder (default runs/demo)")
    d.add_argument("--preset", choices=tuple(PRESETS), default="strong",
                   help="NFT configuration (default strong; reference = the paper's settings)")
    d.add_argument("--resume", action="store_true", help="continue an interrupted demo purification in --out")
    d.add_argument("--no-progress", action="store_true")
    _add_data_dir(d)
    d.set_defaults(func=cmd_demo)


def _add_grid(sub) -> None:
    """The ``grid`` command."""
    g = sub.add_parser("grid", help="attacks x defenses table on Fashion-MNIST (one-shot and 1%% clean data)",
                       description="Train (or reuse) one backdoored model per attack, run every defense in one-shot and "
                                   "1%% settings, and write per-attack ACC/ASR/RA with average drops as in the paper's Table 1.")
    g.add_argument("--attacks", default="badnets,blend,trojan,sig,wanet,inputaware")
    g.add_argument("--defenses", default="none,ft,ft_mixup,anp,nft")
    g.add_argument("--settings", default="1pct,oneshot")
    g.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "moving-shapes"),
                   help="moving-shapes: synthetic-motion clips for a video net (--arch r3d18)")
    g.add_argument("--arch", default="preactresnet18")
    g.add_argument("--width", type=int, default=8)
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--train-subset", type=int, default=None)
    g.add_argument("--seeds", default=None, help="comma-separated seeds: one independently trained backdoored model "
                   "per attack and seed; tables give mean, sd and worst over them (default: --seed)")
    g.add_argument("--seed", type=int, default=0, help="one seed (the same as --seeds N)")
    g.add_argument("--signal", default=None, help="defenses (comma-separated, 'none' = the backdoored model) whose "
                   "result gets the poison-free trigger-scan signal")
    g.add_argument("--signal-steps", type=int, default=100, help="trigger synthesis steps per class for --signal")
    g.add_argument("--out", default="docs/grid")
    g.add_argument("--no-progress", action="store_true")
    _add_data_dir(g)
    g.set_defaults(func=cmd_grid)


def _add_info(sub) -> None:
    """The ``info`` command."""
    i = sub.add_parser("info", help="what was built (C++/CUDA extension, Triton) and which backends serve which op",
                       description="Print build_info() and the op/backend table as JSON.")
    i.set_defaults(func=cmd_info)


class _Parser(argparse.ArgumentParser):
    """argparse whose own errors (an unknown option, ``--steps 1e23``) end as every other error
    does: one line ``nft-fast: error: ...``, exit code 2 (see :func:`main`)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="nft-fast", description="Purify backdoored networks with Neural mask Fine-Tuning (NFT).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_purify(sub)
    _add_train_backdoor(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    _add_grid(sub)
    _add_info(sub)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; errors end in one line on stderr and exit code 2, Ctrl-C in one line
    (what was saved, how to continue) and exit code 130."""
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt as e:
        note = " ".join(getattr(e, "note", "").split())
        print(f"nft-fast: interrupted{': ' + note if note else ''}", file=sys.stderr, flush=True)
        return 130
    except (ValueError, OSError, BackendUnavailable, FloatingPointError, MemoryError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__  # always one line
        if isinstance(e, MemoryError):
            msg = f"out of memory ({msg})"
        print(f"nft-fast: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
