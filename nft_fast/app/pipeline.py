"""Purify a checkpoint (or a harness run folder) into an output folder: the purified model, its
masks and a report. The command line's ``purify`` and the demo are thin wrappers around
:func:`purify_to_folder`."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .. import models
from ..config import NFTConfig
from ..data import ArrayDataset, DataError, check_clean_set, image_folder, load_arrays, per_class
from ..evaluation import evaluate
from ..io import load_into, load_state_dict, save_state_dict
from ..machine import machine_info
from ..masks import MaskSite, attach_masks, fold_masks, mask_sites
from ..ops import set_backend
from ..purifier import PurifyResult, purify, scan_kwargs
from ..trigger import backdoor_likely, scan
from .report import write_report

PathLike = Union[str, os.PathLike]
OUTPUTS = ("purified.safetensors", "masks.safetensors", "report.json", "report.md")


class UsageError(ValueError):
    """A problem with what the user asked for; the command line reports it in one line, exit code 2."""


@dataclass
class Inputs:
    """What a purification starts from: the model, its clean set and the evaluation sets."""

    model: nn.Module
    arch: str
    arch_kwargs: Dict[str, Any]
    x: torch.Tensor
    y: torch.Tensor
    test: Optional[DataLoader]
    poison: Optional[DataLoader]


def check_out_dir(out: Path, inputs: Sequence[Optional[PathLike]]) -> None:
    """Create ``out``, check that it can be written, and that no output would overwrite an input."""
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


def _loader(*tensors, batch_size: int = 512) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def _read_set(path: PathLike, grey: bool = False):
    """``(x, y, y_target or None)`` from an .npz/.safetensors file or an ImageFolder directory."""
    if Path(path).is_dir():
        x, y, _ = image_folder(path, grey=grey)
        return x, y, None
    return load_arrays(path)


def _load_eval_set(path: PathLike, what: str, like: torch.Tensor):
    x, y, yt = _read_set(path, grey=like.shape[1] == 1)
    if not torch.isfinite(x).all():
        raise DataError(f"the {what} ({path}) has NaN/inf values")
    if x.shape[1:] != like.shape[1:]:
        raise DataError(f"the {what} ({path}) has samples of shape {tuple(x.shape[1:])} (channels first), "
                        f"the clean set {tuple(like.shape[1:])}")
    return x, y, yt


def inputs_from_files(checkpoint: Optional[PathLike], arch: Optional[str], data: Optional[PathLike],
                      test_data: Optional[PathLike] = None, poison_data: Optional[PathLike] = None,
                      target: int = 0) -> Inputs:
    """Model, clean set and evaluation loaders from a checkpoint, an architecture name and data files."""
    missing = [f"--{n}" for n, v in (("checkpoint", checkpoint), ("arch", arch), ("data", data)) if not v]
    if missing:
        raise UsageError(f"give --run DIR, or all of --checkpoint, --arch and --data (missing {', '.join(missing)})")
    if arch not in models.ARCHS:
        raise UsageError(f"unknown --arch {arch!r}; known: {', '.join(sorted(models.ARCHS))}")
    state = load_state_dict(checkpoint)
    kw = models.infer_kwargs(arch, state)
    x, y, _ = _read_set(data, grey=kw.get("in_channels") == 1)
    kw = dict(dict(num_classes=10, in_channels=x.shape[1], width=64, image_size=x.shape[-1]), **kw)
    if x.shape[1] != kw["in_channels"]:
        raise DataError(f"the clean set has {x.shape[1]} channels but the checkpoint expects {kw['in_channels']}")
    model = models.build(arch, **kw)
    load_into(model, state, f"checkpoint {checkpoint} (--arch {arch})")
    test = poison = None
    if test_data:
        xt, yt, _ = _load_eval_set(test_data, "test set", x)
        test = _loader(xt, yt)
    if poison_data:
        xp, yp, ytp = _load_eval_set(poison_data, "poisoned test set", x)
        poison = _loader(xp, yp, ytp if ytp is not None else torch.full_like(yp, target))
    return Inputs(model, arch, kw, x, y, test, poison)


def inputs_from_run(run: PathLike, data_dir: Optional[PathLike] = None,
                    checkpoint: Optional[PathLike] = None) -> Inputs:
    """Model (or ``checkpoint`` in its place), clean set and test sets of a ``train-backdoor`` run folder."""
    from ..harness.runs import load_run, poison_loader

    loaded = load_run(run, data_dir, checkpoint=checkpoint)
    x, y = loaded.data.clean
    kw = dict(num_classes=loaded.data.num_classes, width=loaded.spec.width)
    return Inputs(loaded.model, loaded.spec.arch, kw, x, y, loaded.data.test_loader(),
                  poison_loader(loaded.attack, loaded.data))


def _attach(model: nn.Module, arch: str, exclude: Optional[Sequence[str]], neurons: bool) -> Tuple[tuple, List[MaskSite]]:
    exclude = tuple(exclude) if exclude is not None else models.default_exclude(arch)
    attach_masks(model, exclude=exclude, neurons=neurons)
    sites = mask_sites(model)
    if not sites:
        hint = "" if neurons else " (try --neurons to mask Linear/Conv outputs)"
        raise UsageError(f"the model has nothing to mask: no affine norm layers{hint}"
                         f"{' after --exclude ' + ' '.join(exclude) if exclude else ''}")
    return exclude, sites


def _signal(result: PurifyResult, plain: nn.Module, x: torch.Tensor, y: torch.Tensor,
            cfg: NFTConfig) -> Optional[dict]:
    """The poison-free signal: the purifier's trigger scan repeated on the purified model."""
    scan0 = next((h["scan"] for h in result.history if "scan" in h), None)
    if scan0 is None:
        return None
    after_scan = scan(plain, x, y, **scan_kwargs(cfg)).summary()
    return {"before": scan0, "after": after_scan, "backdoor_likely": backdoor_likely(scan0, after_scan)}


