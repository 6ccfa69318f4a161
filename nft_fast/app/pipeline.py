"""Purify a checkpoint (or a harness run folder) into an output folder: the purified model, its
masks and a report. The command line's ``purify`` and the demo are thin wrappers around
:func:`purify_to_folder`."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .. import _checks, distributed, models
from ..config import NFTConfig
from ..data import (ArrayDataset, DataError, check_clean_labels, check_clean_set, check_inputs, check_labels, crop_flip,
                    load_arrays, load_folder, open_folder, per_class)
from ..errors import NFTError
from ..evaluation import evaluate
from ..io import CheckpointError, check_finite, load_into, load_state_dict, save_state_dict
from ..machine import machine_info
from ..masks import MaskSite, attach_masks, fold_masks, mask_sites
from ..ops import get_backend, set_backend
from ..purifier import PurifyResult, find_triggers, gather, purify
from ..resume import RESUME_DIR, RunFolder, digest  # noqa: F401 (RESUME_DIR: re-exported)
from ..trigger import backdoor_likely
from .report import PLOTS, REPORT_FILES, write_report

PathLike = Union[str, os.PathLike]
#: Every file purify_to_folder may write into its output folder.
OUTPUTS = ("purified.safetensors", "masks.safetensors") + REPORT_FILES + PLOTS
#: Written last into the output folder: present, it marks a complete set of outputs.
MARKER = "report.json"


class UsageError(NFTError, ValueError):
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
    clean: Optional[Dataset] = None  # a clean folder, streamed: then x holds its first samples, y every label
    source: Optional[Dict[str, Any]] = None  # where the inputs came from, for the report


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_out_dir(out: PathLike, inputs: Sequence[Optional[PathLike]], outputs: Sequence[str] = OUTPUTS) -> None:
    """Check, creating and writing nothing, that ``out`` can be created (or is a writable
    directory), that each of ``outputs`` can be written there as a file, and that none of them
    would overwrite an input."""
    out = Path(out)
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output directory {out} cannot be written: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {out} cannot be written: {existing} is not writable")
    ins = [Path(p) for p in inputs if p]
    for name in outputs:
        path = out / name
        if any(_same_file(path, i) for i in ins):
            raise UsageError(f"refusing to overwrite the input file {path}: choose another --out")
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise UsageError(f"cannot write the output {path}: it exists and is not a regular file; "
                             "remove it or choose another --out")


def _loader_digest(loader: Optional[DataLoader]) -> Optional[str]:
    if loader is None:
        return None
    ds = loader.dataset
    return digest(*ds.tensors) if isinstance(ds, TensorDataset) else type(ds).__name__


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, test: Optional[DataLoader],
                poison: Optional[DataLoader], cfg: NFTConfig, settings: Dict[str, Any]) -> Dict[str, Any]:
    """What determines a purification's result: digests of the model's state and the data, the
    settings and the config. A run resumes only from a state with the same fingerprint."""
    state = model.state_dict()
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + b"\0" + digest(state[k]).encode())
    return json.loads(json.dumps({
        "model": h.hexdigest(), "clean set": digest(x, y), "test set": _loader_digest(test),
        "poisoned test set": _loader_digest(poison), "settings": settings, "config": cfg.to_dict(),
    }, default=str))


def out_folder(out: PathLike, resume: bool = False, overwrite: bool = False,
               log: Optional[Callable[[str], None]] = None) -> RunFolder:
    """purify_to_folder's output folder (:class:`nft_fast.resume.RunFolder`): :data:`OUTPUTS`,
    report.json last, the state in ``.resume/``."""
    return RunFolder(out, OUTPUTS, MARKER, resume=resume, overwrite=overwrite, log=log)


def _loader(*tensors, batch_size: int = 512) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def _read_set(path: PathLike, grey: bool = False):
    """``(x, y, y_target or None)`` from an .npz/.safetensors file or an image or video folder, read whole."""
    if Path(path).is_dir():
        x, y, _ = load_folder(path, grey=grey)
        return x, y, None
    return load_arrays(path)


def _open_clean(path: PathLike, grey: bool = False) -> Optional[Dataset]:
    """The streamed dataset of a clean image or video folder (:func:`nft_fast.data.open_folder`), None for a file."""
    return open_folder(path, grey=grey) if Path(path).is_dir() else None


def _head(ds: Dataset, n: int = 2) -> torch.Tensor:
    """The first ``n`` inputs of a dataset as a batch (shapes and the architecture checks)."""
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def _load_eval_set(path: PathLike, what: str, like: torch.Tensor, num_classes: int):
    x, y, yt = _read_set(path, grey=like.shape[1] == 1)
    what = f"{what} ({path})"
    if x.shape[0] == 0:
        raise DataError(f"the {what} is empty")
    if x.shape[1:] != like.shape[1:]:
        raise DataError(f"the {what} has samples of shape {tuple(x.shape[1:])} (channels first), "
                        f"the clean set {tuple(like.shape[1:])}")
    check_inputs(x, what)
    check_labels(y, num_classes, what)
    if yt is not None:
        check_labels(yt, num_classes, f"{what} (y_target)")
    return x, y, yt


def _check_fits(model: nn.Module, arch: str, x: torch.Tensor, path: PathLike) -> None:
    """The clean set's samples have the rank the architecture takes and pass through the model
    (one eval-mode forward of two samples: no BatchNorm statistics change)."""
    dims = models.input_dims(arch)
    if x.dim() != dims:
        raise DataError(f"the clean set ({path}) has samples of shape {tuple(x.shape[1:])}: --arch {arch} takes "
                        f"{'(C, T, H, W) clips' if dims == 5 else '(C, H, W) images'}")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"the clean set ({path}) has samples of shape {tuple(x.shape[1:])} that --arch {arch} "
                        f"cannot take: {first}") from None
    finally:
        model.train(was)
    if out.dim() != 2:
        raise DataError(f"--arch {arch} gives outputs of shape {tuple(out.shape)} on the clean set ({path}), "
                        "not (batch, classes) logits")


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
    clean = _open_clean(data, grey=kw.get("in_channels") == 1)  # a folder is streamed, never read whole
    x, y = (_head(clean), clean.targets) if clean is not None else _read_set(data, grey=kw.get("in_channels") == 1)[:2]
    kw = dict(dict(num_classes=10, in_channels=x.shape[1], width=64, image_size=x.shape[-1]), **kw)
    if x.shape[1] != kw["in_channels"]:
        raise DataError(f"the clean set ({data}) has {x.shape[1]} channels but the checkpoint {checkpoint} expects "
                        f"{kw['in_channels']}")
    try:
        model = models.build(arch, **kw)
    except ValueError as e:  # sizes read off the files: absurd, or too large for this machine
        raise CheckpointError(f"checkpoint {checkpoint} (--arch {arch}) with the clean set {data}: {e}") from None
    _checks.index("--target", target, kw["num_classes"])  # after build: a checkpoint of 0 classes is refused there
    load_into(model, state, f"checkpoint {checkpoint} (--arch {arch})")
    _check_fits(model, arch, x, data)
    test = poison = None
    if test_data:
        xt, yt, _ = _load_eval_set(test_data, "test set", x, kw["num_classes"])
        test = _loader(xt, yt)
    if poison_data:
        xp, yp, ytp = _load_eval_set(poison_data, "poisoned test set", x, kw["num_classes"])
        given = ytp is not None
        ytp = ytp if given else torch.full_like(yp, target)
        if not bool((yp != ytp).any()):  # ASR and RA count only these
            raise DataError(f"the poisoned test set ({poison_data}) has no sample whose label differs from its target "
                            f"({'its y_target' if given else f'--target {target}'}): ASR and RA would be undefined")
        poison = _loader(xp, yp, ytp)
    return Inputs(model, arch, kw, x, y, test, poison, clean=clean)


def inputs_from_run(run: PathLike, data_dir: Optional[PathLike] = None,
                    checkpoint: Optional[PathLike] = None) -> Inputs:
    """Model (or ``checkpoint`` in its place), clean set and test sets of a ``train-backdoor`` run folder."""
    from ..harness.runs import load_run, poison_loader

    loaded = load_run(run, data_dir, checkpoint=checkpoint)
    x, y = loaded.data.clean
    kw = dict(num_classes=loaded.data.num_classes, width=loaded.spec.width)
    return Inputs(loaded.model, loaded.spec.arch, kw, x, y, loaded.data.test_loader(),
                  poison_loader(loaded.attack, loaded.data))


def inputs_from_backdoorbench(folder: PathLike, trust_pickle: bool = False, data_dir: Optional[PathLike] = None,
                              seed: int = 0) -> Inputs:
    """Model, clean set and test sets of a BackdoorBench attack folder
    (:func:`nft_fast.harness.backdoorbench.load_backdoorbench`)."""
    from ..harness.backdoorbench import load_backdoorbench

    bb = load_backdoorbench(folder, trust_pickle=trust_pickle, data_dir=data_dir, seed=seed)
    return Inputs(bb.model, bb.arch, bb.arch_kwargs, *bb.clean, _loader(*bb.test), _loader(*bb.poison),
                  source={"backdoorbench": bb.info})


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
    after_scan = find_triggers(plain, x, y, cfg).summary()  # the same search as before purification
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
    workers: int = 0,
    data_dir: Optional[PathLike] = None,
    config: Optional[NFTConfig] = None,
    backend: str = "auto",
    progress: bool = True,
    title: str = "NFT purification",
    resume: bool = False,
    overwrite: bool = False,
    log: Optional[Callable[[str], None]] = None,
    backdoorbench: Optional[PathLike] = None,
    trust_pickle: bool = False,
) -> Dict[str, Any]:
    """Purify a model and write ``purified.safetensors``, ``masks.safetensors``, ``report.json``,
    ``report.md`` and plots into ``out``; returns the report.

    The model and data come from a ``train-backdoor`` run folder (``run``, optionally with
    ``checkpoint`` in place of its model) or from ``checkpoint`` + ``arch`` + ``data`` (with
    optional ``test_data`` / ``poison_data`` for ACC / ASR / RA). ``per_class_k`` keeps k clean
    samples per class (drawn with ``config.seed``); ``exclude`` names modules left unmasked
    (default: the architecture's stem norm). Checkpoints are loaded without executing code.
    A ``data`` folder (image or video: :func:`nft_fast.data.folder_kind`) is streamed, read a
    batch at a time through a DataLoader with ``workers`` worker processes, never whole (its
    inputs are checked as they are read); with the same seed its masks equal those of the same
    samples in a file (``augment`` draws differ with ``workers`` above 0).

    The output folder (:class:`nft_fast.resume.RunFolder`): one run at a time (a lock file;
    :class:`~nft_fast.outdir.Busy` otherwise), the state saved at every round boundary into
    ``out/.resume`` (``resume`` continues from it, bit-identically; a state of other inputs or
    another config is refused), the outputs written into a staging folder and moved into place
    as a set, ``report.json`` last, replacing outputs already there only with ``overwrite``
    (:class:`~nft_fast.resume.FolderError` otherwise). Ctrl-C raises
    :class:`~nft_fast.outdir.Interrupted`, whose ``note`` says what was saved. ``log`` gets the
    messages about resuming and locks (default: stderr).

    ``backdoorbench``: a BackdoorBench attack folder in place of the other inputs (its model,
    a 5% clean training subset of the original dataset in ``data_dir``, its clean and poisoned
    test sets); ``trust_pickle`` unpickles its ``attack_result.pt`` in full (runs code from it).
    """
    cfg = _checks.config(config, "purify_to_folder")
    if not isinstance(workers, int) or isinstance(workers, bool) or not 0 <= workers <= 256:
        raise UsageError(f"--workers must be an integer in 0..256, got {workers!r}")
    if per_class_k is not None:
        _checks.positive_int("per_class_k (--per-class)", per_class_k)
    out = Path(out)
    if trust_pickle and not backdoorbench:
        raise UsageError("--trust-pickle applies only to --backdoorbench")
    if backdoorbench:
        given = [f"--{n.replace('_', '-')}" for n, v in (("run", run), ("checkpoint", checkpoint), ("arch", arch),
                 ("data", data), ("test_data", test_data), ("poison_data", poison_data)) if v]
        if given:
            raise UsageError(f"--backdoorbench brings the model and all data: drop {', '.join(given)}")
        checkpoint = Path(backdoorbench) / "attack_result.pt"
    if run:
        from ..harness.runs import RUN_FILES
    run_files = [Path(run) / n for n in RUN_FILES] if run else []
    check_out_dir(out, [checkpoint, data, test_data, poison_data, *run_files])
    bb = (backdoorbench, trust_pickle) if backdoorbench else None
    world = distributed.world()
    if world is not None:
        if resume:
            raise UsageError(f"--resume continues a single-process purification; run without it under torchrun "
                             f"(world size {world.size})")
        if world.rank != 0:  # computes its shard of every step; rank 0 alone writes
            return _purify_to_folder(None, workers, run, checkpoint, arch, data, test_data, poison_data, target,
                                     per_class_k, exclude, neurons, augment, data_dir, cfg, backend, False, title, bb)
    folder = out_folder(out, resume, overwrite, log)
    folder.check()
    return folder.run(lambda: _purify_to_folder(folder, workers, run, checkpoint, arch, data, test_data, poison_data, target,
                                                per_class_k, exclude, neurons, augment, data_dir, cfg, backend,
                                                progress, title, bb))


def _purify_to_folder(folder: RunFolder, workers, run, checkpoint, arch, data, test_data, poison_data, target, per_class_k,
                      exclude, neurons, augment, data_dir, cfg: NFTConfig, backend, progress, title,
                      bb=None) -> Dict[str, Any]:
    if bb:
        ins, data = inputs_from_backdoorbench(bb[0], bb[1], data_dir, cfg.seed), bb[0]
    else:
        ins = (inputs_from_run(run, data_dir, checkpoint) if run
               else inputs_from_files(checkpoint, arch, data, test_data, poison_data, target))
    x, y, num_classes = ins.x, ins.y, ins.arch_kwargs["num_classes"]
    clean = ins.clean  # a folder: its inputs are checked as purify reads them
    if clean is None:
        check_clean_set(x, y, num_classes, what=f"clean set ({data or run})")
    else:
        check_clean_labels(y, num_classes, what=f"clean set ({data})")
        settings_clean = {"clean folder": clean.digest()}
        clean.transform = crop_flip if augment else None
    if per_class_k is not None:
        try:
            idx = per_class(y, per_class_k, cfg.seed)
        except DataError as e:
            raise DataError(f"--per-class {per_class_k}: {e} (clean set {data or run})") from None
        x, y, clean = (x[idx], y[idx], None) if clean is None else (x, y[idx], Subset(clean, idx.tolist()))
    exclude, sites = _attach(ins.model, ins.arch, exclude, neurons)
    if backend != "auto":
        set_backend(backend)
    test, poison = ins.test, ins.poison
    world = distributed.world()
    clean_data = ArrayDataset(x, y, augment=augment) if clean is None else clean
    if folder is None:  # another rank of a distributed purification: its share of the steps, no outputs
        purify(ins.model, clean_data, cfg, num_classes=num_classes, inplace=True, progress=False, num_workers=workers)
        return {"rank": world.rank, "world_size": world.size}
    folder.fingerprint = fingerprint(ins.model, x, y, test, poison, cfg, {
        "arch": ins.arch, "arch_kwargs": ins.arch_kwargs, "exclude": list(exclude), "neurons": neurons,
        "augment": augment, "per_class": per_class_k, "target": target, "backend": get_backend(),
        **(settings_clean if clean is not None else {})})
    before = evaluate(ins.model, test, poison) if (test or poison) else {}
    out = folder.out
    # the lock is taken once purify has checked its arguments (folder.load, its checkpoint)
    inputs = f"checkpoint {checkpoint or Path(run) / 'model.safetensors'} with the clean set {data or run}"
    try:
        result = purify(ins.model, clean_data, cfg,
                        num_classes=num_classes, inplace=True, test_loader=test, poison_loader=poison,
                        progress=progress, checkpoint=folder, num_workers=workers)
    except FloatingPointError as e:  # e.g. weights so large that the loss overflows
        raise DataError(f"purifying the {inputs}: {e}") from None
    plain = fold_masks(result.model)
    after = evaluate(plain, test, poison) if (test or poison) else {}
    states = {"purified.safetensors": plain.state_dict(),
              "masks.safetensors": {s.name + ".neuron_mask": s.mask.detach() for s in sites}}
    for name, state in states.items():  # checked before anything is written
        try:
            check_finite(state, name)
        except CheckpointError as e:
            raise DataError(f"purification gave non-finite values, nothing was written: {e}; check the {inputs} "
                            "(weights or values so large that they overflow) and the learning rate") from None
    report = {
        "checkpoint": str(checkpoint or Path(run) / "model.safetensors"), "run": None if run is None else str(run),
        "arch": ins.arch, "arch_kwargs": ins.arch_kwargs, "exclude": list(exclude), "clean_samples": int(y.shape[0]),
        "samples_per_class": result.samples_per_class, "config": cfg.to_dict(),
        "mask_layers": len(sites), "mask_entries": sum(s.numel for s in sites),
        "before": before, "after": dict(after, seconds=result.seconds), "history": result.history,
        "outputs": {"model": str(out / "purified.safetensors"), "masks": str(out / "masks.safetensors")},
        "machine": machine_info(),
        "distributed": {"world_size": 1} if world is None else {"world_size": world.size, "backend": world.backend},
    }
    if ins.source:
        report.update(ins.source)
    if clean is not None and any("scan" in h for h in result.history):  # the signal scans purify's bounded sample
        x, y = gather(clean, num_workers=workers)
    signal = _signal(result, plain, x, y, cfg)
    if signal is not None:
        report["signal"] = signal
    check_metrics(report, f"purifying the {inputs}", ", nothing was written")
    masks = {s.name: s.mask.detach().cpu().numpy() for s in sites}

    def write_into(staging: Path) -> None:
        for name, state in states.items():
            save_state_dict(state, staging / name)
        # the report names the exact files beside it
        report["outputs"].update(model_sha256=_file_sha256(staging / "purified.safetensors"),
                                 masks_sha256=_file_sha256(staging / "masks.safetensors"))
        write_report(staging, report, masks, [cfg.floor(s.layer) for s in sites], title=title)

    folder.write(write_into)
    return report


def nonfinite(obj: Any, where: str = "") -> List[str]:
    """The places (``a.b[0].c``) of NaN/inf numbers in a JSON-like ``obj``."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{where or 'value'} {obj}"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in nonfinite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in nonfinite(v, f"{where}[{i}]")]
    return []


def check_metrics(obj: Any, what: str, note: str = "") -> None:
    """Raise :class:`DataError` when ``obj`` (metrics, a report) holds NaN/inf numbers: they
    are neither printed nor written (JSON has no such values)."""
    bad = nonfinite(obj)
    if bad:
        raise DataError(f"{what} gave non-finite values{note}: {', '.join(bad[:3])} (logits overflow: weights or "
                        "inputs too large?)")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
