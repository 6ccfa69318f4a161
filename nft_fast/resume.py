"""purify's state at round boundaries, for ``purify(..., checkpoint=...)``: everything a resumed
run needs to continue as if it had never stopped, so that its masks and history are
bit-identical to an uninterrupted run's.

A :class:`RoundState` after ``round`` rounds (0: after the trigger scan, before round 1) holds,
as tensors, the masks, the momentum buffer, every buffer of the model (BatchNorm statistics),
the unlearning triggers and the RNG states (torch's global generator inside and outside
purify's fork of it, the Purifier's torch generator, the batch sampler's generator; CUDA's
where used), and as JSON the step counter, the Purifier's numpy generator, the history so far,
the scan summary, the triggers' metadata, the config and whatever the caller adds (a fingerprint
of its inputs). :class:`StateFolder` keeps the latest one in a folder as
``round-NNNN.safetensors`` + ``round-NNNN.json``: no pickle, each file written atomically, the
JSON (second) naming the SHA-256 of the tensors, so a state is used only when both are whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

import torch
from torch import nn

from . import inversion
from .config import NFTConfig
from .errors import FolderError, StateError
from .io import _atomic_write, safetensors_header
from .outdir import deferred_interrupt, fsync_dir
from .trigger import Perturbation, Trigger

if TYPE_CHECKING:  # purifier imports this module
    from .purifier import Purifier

__all__ = [
    "RoundState", "StateFolder", "RunFolder", "StateError", "FolderError", "capture", "check_config",
    "restore", "restore_inner_rng", "capture_training", "restore_training", "digest", "FORMAT", "RESUME_DIR",
]

FORMAT = 1
PathLike = Union[str, os.PathLike]


@dataclass
class RoundState:
    """purify's state after ``round`` rounds: ``tensors`` and JSON-able ``meta``."""

    round: int
    tensors: Dict[str, torch.Tensor] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)


# --- what is saved ------------------------------------------------------------------------

def _trigger_state(i: int, t) -> tuple:
    p = f"trigger.{i}."
    if isinstance(t, Trigger):
        return {"type": "patch", "target": t.target, "norm": t.norm, "success": t.success, "kind": t.kind}, \
            {p + "mask": t.mask, p + "pattern": t.pattern}
    if isinstance(t, Perturbation):
        return {"type": "universal", "target": t.target, "norm": t.norm, "success": t.success, "kind": t.kind,
                "value_range": list(t.value_range), "radius": t.radius, "blocks": t.blocks}, {p + "delta": t.delta}
    if isinstance(t, inversion.FeatureTrigger):
        g = t.generator
        first = g.enc1[0]
        meta = {"type": "feature", "target": t.target, "norm": t.norm, "success": t.success, "kind": t.kind,
                "channels": first.in_channels, "dims": 2 if isinstance(first, nn.Conv2d) else 3,
                "width": first.out_channels, "lo": g.lo, "hi": g.hi, "bound": g.bound}
        tensors = {p + "mask": t.mask, **{p + "generator." + k: v for k, v in g.state_dict().items()}}
        return meta, tensors
    raise TypeError(f"cannot save an unlearning trigger of type {type(t).__name__}")


def _trigger_from(i: int, meta: dict, tensors: Dict[str, torch.Tensor], device: torch.device):
    p = f"trigger.{i}."
    kind = meta["type"]
    if kind == "patch":
        return Trigger(meta["target"], tensors[p + "mask"].to(device), tensors[p + "pattern"].to(device),
                       meta["norm"], meta["success"], meta["kind"])
    if kind == "universal":
        return Perturbation(meta["target"], tensors[p + "delta"].to(device), tuple(meta["value_range"]), meta["norm"],
                            meta["success"], meta["kind"], meta.get("radius", 0.0),
                            meta.get("blocks", 0))
    if kind == "feature":
        with torch.random.fork_rng(devices=[]):  # its initialisation draws from the global RNG
            g = inversion.Generator(meta["channels"], meta["dims"], meta["width"], meta["lo"], meta["hi"], meta["bound"])
        g.load_state_dict({k[len(p + "generator."):]: v for k, v in tensors.items() if k.startswith(p + "generator.")})
        g.eval()
        for q in g.parameters():
            q.requires_grad_(False)
        return inversion.FeatureTrigger(g, tensors[p + "mask"], meta["norm"], meta["success"], meta["target"],
                                        meta["kind"])
    raise StateError(f"unknown trigger type {kind!r} in a saved state")


