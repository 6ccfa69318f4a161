"""Backdoor experiments: train a backdoored model on a real dataset, keep everything needed
to rebuild its data (the attacker's split, the defender's disjoint clean set, the clean and
triggered test sets), and load it back for purification and evaluation.

A run folder holds ``model.safetensors``, ``run.json`` (this spec + measured metrics) and,
for attacks with learned triggers, ``attack.safetensors``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from .. import _checks
from .. import data as D
from . import datasets
from .. import models
from ..evaluation import evaluate
from ..io import CheckpointError, check_finite, load_into, load_state_dict, save_state_dict, write_json
from .._loop import check_norm_batch
from ..resume import RunFolder, digest

DATASETS = ("fashion-mnist", "moving-shapes")
#: Upper limit of a run's epochs: schedules take a few hundred; more is a typo (days of CPU time).
MAX_EPOCHS = 10_000
#: The files of a run folder (``attack.safetensors`` only for attacks with learned triggers).
RUN_FILES = ("model.safetensors", "run.json", "attack.safetensors")


@dataclass
class BackdoorSpec:
    """Everything that determines a backdoored model and its data."""

    attack: str = "badnets"
    attack_params: Dict[str, Any] = field(default_factory=dict)  # target, all2all, seed, ...
    arch: str = "preactresnet18"
    width: int = 8
    dataset: str = "fashion-mnist"
    rate: float = 0.1
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    seed: int = 0
    clean_fraction: float = 0.01
    train_subset: Optional[int] = None  # attacker trains on this many samples of its split (CPU time)

    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return f"{self.dataset}_{self.arch}_w{self.width}_{self.attack}_{hashlib.sha256(blob).hexdigest()[:10]}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BackdoorSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def load_dataset(name: str, root=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(x_train, y_train, x_test, y_test, num_classes)``."""
    if name == "fashion-mnist":
        xtr, ytr = datasets.fashion_mnist("train", root)
        xte, yte = datasets.fashion_mnist("test", root)
        return xtr, ytr, xte, yte, 10
    if name == "moving-shapes":  # synthetic-motion clips for the video (R3D) experiments
        xtr, ytr = datasets.moving_shapes(10000, seed=0)
        xte, yte = datasets.moving_shapes(2000, seed=1)
        return xtr, ytr, xte, yte, len(datasets.MOTIONS)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def build_attack(spec: BackdoorSpec, num_classes: int, state: Optional[dict] = None):
    from . import attacks

    params = dict(spec.attack_params)
    params.setdefault("seed", spec.seed)
    attack = attacks.build_attack(spec.attack, num_classes=num_classes, **params)
    if state:
        attack.load_state_dict(state)
    return attack