def purify_to_folder(
    out: PathLike,
    *,
    run: Optional[PathLike] = None,
    checkpoint: Optional[PathLike] = None,
    arch: Optional[str] = None,
    data: Optional[PathLike] = None,
    test_data: Optional[PathLike] = None,
    poison_data: Optional[PathLike] = None,
    target: int = 0,
    per_class_k: Optional[int] = None,
    exclude: Optional[Sequence[str]] = None,
    neurons: bool = False,
    augment: bool = False,
    data_dir: Optional[PathLike] = None,
    config: Optional[NFTConfig] = None,
    backend: str = "auto",
    progress: bool = True,
    title: str = "NFT purification",
) -> Dict[str, Any]:
    """Purify a model and write ``purified.safetensors``, ``masks.safetensors``, ``report.json``,
    ``report.md`` and plots into ``out``; returns the report.

    The model and data come from a ``train-backdoor`` run folder (``run``, optionally with
    ``checkpoint`` in place of its model) or from ``checkpoint`` + ``arch`` + ``data`` (with
    optional ``test_data`` / ``poison_data`` for ACC / ASR / RA). ``per_class_k`` keeps k clean
    samples per class (drawn with ``config.seed``); ``exclude`` names modules left unmasked
    (default: the architecture's stem norm). Checkpoints are loaded without executing code.
    """
    cfg = config or NFTConfig()
    out = Path(out)
    check_out_dir(out, [checkpoint, data, test_data, poison_data, Path(run) / "model.safetensors" if run else None])
    ins = (inputs_from_run(run, data_dir, checkpoint) if run
           else inputs_from_files(checkpoint, arch, data, test_data, poison_data, target))
    x, y, num_classes = ins.x, ins.y, ins.arch_kwargs["num_classes"]
    check_clean_set(x, y, num_classes)
    if per_class_k is not None:
        idx = per_class(y, per_class_k, cfg.seed)
        x, y = x[idx], y[idx]
    exclude, sites = _attach(ins.model, ins.arch, exclude, neurons)
    if backend != "auto":
        set_backend(backend)
    test, poison = ins.test, ins.poison
    before = evaluate(ins.model, test, poison) if (test or poison) else {}
    result = purify(ins.model, ArrayDataset(x, y, augment=augment), cfg, num_classes=num_classes, inplace=True,
                    test_loader=test, poison_loader=poison, progress=progress)
    plain = fold_masks(result.model)
    after = evaluate(plain, test, poison) if (test or poison) else {}
    save_state_dict(plain.state_dict(), out / "purified.safetensors")
    save_state_dict({s.name + ".neuron_mask": s.mask.detach() for s in sites}, out / "masks.safetensors")
    report = {
        "checkpoint": str(checkpoint or Path(run) / "model.safetensors"), "run": None if run is None else str(run),
        "arch": ins.arch, "arch_kwargs": ins.arch_kwargs, "exclude": list(exclude), "clean_samples": int(x.shape[0]),
        "samples_per_class": result.samples_per_class, "config": cfg.to_dict(),
        "mask_layers": len(sites), "mask_entries": sum(s.numel for s in sites),
        "before": before, "after": dict(after, seconds=result.seconds), "history": result.history,
        "outputs": {"model": str(out / "purified.safetensors"), "masks": str(out / "masks.safetensors")},
        "machine": machine_info(),
    }
    signal = _signal(result, plain, x, y, cfg)
    if signal is not None:
        report["signal"] = signal
    masks = {s.name: s.mask.detach().cpu().numpy() for s in sites}
    write_report(out, report, masks, [cfg.floor(s.layer) for s in sites], title=title)
    return report