def capture(purifier: Purifier, batches_gen: torch.Generator, rounds_done: int, history: List[dict], scan: dict,
            seconds: float, outer_rng: torch.Tensor, inner: bool) -> RoundState:
    """The state of ``purify`` after ``rounds_done`` rounds. ``inner``: inside its fork of the
    global RNG (after round 1 and later), whose state is then saved too."""
    tensors: Dict[str, torch.Tensor] = {
        "purifier.mask": purifier._mask, "purifier.momentum": purifier._buf,
        "rng.purifier": purifier._gen.get_state(), "rng.batches": batches_gen.get_state(), "rng.torch_outer": outer_rng,
    }
    dev = purifier.device
    if inner:
        tensors["rng.torch"] = torch.get_rng_state()
        if dev.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(dev)
    for name, b in purifier.model.named_buffers():
        tensors["buffer." + name] = b
    triggers = []
    for i, t in enumerate(purifier.triggers):
        meta, ts = _trigger_state(i, t)
        triggers.append(meta)
        tensors.update(ts)
    meta = {
        "format": FORMAT, "round": rounds_done, "rounds": purifier.cfg.rounds, "steps_done": purifier.steps_done,
        "config": purifier.cfg.to_dict(), "numpy_rng": purifier._rng.bit_generator.state,
        "trigger_weight": purifier.trigger_weight, "triggers": triggers, "scan": scan, "history": history,
        "seconds": seconds,
    }
    # a snapshot: later steps change the tensors in place
    return RoundState(rounds_done, {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()},
                      json.loads(json.dumps(meta, default=float)))


def check_config(state: RoundState, cfg: NFTConfig) -> None:
    """:class:`StateError` naming the fields where ``state`` was saved with another config."""
    saved, now = state.meta.get("config", {}), json.loads(json.dumps(cfg.to_dict(), default=float))
    diff = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        raise StateError(f"the saved state was made with another config ({'; '.join(diff[:6])})")