@dataclass
class RunData:
    """Tensors of one experiment. ``clean`` is the defender's held-out set (disjoint from ``train``)."""

    train: Tuple[torch.Tensor, torch.Tensor]
    clean: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]
    num_classes: int

    def clean_set(self, per_class: Optional[int] = None, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole held-out clean set, or ``per_class`` samples of each class from it."""
        x, y = self.clean
        if per_class is None:
            return x, y
        idx = D.per_class(y, per_class, seed)
        return x[idx], y[idx]

    def test_loader(self, batch_size: int = 512) -> DataLoader:
        return DataLoader(TensorDataset(*self.test), batch_size=batch_size)


def prepare(spec: BackdoorSpec, root=None) -> RunData:
    xtr, ytr, xte, yte, nc = load_dataset(spec.dataset, root)
    attacker, clean = datasets.holdout_split(ytr, spec.clean_fraction, seed=spec.seed)
    if attacker.numel() == 0:
        raise D.DataError(f"clean_fraction {spec.clean_fraction} holds out all {ytr.numel()} training samples of "
                          f"{_where(spec, root)} (at least one per class): none is left to train on")
    if spec.train_subset is not None:
        order = torch.randperm(attacker.numel(), generator=torch.Generator().manual_seed(spec.seed))
        attacker = attacker[order[: spec.train_subset]]
    return RunData((xtr[attacker], ytr[attacker]), (xtr[clean], ytr[clean]), (xte, yte), nc)


def _where(spec: BackdoorSpec, root=None) -> str:
    return f"{spec.dataset} ({datasets.data_dir(root)})" if spec.dataset == "fashion-mnist" else spec.dataset


def poison_loader(attack, data: RunData, batch_size: int = 512) -> DataLoader:
    xp, yp, ytp = attack.poison_test(*data.test)
    return DataLoader(TensorDataset(xp, yp, ytp), batch_size=batch_size)


def build_model(spec: BackdoorSpec, data: RunData) -> nn.Module:
    x = data.test[0]
    return models.build(spec.arch, num_classes=data.num_classes, in_channels=x.shape[1], width=spec.width,
                        image_size=x.shape[-1])


def run_folder(out, resume: bool = False, overwrite: bool = False, log=None) -> RunFolder:
    """A run folder as a command's output folder (:class:`nft_fast.resume.RunFolder`):
    :data:`RUN_FILES`, run.json last, the training state after each epoch in ``.resume/``."""
    return RunFolder(out, RUN_FILES, "run.json", resume=resume, overwrite=overwrite, log=log,
                     where=lambda m: f"after epoch {m.get('round')} of {m.get('rounds')}")


def train(spec: BackdoorSpec, out: Path, root=None, progress: bool = True, folder: Optional[RunFolder] = None) -> dict:
    """Train the backdoored model of ``spec`` into the run folder ``out``; returns run.json's content.

    With ``folder`` (:func:`run_folder` of ``out``), ``out`` is locked while training, the state
    is saved after every epoch (``folder.resume`` continues from it; not for inputaware) and the
    files are moved into place as a set."""
    from .attacks import InputAware, train_backdoored

    out = Path(out)
    data = prepare(spec, root)
    attack = build_attack(spec, data.num_classes)
    if not bool((attack.target_labels(data.test[1]) != data.test[1]).any()):  # ASR and RA count only these
        raise D.DataError(f"the test set of {_where(spec, root)} has no sample whose label differs from the attack's "
                          f"target {attack.target}: ASR and RA would be undefined")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = build_model(spec, data)
    n = data.train[0].shape[0]
    if n < spec.batch_size and not isinstance(attack, InputAware):  # batches are full (drop_last): none at all
        raise D.DataError(f"batch_size {spec.batch_size} is larger than the {n} training samples of {_where(spec, root)}"
                          ": no batch to train on")
    check_norm_batch(model, data.train[0][:1], spec.batch_size, "train")
    checkpoint = None
    if folder is not None:
        folder.fingerprint = {"spec": spec.to_dict(), "training data": digest(*data.train)}
        folder.begin()
        checkpoint = None if isinstance(attack, InputAware) else folder
    t0 = time.perf_counter()
    info = train_backdoored(model, *data.train, attack, rate=spec.rate, epochs=spec.epochs, batch_size=spec.batch_size,
                            lr=spec.lr, seed=spec.seed, progress=progress, checkpoint=checkpoint)
    seconds = time.perf_counter() - t0
    metrics = evaluate(model, data.test_loader(), poison_loader(attack, data))
    run = {"spec": spec.to_dict(), "attack": attack.to_dict(), "num_classes": data.num_classes,
           "train_seconds": seconds, "train_info": info, "metrics": metrics}

    try:  # checked before anything is written
        check_finite(model.state_dict(), "the trained model")
    except CheckpointError as e:
        raise D.DataError(f"training diverged, nothing was written: {e}; lower the learning rate (lr {spec.lr})") from None

    def write_into(d: Path) -> None:
        save_state_dict(model.state_dict(), d / "model.safetensors")
        state = attack.state_dict()
        if state:
            save_state_dict(state, d / "attack.safetensors")
        write_json(d / "run.json", run)  # written last: its presence marks a complete run

    if folder is not None:
        folder.write(write_into)
    else:
        out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no folder behind
        write_into(out)
    return run


@dataclass
class LoadedRun:
    spec: BackdoorSpec
    run: dict
    model: nn.Module
    attack: Any
    data: RunData
    folder: Path


def read_run_json(path: Path) -> Tuple[dict, BackdoorSpec]:
    """run.json's content and its spec, checked (:class:`~nft_fast.data.DataError` naming the
    file and key) before anything is built from it."""
    try:
        run = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise D.DataError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(run, dict) or not isinstance(run.get("spec"), dict):
        raise D.DataError(f"{path} has no \"spec\" object (the backdoor spec `nft-fast train-backdoor` writes)")
    try:
        spec = BackdoorSpec.from_dict(run["spec"])
        check_spec(spec, f"{path}: spec")
    except (TypeError, ValueError) as e:
        raise D.DataError(str(e)) from None
    return run, spec


def check_spec(spec: BackdoorSpec, owner: str, name: Callable[[str], str] = str) -> None:
    """Raise ``ValueError`` naming the field of ``spec`` (as ``name(field)``, e.g. an option)
    that is out of range, before anything is loaded or built."""
    _checks.one_of(name("arch"), spec.arch, tuple(models.ARCHS), owner=owner)
    _checks.one_of(name("dataset"), spec.dataset, DATASETS, owner=owner)
    for f in ("width", "epochs", "batch_size"):
        _checks.positive_int(name(f), getattr(spec, f), owner=owner, hi=MAX_EPOCHS if f == "epochs" else None)
    if spec.train_subset is not None:
        _checks.positive_int(name("train_subset"), spec.train_subset, owner=owner)
    _checks.number(name("clean_fraction"), spec.clean_fraction, 0.0, 1.0, lo_open=True, hi_open=True, owner=owner)
    _checks.number(name("rate"), spec.rate, 0.0, 1.0, owner=owner)
    _checks.number(name("lr"), spec.lr, lo_open=True, owner=owner)
    _checks.seed(name("seed"), spec.seed, owner=owner)
    if not isinstance(spec.attack, str) or not isinstance(spec.attack_params, dict):
        raise ValueError(f"{owner}: attack must be a name and attack_params an object")


def load_run(folder, root=None, checkpoint=None) -> LoadedRun:
    """A run folder back as model (its own checkpoint, or ``checkpoint``), attack and data."""
    folder = Path(folder)
    if not (folder / "run.json").is_file():
        raise D.DataError(f"{folder} is not a backdoor run folder (no run.json); make one with `nft-fast train-backdoor`")
    run, spec = read_run_json(folder / "run.json")
    data = prepare(spec, root)
    state_path = folder / "attack.safetensors"
    attack = build_attack(spec, data.num_classes, load_state_dict(state_path) if state_path.exists() else None)
    try:
        model = build_model(spec, data)
    except ValueError as e:  # sizes from run.json: absurd, or too large for this machine
        raise D.DataError(f"{folder / 'run.json'}: {e}") from None
    ckpt = checkpoint or folder / "model.safetensors"
    load_into(model, load_state_dict(ckpt), f"checkpoint {ckpt} (--arch {spec.arch})")
    return LoadedRun(spec, run, model, attack, data, folder)


def cache_dir() -> Path:
    return Path(os.environ.get("NFT_FAST_CACHE", Path.home() / ".cache" / "nft_fast"))


def cached_run(spec: BackdoorSpec, root=None, progress: bool = True, log=print) -> LoadedRun:
    """Load the run of ``spec`` from the cache, training it first if absent."""
    folder = cache_dir() / "runs" / spec.key()
    if not (folder / "run.json").is_file():
        log(f"training the backdoored model ({spec.attack}, {spec.arch} width {spec.width}, {spec.epochs} epochs) -> {folder}")
        train(spec, folder, root, progress)
    else:
        log(f"reusing the cached backdoored model {folder}")
    return load_run(folder, root)
