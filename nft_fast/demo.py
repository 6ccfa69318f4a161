"""The end-to-end demo: backdoor a small built-in model, purify it with NFT, report.

Until the Fashion-MNIST harness lands, the demo uses a synthetic 10-class 16x16 task
(:func:`nft_fast.data.toy_backdoor_splits`) with the SPEC BadNets trigger.
"""
from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from . import models
from .data import ArrayDataset, toy_backdoor_splits
from .io import load_state_dict, save_state_dict

ARCH, WIDTH = "resnet18", 8


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **{k: v.numpy() for k, v in arrays.items()})
    tmp.replace(path)


def prepare(out: Path, epochs: int = 6, progress: bool = True) -> dict:
    """Write (or reuse) the backdoored checkpoint and the clean / test / poisoned-test sets."""
    from .train import train_classifier

    toy = out / "toy"
    toy.mkdir(parents=True, exist_ok=True)
    files = {k: toy / f"{k}.npz" for k in ("clean", "test", "poison")}
    ckpt = toy / f"backdoored_{ARCH}_w{WIDTH}_e{epochs}.safetensors"
    if not (ckpt.exists() and all(f.exists() for f in files.values())):
        s = toy_backdoor_splits()
        for k in files:
            arrs = dict(zip(("x", "y", "y_target"), s[k]))
            _save_npz(files[k], **arrs)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # weight init: the demo is the same on every machine
            model = models.build(ARCH, num_classes=10, in_channels=1, width=WIDTH, image_size=16)
        train_classifier(model, ArrayDataset(*s["train"]), epochs=epochs, progress=progress)
        save_state_dict(model.state_dict(), ckpt)
        print(f"trained the backdoored model in {time.perf_counter() - t0:.1f} s -> {ckpt}")
    else:
        load_state_dict(ckpt)  # validates the cache
        print(f"reusing the cached backdoored model {ckpt}")
    return {"checkpoint": ckpt, **files}


def run_demo(out: Path, steps: int = 1000, epochs: int = 6, progress: bool = True) -> dict:
    from .cli import cmd_purify

    paths = prepare(out, epochs, progress)
    args = Namespace(
        checkpoint=str(paths["checkpoint"]), arch=ARCH, data=str(paths["clean"]), out=str(out / "purified"),
        test_data=str(paths["test"]), poison_data=str(paths["poison"]), target=0, exclude=None, neurons=False,
        augment=False, no_progress=not progress, steps=steps, rounds=5, batch_size=128, lr=0.05, seed=0,
        precision="fp32", backend="auto",
    )
    cmd_purify(args)
    print(f"report: {out / 'purified' / 'report.md'}")
    return paths