def restore(purifier: Purifier, state: RoundState, batches_gen: torch.Generator) -> dict:
    """Put ``purifier`` (its model, masks, momentum, generators, triggers) and the sampler's
    generator back into ``state``; sets torch's global RNG to its state outside purify's fork.
    Returns the scan summary."""
    t, meta = state.tensors, state.meta
    check_config(state, purifier.cfg)

    def put(dst: torch.Tensor, name: str) -> None:
        src = t.get(name)
        if src is None or src.shape != dst.shape or src.dtype != dst.dtype:
            got = "missing" if src is None else f"{src.dtype} {tuple(src.shape)}"
            raise StateError(f"the saved state does not fit the model: {name} is {got}, the model's {dst.dtype} "
                             f"{tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(src)

    buffers = dict(purifier.model.named_buffers())
    extra = [k[len("buffer."):] for k in t if k.startswith("buffer.") and k[len("buffer."):] not in buffers]
    if extra:
        raise StateError(f"the saved state does not fit the model: it has buffers the model has not ({extra[:3]})")
    put(purifier._mask, "purifier.mask")
    put(purifier._buf, "purifier.momentum")
    for name, b in buffers.items():
        put(b, "buffer." + name)
    purifier.steps_done = int(meta["steps_done"])
    purifier._rng.bit_generator.state = meta["numpy_rng"]
    purifier._gen.set_state(t["rng.purifier"])
    batches_gen.set_state(t["rng.batches"])
    purifier.trigger_weight = meta["trigger_weight"]
    purifier.triggers = [_trigger_from(i, m, t, purifier.device) for i, m in enumerate(meta["triggers"])]
    torch.set_rng_state(t["rng.torch_outer"])
    return meta["scan"]


def restore_inner_rng(state: RoundState, device: torch.device) -> None:
    """Inside purify's fork of the global RNG: its state at the boundary (rounds 1 and later)."""
    if "rng.torch" in state.tensors:
        torch.set_rng_state(state.tensors["rng.torch"])
    if "rng.cuda" in state.tensors and device.type == "cuda":
        torch.cuda.set_rng_state(state.tensors["rng.cuda"], device)


# --- on disk --------------------------------------------------------------------------------

_NAME = re.compile(r"round-(\d{4,})\.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StateFolder:
    """The latest :class:`RoundState` of a run in ``folder`` (created on the first save)."""

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)

    def _rounds(self) -> List[int]:
        if not self.folder.is_dir():
            return []
        return sorted((int(m.group(1)) for p in self.folder.iterdir() if (m := _NAME.fullmatch(p.name))), reverse=True)

    def exists(self) -> bool:
        return self.folder.is_dir() and any(self.folder.iterdir())

    def latest_meta(self) -> Optional[dict]:
        """The JSON of the newest complete state (tensors not read), or None."""
        state = self._read(tensors=False)
        return None if state is None else state.meta

    def load(self) -> Optional[RoundState]:
        """The newest complete state, or None if there is none."""
        return self._read(tensors=True)

    def _read(self, tensors: bool) -> Optional[RoundState]:
        from safetensors.torch import load_file

        for r in self._rounds():
            js, st = self.folder / f"round-{r:04d}.json", self.folder / f"round-{r:04d}.safetensors"
            try:
                meta = json.loads(js.read_text())
                if not isinstance(meta, dict) or meta.get("format") != FORMAT or not st.is_file():
                    continue
                if not tensors:
                    return RoundState(r, {}, meta)
                if _sha256(st) != meta.get("tensors_sha256"):
                    continue
                safetensors_header(st)  # well-formed before anything is allocated
                return RoundState(r, load_file(str(st)), meta)
            except (OSError, ValueError, UnicodeDecodeError):
                continue
        return None

    def save(self, state: RoundState) -> None:
        """Write ``state`` (tensors first, then the JSON naming their digest) and drop older ones."""
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        r = state.round
        st, js = self.folder / f"round-{r:04d}.safetensors", self.folder / f"round-{r:04d}.json"
        data = save({k: v.contiguous() for k, v in state.tensors.items()})
        meta = dict(state.meta, tensors_sha256=hashlib.sha256(data).hexdigest())
        with deferred_interrupt():
            _atomic_write(st, lambda f: f.write(data))
            _atomic_write(js, lambda f: f.write((json.dumps(meta, indent=1) + "\n").encode()))
            fsync_dir(self.folder)
            for p in self.folder.iterdir():  # older rounds, and leftovers of a killed write
                if p.name not in (st.name, js.name) and p.is_file():
                    p.unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# --- training at epoch boundaries -------------------------------------------------------------

def capture_training(epochs_done: int, epochs: int, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, seconds: float) -> RoundState:
    """A classifier's training state after ``epochs_done`` epochs (inside its fork of the global
    RNG): weights and buffers, the optimizer's and scheduler's state, the loader's generator."""
    tensors = {"model." + k: v for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    slots = {}
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v
            else:
                slots[f"{idx}.{k}"] = v
    tensors["rng.loader"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"format": FORMAT, "round": epochs_done, "rounds": epochs, "opt_groups": opt_state["param_groups"],
            "opt_slots": slots, "sched": sched.state_dict(), "seconds": seconds}
    return RoundState(epochs_done, {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()},
                      json.loads(json.dumps(meta, default=float)))


def restore_training(state: RoundState, model: nn.Module, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator) -> int:
    """Put a :func:`capture_training` state back (inside the training's RNG fork); returns the
    epochs done."""
    t, meta = state.tensors, state.meta
    own = model.state_dict()
    saved = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
    if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
        raise StateError("the saved training state does not fit the model")
    model.load_state_dict(saved)
    per: Dict[int, Dict[str, Any]] = {}
    for k, v in t.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            per.setdefault(int(idx), {})[name] = v
    for k, v in meta["opt_slots"].items():
        idx, name = k.split(".", 1)
        per.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": per, "param_groups": meta["opt_groups"]})
    sched.load_state_dict(meta["sched"])
    gen.set_state(t["rng.loader"])
    torch.set_rng_state(t["rng.torch"])
    return int(state.round)


# --- a command's output folder ---------------------------------------------------------------

RESUME_DIR = ".resume"


def _rounds_where(meta: dict) -> str:
    k, n = meta.get("round", 0), meta.get("rounds", "?")
    return f"after round {k} of {n}" if k else f"after the trigger scan, before round 1 of {n}"


class RunFolder:
    """A command's hold on its output folder ``out`` (the files ``names``, ``marker`` among them
    written last), from the moment its inputs are known to be good:

    - :meth:`check` (before anything is loaded; again under the lock): no other live run in it,
      outputs already there replaced only with ``overwrite`` (or by ``resume`` of the run that
      was writing them), an interrupted run's state continued with ``resume`` or dropped with
      ``overwrite``, never silently;
    - :meth:`begin` takes the lock (creating ``out``); :meth:`load` / :meth:`save` are the
      ``checkpoint`` protocol of :func:`nft_fast.purifier.purify` and of training: the latest
      state in ``out/.resume``, refused if its ``fingerprint`` differs from the current inputs' and options';
    - :meth:`write` stages the outputs and moves them into place as a set, then drops the state
      and releases the lock; :meth:`run` wraps the work so that Ctrl-C raises
      :class:`~nft_fast.outdir.Interrupted` with :meth:`note` and an error cleans up (:meth:`fail`).
    """

    def __init__(self, out: PathLike, names, marker: str, *, resume: bool = False, overwrite: bool = False,
                 log=None, where=_rounds_where, option: str = "--out") -> None:
        from .outdir import FolderLock, OutputSet

        self.out, self.names, self.marker = Path(out), tuple(names), marker
        self.resume, self.overwrite, self.where, self.option = resume, overwrite, where, option
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        self.fingerprint: Dict[str, Any] = {}
        self.state = StateFolder(self.out / RESUME_DIR)
        self.outputs = OutputSet(self.out, self.names, marker=marker)
        self.lock = FolderLock(self.out, option)
        self.made: List[Path] = []
        self.begun = self.wrote = self.done = False
        self.resumed: Optional[int] = None

    def check(self, locked: bool = False) -> None:
        out, opt = self.out, self.option
        if not out.is_dir():
            return
        if not locked:
            self.lock.check()
        meta = self.state.latest_meta()
        if meta is not None and not (self.resume or self.overwrite):
            raise FolderError(f"{opt} {out} holds the saved state of an interrupted run ({self.where(meta)}): add "
                              "--resume to continue it, or --overwrite to start again")
        old = self.outputs.existing()
        if old and self.resume and meta is None and not self.overwrite:
            raise FolderError(f"{opt} {out} has no interrupted run to resume: it holds the outputs of a finished run "
                              f"({', '.join(old)}); add --overwrite (without --resume) to run again, or choose "
                              f"another {opt}")
        if old and not self.overwrite and not (self.resume and meta is not None):
            raise FolderError(f"{opt} {out} already holds outputs ({', '.join(old)}): add "
                              f"--overwrite to replace them (nothing else in {out} is touched), or choose another {opt}")

    def begin(self) -> None:
        if self.begun:
            return
        d = self.out
        while not d.exists() and d.parent != d:
            self.made.append(d)
            d = d.parent
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock.acquire(self.log)
        self.begun = True
        self.outputs.remove_stale_staging()
        self.check(locked=True)  # again: another run may have finished meanwhile
        if not self.resume and self.state.exists():
            self.state.clear()  # --overwrite: the interrupted run is dropped

    def load(self) -> Optional[RoundState]:
        self.begin()
        saved = self.state.load() if self.resume else None
        if self.resume and saved is None:
            self.log(f"nft-fast: no saved state in {self.state.folder}: starting from the beginning")
        if saved is not None:
            diff = _differences(saved.meta.get("fingerprint", {}), self.fingerprint)
            if diff:
                raise FolderError(f"cannot --resume in {self.out}: its saved state is of another run "
                                  f"({'; '.join(diff)}); start again with --overwrite instead of --resume, or choose "
                                  f"another {self.option}")
            self.resumed = saved.round
            self.log(f"nft-fast: resuming {self.out} {self.where(saved.meta)}")
        return saved

    def save(self, state: RoundState) -> None:
        state.meta["fingerprint"] = self.fingerprint
        self.state.save(state)
        self.wrote = True

    def write(self, write_into) -> None:
        """``write_into(folder)`` writes the outputs into a staging folder; they replace the
        earlier set as a unit, then the saved state is dropped and the lock released."""
        from .outdir import deferred_interrupt

        self.begin()
        write_into(self.outputs.stage())
        with deferred_interrupt():
            self.outputs.commit()
            self.done = True
            self.state.clear()
            self.lock.release()

    def fail(self, exc: BaseException) -> None:
        """After ``exc``: drop the staging folder and the lock; the saved state too when the error
        is one a rerun would meet again (bad values); folders made here if left empty."""
        self.outputs.discard()
        if self.wrote and not self.done and isinstance(exc, (ValueError, TypeError, FloatingPointError)):
            self.state.clear()
        self.lock.release()
        for d in self.made:  # deepest first; only if empty
            try:
                d.rmdir()
            except OSError:
                pass

    def note(self) -> str:
        """One line for Ctrl-C: what was saved and how to continue."""
        if self.done:
            return f"the outputs in {self.out} are complete"
        meta = self.state.latest_meta() if self.begun else None
        if meta is None:
            return f"nothing was saved; {self.out} holds what it held before"
        return (f"the state {self.where(meta)} is saved in {self.state.folder}; run the same command with --resume "
                "to continue")

    def run(self, work):
        """``work()``; Ctrl-C becomes :class:`~nft_fast.outdir.Interrupted` with :meth:`note`, any
        error cleans up first (:meth:`fail`)."""
        from .outdir import Interrupted

        try:
            return work()
        except KeyboardInterrupt:
            self.fail(KeyboardInterrupt())
            raise Interrupted(self.note()) from None
        except BaseException as e:
            self.fail(e)
            raise


def _differences(saved: Dict[str, Any], now: Dict[str, Any]) -> List[str]:
    out = []
    for key in now:
        a, b = saved.get(key), now[key]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"{key}: {', '.join(fields[:4])}")
        else:
            out.append(f"the {key}")
    return out


def digest(*tensors: Optional[torch.Tensor]) -> str:
    """SHA-256 of tensors' dtypes, shapes and bytes (a fingerprint of inputs)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"-")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        if t.numel():  # an empty tensor has no bytes (and no byte view)
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()
