"""Time one NFT step side by side, as ratios, per workload. Writes JSON + markdown under bench/results/.

    python bench/step.py                                  # every workload (shrunk on CPU)
    python bench/step.py --workloads resnet50,vit_b16 --steps 50 --warmup 10
    python bench/step.py --workloads resnet18_cifar --no-shrink --batch 64 --layouts channels_last,nchw

Workloads (random weights and data; full shapes on CUDA, shrunk on CPU -- the table states them):
  resnet18_cifar  CIFAR ResNet-18 (width 64), 3x32x32, B=128, 10 classes
  resnet50        ImageNet ResNet-50, 3x224x224, B=128, 1000 classes
  r3d18           R3D-18, clips 3x16x112x112, B=16, 1000 classes
  vit_b16         ViT-B/16 (dim 768, depth 12, 12 heads, patch 16), 3x224x224, B=64, 1000 classes
                  (nft_fast.models.ViT with width 256, depth 12, heads 12: exactly B/16)

Variants (same weights, same data, same lam/perm sequence; every step reads its loss once):
  reference          as the authors wrote it: masks attached but every weight requires grad, NCHW fp32,
                     torch.optim.SGD on the masks, reference.Regularization (L1, L2, Linf) every step,
                     per-layer clamp (reference.nft_step); nft_fast.reference.ResNet18 for resnet18_cifar.
  eager_tuned        frozen weights, channels_last, bf16 autocast (CUDA), SGD(foreach=True), foreach clamp.
  compile            torch.compile of eager_tuned's forward + loss (mode default).
  nft_fast[backend]  nft_fast.Purifier.step under nft_fast.use_backend(backend), every usable backend.
  floor              the network without masks, frozen, same dtype/layout: forward of the MixUp batch,
                     MixUp CE, and the data gradient down to the first masked layer's output.
"""
from __future__ import annotations

import os
import sys

# The Triton interpreter must be chosen before triton is first imported (torch may import it).
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_fast  # noqa: E402
from nft_fast import ops  # noqa: E402
from nft_fast import reference as R  # noqa: E402
from nft_fast.masks import attach_masks, mask_parameters  # noqa: E402
from nft_fast.machine import cpu_name, describe as describe_machine, machine_info  # noqa: E402
from nft_fast.models import ViT, build, default_exclude, vit_dim, vit_patch_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LR, MOMENTUM, REG_COEF, SAMPLES_PER_CLASS = 0.05, 0.95, 1e-3, 50.0
N_LAMS, N_PERMS = 1024, 16


# --------------------------------------------------------------------------- workloads

@dataclass(frozen=True)
class Shape:
    """Network and batch shape of one workload run."""

    width: int
    size: int
    batch: int
    classes: int
    frames: int = 0  # > 0: video clips (B, 3, frames, size, size)
    depth: int = 0   # ViT only
    heads: int = 0   # ViT only


@dataclass(frozen=True)
class Workload:
    name: str
    arch: str  # nft_fast.models name (for default_exclude / build)
    full: Shape
    shrunk: Shape  # CPU: a reference step well under ~1 s on two cores


WORKLOADS: Dict[str, Workload] = {w.name: w for w in (
    Workload("resnet18_cifar", "resnet18", Shape(64, 32, 128, 10), Shape(32, 32, 32, 10)),
    Workload("resnet50", "resnet50_imagenet", Shape(64, 224, 128, 1000), Shape(32, 64, 32, 1000)),
    Workload("r3d18", "r3d18", Shape(64, 112, 16, 1000, frames=16), Shape(16, 64, 8, 1000, frames=8)),
    Workload("vit_b16", "vit", Shape(256, 224, 64, 1000, depth=12, heads=12), Shape(64, 96, 32, 1000, depth=6, heads=3)),
)}


def make_model(wl: Workload, s: Shape) -> nn.Module:
    """The plain (unmasked) network of ``wl`` at shape ``s``."""
    if wl.arch == "vit":
        return ViT(s.classes, 3, s.width, s.size, depth=s.depth, heads=s.heads)
    return build(wl.arch, s.classes, 3, s.width, s.size)


def describe(wl: Workload, s: Shape) -> str:
    data = f"3x{s.frames}x{s.size}x{s.size} clips" if s.frames else f"3x{s.size}x{s.size}"
    if wl.arch == "vit":
        dim, p = vit_dim(s.width, s.heads), vit_patch_size(s.size)
        exact = dim == 768 and s.depth == 12 and s.heads == 12 and p == 16
        net = f"ViT{'-B/16' if exact else ''} (dim {dim}, depth {s.depth}, {s.heads} heads, patch {p})"
    else:
        net = {"resnet18": "CIFAR ResNet-18", "resnet50_imagenet": "ImageNet ResNet-50", "r3d18": "R3D-18"}[wl.arch]
        net += f" (width {s.width})"
    return f"{net}, {data}, B={s.batch}, {s.classes} classes"


def _format(ndim: int, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(ndim, torch.contiguous_format)


class Ctx:
    """What every variant of one workload shares: weights (CPU state dict), data, lam/perm sequence."""

    def __init__(self, wl: Workload, s: Shape, device: torch.device, dtype: str) -> None:
        self.wl, self.s, self.device = wl, s, device
        self.amp = dtype == "bf16"
        torch.manual_seed(0)
        base = make_model(wl, s)
        self.state = {k: v.clone() for k, v in base.state_dict().items()}
        self.exclude = default_exclude(wl.arch)
        probe = copy.deepcopy(base)
        sites = attach_masks(probe, exclude=self.exclude)
        self.first_masked = sites[0].name
        self.num_masks = sum(site.numel for site in sites)
        self.num_sites = len(sites)
        del probe, base
        shape = (s.batch, 3, s.frames, s.size, s.size) if s.frames else (s.batch, 3, s.size, s.size)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(shape, generator=g).to(device)  # NCHW fp32, as a DataLoader yields it
        self.y = torch.randint(0, s.classes, (s.batch,), generator=g).to(device)
        rng = np.random.default_rng(2)
        self.lams = [float(v) for v in rng.beta(1.0, 1.0, N_LAMS)]
        self.lam_t = [torch.tensor(v, device=device) for v in self.lams]  # for torch.compile: no float guards
        self.perms = [torch.randperm(s.batch, generator=g).to(device) for _ in range(N_PERMS)]

    def model(self) -> nn.Module:
        m = make_model(self.wl, self.s)
        m.load_state_dict(self.state)
        return m

    def lp(self, i: int) -> Tuple[float, torch.Tensor]:
        return self.lams[i % N_LAMS], self.perms[i % N_PERMS]


def _mix_ce(out: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
    return lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])


# --------------------------------------------------------------------------- variants
# Each factory builds its model and returns (step(i), info); the model lives in the closure
# and is freed when the step function is dropped.

StepFn = Callable[[int], None]


def make_reference(c: Ctx) -> Tuple[StepFn, dict]:
    if c.wl.name == "resnet18_cifar":
        m = R.ResNet18(num_classes=c.s.classes, width=c.s.width)
        res = m.load_state_dict(c.state, strict=False)
        if res.unexpected_keys or any("neuron_mask" not in k for k in res.missing_keys):
            raise RuntimeError(f"reference ResNet18 does not match models.resnet18: {res}")
        what = "nft_fast.reference.ResNet18"
    else:
        m = c.model()
        attach_masks(m, exclude=c.exclude, freeze=False)  # every weight keeps requires_grad, as written
        what = "attach_masks(freeze=False), torch backend"
    m.to(c.device).train()
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(R.mask_params(m), lr=LR, momentum=MOMENTUM)

    def step(i: int) -> None:
        lam, perm = c.lp(i)
        with nft_fast.use_backend("torch"):
            R.Regularization(m)  # the official loop computes all three norms every step
            _, total = R.nft_step(m, crit, opt, c.x, c.y, lam, perm, SAMPLES_PER_CLASS, REG_COEF)
        float(total.detach())  # NFT_Train reads total.item()
    return step, {"layout": "contiguous", "dtype": "fp32", "note": what}


def _tuned_parts(c: Ctx, channels_last: bool = True):
    """eager_tuned's model, optimizer, forward+loss function and post-step clamp."""
    m = c.model()
    attach_masks(m, exclude=c.exclude)  # frozen: only masks require grad
    mf = _format(c.x.dim(), channels_last)
    m.to(c.device).to(memory_format=mf).train()
    masks = mask_parameters(m)
    cfg = nft_fast.NFTConfig()
    floors = [cfg.floor(l) for l in range(1, len(masks) + 1)]
    opt = torch.optim.SGD(masks, lr=LR, momentum=MOMENTUM, foreach=True)
    dev, amp, y = c.device.type, c.amp, c.y

    def fwd_loss(x: torch.Tensor, perm: torch.Tensor, lam):
        xs = x.contiguous(memory_format=mf)
        xm = lam * xs + (1 - lam) * xs[perm]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            out = m(xm)
        loss = _mix_ce(out.float(), y, perm, lam)
        reg = (1 - torch.cat([p.reshape(-1) for p in masks])).abs().sum()  # L1 only: what the loss uses
        return loss, loss + REG_COEF * reg / SAMPLES_PER_CLASS

    def update(total: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_clamp_min_(masks, floors)  # per-layer floor mu(l)
            torch._foreach_clamp_max_(masks, 1.0)
    return fwd_loss, update, mf


def _layout_name(mf: torch.memory_format) -> str:
    return {torch.channels_last: "channels_last", torch.channels_last_3d: "channels_last_3d"}.get(mf, "contiguous")


def make_eager_tuned(c: Ctx) -> Tuple[StepFn, dict]:
    fwd_loss, update, mf = _tuned_parts(c)

    def step(i: int) -> None:
        lam, perm = c.lp(i)
        with nft_fast.use_backend("torch"):
            loss, total = fwd_loss(c.x, perm, lam)
            update(total)
        float(loss.detach())
    return step, {"layout": _layout_name(mf), "dtype": "bf16" if c.amp else "fp32"}


def make_compile(c: Ctx) -> Tuple[StepFn, dict]:
    fwd_loss, update, mf = _tuned_parts(c)
    compiled = torch.compile(fwd_loss)

    def step(i: int) -> None:
        _, perm = c.lp(i)
        with nft_fast.use_backend("torch"):
            loss, total = compiled(c.x, perm, c.lam_t[i % N_LAMS])
            update(total)
        float(loss.detach())
    return step, {"layout": _layout_name(mf), "dtype": "bf16" if c.amp else "fp32", "note": "mode default"}


def _ops_used(step: StepFn, i: int) -> Dict[str, Dict[str, int]]:
    """Run ``step(i)`` once, counting the calls each op implementation gets: {op: {backend: calls}}."""
    counts: Dict[str, Dict[str, int]] = {}
    saved = {op: dict(impls) for op, impls in ops._IMPLS.items()}

    def counting(op: str, b: str, fn: Callable) -> Callable:
        def wrapper(*a, **k):
            counts.setdefault(op, {}).setdefault(b, 0)
            counts[op][b] += 1
            return fn(*a, **k)
        return wrapper
    try:
        for op, impls in ops._IMPLS.items():
            for b, fn in impls.items():
                impls[b] = counting(op, b, fn)
        step(i)
    finally:
        for op, impls in saved.items():
            ops._IMPLS[op].update(impls)
    return counts


def make_nft_fast(c: Ctx, backend: str, channels_last: bool, graph: bool = False) -> Tuple[StepFn, dict]:
    m = c.model()
    attach_masks(m, exclude=c.exclude)
    m.to(c.device)
    prec = "bf16" if c.amp else "fp32"
    note = ""
    # channels_last=True: 4-D weights/inputs channels_last, 5-D ones channels_last_3d
    p = nft_fast.Purifier(m, nft_fast.NFTConfig(precision=prec, channels_last=channels_last, cuda_graph=graph),
                          samples_per_class=SAMPLES_PER_CLASS)
    cl = p.channels_last and c.x.dim() in (4, 5)

    def step(i: int) -> None:
        lam, perm = c.lp(i)
        with nft_fast.use_backend(backend):
            p.step(c.x, c.y, lam=lam, perm=perm)
    t0 = time.perf_counter()
    used = _ops_used(step, N_LAMS - 1)  # one extra warm-up step that records which implementations ran
    _sync(c.device)
    first_ms = 1e3 * (time.perf_counter() - t0)
    if backend != "torch":
        mine = [op for op, per in sorted(used.items()) if backend in per]
        other = [f"{op}({'/'.join(per)})" for op, per in sorted(used.items()) if backend not in per]
        note += f"{backend}: {', '.join(mine) or 'no op'}" + (f"; {', '.join(other)}" if other else "")
    layout = ("channels_last" if c.x.dim() == 4 else "channels_last_3d") if cl else "contiguous"
    return step, {"layout": layout, "dtype": prec, "note": note.strip(),
                  "ops_used": used, "first_ms": first_ms}


def make_floor(c: Ctx, channels_last: bool) -> Tuple[StepFn, dict]:
    m = c.model()
    mf = _format(c.x.dim(), channels_last)
    m.to(c.device).to(memory_format=mf).train().requires_grad_(False)
    # The data gradient is needed down to the first masked layer's output, no further.
    dict(m.named_modules())[c.first_masked].register_forward_hook(lambda mod, inp, out: out.requires_grad_())
    dev, amp = c.device.type, c.amp

    def step(i: int) -> None:
        lam, perm = c.lp(i)
        xs = c.x.contiguous(memory_format=mf)
        xm = lam * xs + (1 - lam) * xs[perm]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            out = m(xm)
        loss = _mix_ce(out.float(), c.y, perm, lam)
        loss.backward()
        float(loss.detach())
    return step, {"layout": _layout_name(mf), "dtype": "bf16" if amp else "fp32",
                  "note": f"grad down to {c.first_masked}"}


def variant_list(c: Ctx, backends: List[str], layouts: List[str]) -> List[Tuple[str, Callable[[], Tuple[StepFn, dict]]]]:
    """(row name, factory) in table order."""
    out = [("reference", lambda: make_reference(c)),
           ("eager_tuned", lambda: make_eager_tuned(c)),
           ("compile", lambda: make_compile(c))]
    for layout in layouts:
        cl = layout == "channels_last"
        sfx = "" if layout == layouts[0] else f" {layout}"
        for b in backends:
            out.append((f"nft_fast[{b}]{sfx}", lambda b=b, cl=cl: make_nft_fast(c, b, cl)))
        if c.device.type == "cuda":  # the whole step as one CUDA graph (NFTConfig(cuda_graph=True))
            out.append((f"nft_fast[auto]+graph{sfx}", lambda cl=cl: make_nft_fast(c, "auto", cl, graph=True)))
        out.append((f"floor{sfx}", lambda cl=cl: make_floor(c, cl)))
    return out


def usable_backends(device: torch.device, interpret: bool) -> List[str]:
    out = []
    for b in ops.BACKENDS:
        if not (ops.backend_available(b) and ops._device_ok(b, device)):
            continue
        if b == "triton" and device.type != "cuda" and not interpret:
            continue  # the interpreter is far too slow to time
        if b == "cuda" and device.type != "cuda":
            continue  # the CPU emulator (NFT_FAST_CUDA_EMU=1) checks the kernels; timing it means nothing
        out.append(b)
    return out


# --------------------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warm(step: StepFn, warmup: int, device: torch.device) -> Tuple[float, int]:
    """Run the warm-up steps (the first one timed alone: it holds compilation/autotuning);
    returns its ms and the index of the next step."""
    t0 = time.perf_counter()
    step(0)
    _sync(device)
    first_ms = 1e3 * (time.perf_counter() - t0)
    for i in range(1, warmup):
        step(i)
    _sync(device)
    return first_ms, max(warmup, 1)


def _time(step: StepFn, i0: int, steps: int, device: torch.device) -> List[float]:
    """ms of each of ``steps`` steps from step index ``i0``."""
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for k, (a, b) in enumerate(ev):
            a.record()
            step(i0 + k)
            b.record()
        torch.cuda.synchronize(device)
        return [a.elapsed_time(b) for a, b in ev]
    ts = []
    for k in range(steps):
        t = time.perf_counter()
        step(i0 + k)
        ts.append(1e3 * (time.perf_counter() - t))
    return ts


def _peak_mb(step: StepFn, i0: int, mem_steps: int, device: torch.device) -> Optional[float]:
    """CUDA peak MB over ``mem_steps`` steps, in a pass of its own (the resets would disturb timing)."""
    if device.type != "cuda":
        return None
    _sync(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    for k in range(mem_steps):
        step(i0 + k)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def _stats(ts: List[float], first_ms: float, warmup: int) -> dict:
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "mean_ms": statistics.fmean(ts),
            "first_ms": first_ms, "steps": len(ts), "warmup": warmup, "peak_mb": None}


def measure(step: StepFn, steps: int, warmup: int, device: torch.device, mem_steps: int = 3) -> dict:
    """Median ms/step over ``steps`` after ``warmup`` steps, then peak memory over ``mem_steps``
    more steps on CUDA."""
    first_ms, i0 = _warm(step, warmup, device)
    out = _stats(_time(step, i0, steps, device), first_ms, warmup)
    out["peak_mb"] = _peak_mb(step, i0 + steps, mem_steps, device)
    return out


def measure_interleaved(steps_of: Dict[str, StepFn], steps: int, warmup: int, passes: int,
                        device: torch.device) -> Dict[str, dict]:
    """Every variant warmed, then ``passes`` round-robin passes each timing ``steps`` steps of every
    variant (the order rotated by one per pass), so slow drift of a shared machine (other jobs,
    clocks) falls on all rows alike instead of on whichever ran in the bad minute. A row's median
    pools all its passes; ``pass_median_ms`` keeps each pass's median. A variant that fails gets
    its error and leaves the rotation. Peak memory is not measured (every variant stays resident)."""
    rows: Dict[str, dict] = {}
    live: Dict[str, Tuple[float, int, List[float], List[float]]] = {}
    for name, step in steps_of.items():
        try:
            first_ms, i0 = _warm(step, warmup, device)
            live[name] = (first_ms, i0, [], [])
        except Exception as e:  # noqa: BLE001 - a failing variant is a row with its error
            rows[name] = _error_row(e)
    order = list(live)
    for p in range(passes):
        k = p % len(order) if order else 0
        for name in order[k:] + order[:k]:
            if name in rows:
                continue
            first_ms, i0, ts, meds = live[name]
            try:
                t = _time(steps_of[name], i0 + p * steps, steps, device)
            except Exception as e:  # noqa: BLE001
                rows[name] = _error_row(e)
                continue
            ts += t
            meds.append(statistics.median(t))
    for name, (first_ms, _, ts, meds) in live.items():
        if name not in rows:
            rows[name] = dict(_stats(ts, first_ms, warmup), pass_median_ms=meds)
    return {name: rows[name] for name in steps_of if name in rows}


def _error_row(e: Exception) -> dict:
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return {"error": msg[:500], "traceback": traceback.format_exc()[-3000:]}


# --------------------------------------------------------------------------- report

def env_info(device: torch.device) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001 - not installed or broken: just report it
        triton_v = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name, "torch": torch.__version__, "triton": triton_v, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "build": nft_fast.build_info(),
        # CPU model, torch's CPU capability (AVX2 / AVX512), native bf16, threads
        "machine": machine_info(),
    }


def add_ratios(rows: Dict[str, dict]) -> None:
    def ms(name: str) -> Optional[float]:
        r = rows.get(name)
        return r.get("median_ms") if r else None

    def peak(name: str) -> Optional[float]:
        r = rows.get(name)
        return r.get("peak_mb") if r else None

    ref, eager, comp = ms("reference"), ms("eager_tuned"), ms("compile")
    for name, r in rows.items():
        t = r.get("median_ms")
        sfx = name.split(" ", 1)[1] if " " in name else ""
        fl_name = f"floor {sfx}" if sfx and ms(f"floor {sfx}") else "floor"
        fl = ms(fl_name)
        r["speedup_vs_reference"] = ref / t if t and ref else None
        r["ratio_to_eager_tuned"] = t / eager if t and eager else None
        r["ratio_to_compile"] = t / comp if t and comp else None
        r["ratio_to_floor"] = t / fl if t and fl else None
        p, pe = r.get("peak_mb"), peak("eager_tuned")
        r["peak_ratio_to_eager_tuned"] = p / pe if p and pe else None
        # interleaved passes: the ratios pass by pass (rows of one pass ran minutes apart at most)
        own = r.get("pass_median_ms")
        ref_p, fl_p = ((rows.get(n) or {}).get("pass_median_ms") for n in ("reference", fl_name))
        if own and ref_p and len(own) == len(ref_p):
            r["speedup_vs_reference_by_pass"] = [x / y for x, y in zip(ref_p, own)]
        if own and fl_p and len(own) == len(fl_p):
            r["ratio_to_floor_by_pass"] = [x / y for x, y in zip(own, fl_p)]


def _f(v, fmt: str, suffix: str = "") -> str:
    return "" if v is None else f"{v:{fmt}}{suffix}"


def markdown(result: dict) -> str:
    e = result["env"]
    lines = ["# NFT step: side by side", "",
             f"{e['device']}; torch {e['torch']}; triton {e['triton']}; CUDA {e['cuda']}; {e['date']}",
             f"Machine: {describe_machine(e['machine'])}." if e.get("machine") else "",
             (f"{result['args'].get('passes', 1)} interleaved passes x " if result['args'].get('passes', 1) > 1 else "")
             + f"steps {result['args']['steps']} (median), warm-up {result['args']['warmup']}; "
             f"dtype {result['args']['dtype']}; shrink {result['args']['shrink']}; cudnn.benchmark {e['cudnn_benchmark']}", "",
             "Ratios: `vs reference` = reference ms / row ms (speed-up); `/ eager`, `/ compile`, `/ floor` = row ms / that "
             "row's ms (lower is better; the floor is the mask-free forward + data gradient). Peak MB: CUDA only.", ""]
    for wname, w in result["workloads"].items():
        lines += [f"## {wname}: {w['shape_text']}, {w.get('dtype', '')}", ""]
        if "error" in w:
            lines += [f"error: {w['error']}", ""]
            continue
        lines += [f"{w['num_masks']} mask entries in {w['num_sites']} layers; first masked layer `{w['first_masked']}`", "",
                  "| variant | ms/step | vs reference | / eager_tuned | / compile | / floor | peak MB | peak / eager_tuned "
                  "| layout | note |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for name, r in w["rows"].items():
            if "median_ms" not in r:
                msg = r.get("error") or r.get("skipped", "")
                lines.append(f"| {name} | -- | | | | | | | | {msg.replace('|', '/')[:200]} |")
                continue
            note = r.get("note", "")
            if name == "compile" or name.startswith("nft_fast[triton"):
                note = (note + f"; first step {r['first_ms'] / 1e3:.1f} s").lstrip("; ")
            for key, what, fmt in (("speedup_vs_reference_by_pass", "vs reference", ".2f"),
                                   ("ratio_to_floor_by_pass", "/ floor", ".3f")):
                v = r.get(key)
                if v and name not in ("reference", "floor") and not name.startswith("floor "):
                    note = (note + f"; {what} by pass {min(v):{fmt}}-{max(v):{fmt}}").lstrip("; ")
            lines.append(
                f"| {name} | {r['median_ms']:.2f} | {_f(r['speedup_vs_reference'], '.2f', 'x')} | "
                f"{_f(r['ratio_to_eager_tuned'], '.3f')} | {_f(r['ratio_to_compile'], '.3f')} | "
                f"{_f(r['ratio_to_floor'], '.3f')} | {_f(r['peak_mb'], '.0f')} | {_f(r['peak_ratio_to_eager_tuned'], '.3f')} | "
                f"{r.get('layout', '')} {r.get('dtype', '')} | {note.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def write(result: dict, stem: str) -> None:
    out = Path(result["args"].get("results") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(result))


# --------------------------------------------------------------------------- main

def run_sequential(plan: List[Tuple[str, str, Callable]], result: dict, stem: str, args, device: torch.device,
                   t_start: float) -> None:
    """One variant at a time, in plan order, each built, measured and freed before the next."""
    current = None
    for wname, name, factory in plan:
        w = result["workloads"][wname]
        if wname != current:
            current = wname
            print(f"\n== {wname}: {w['shape_text']}", flush=True)
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            w["rows"][name] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            write(result, stem)
            continue
        step = None
        try:
            step, info = factory()
            row = measure(step, args.steps, args.warmup, device)
            row.update(info)
            print(f"   {name:>28}: {row['median_ms']:10.2f} ms/step"
                  + (f", peak {row['peak_mb']:.0f} MB" if row["peak_mb"] is not None else ""), flush=True)
        except Exception as e:  # noqa: BLE001 - a failing variant is a row with its error
            row = _error_row(e)
            print(f"   {name:>28}: ERROR {row['error'][:300]}", flush=True)
        finally:
            step = None
            if name == "compile":
                torch._dynamo.reset()
            _free(device)
        w["rows"][name] = row
        add_ratios(w["rows"])
        write(result, stem)  # after every row: a killed run keeps what it measured


def run_interleaved(plan: List[Tuple[str, str, Callable]], result: dict, stem: str, args, device: torch.device) -> None:
    """Per workload: every variant built and kept, then measure_interleaved."""
    by_wl: Dict[str, List[Tuple[str, Callable]]] = {}
    for wname, name, factory in plan:
        by_wl.setdefault(wname, []).append((name, factory))
    for wname, entries in by_wl.items():
        w = result["workloads"][wname]
        print(f"\n== {wname}: {w['shape_text']} ({args.passes} interleaved passes)", flush=True)
        steps_of: Dict[str, StepFn] = {}
        infos: Dict[str, dict] = {}
        for name, factory in entries:
            try:
                steps_of[name], infos[name] = factory()
            except Exception as e:  # noqa: BLE001
                w["rows"][name] = _error_row(e)
        rows = measure_interleaved(steps_of, args.steps, args.warmup, args.passes, device)
        for name, row in rows.items():
            row.update(infos.get(name, {}))
            w["rows"][name] = row
            print(f"   {name:>28}: " + (f"{row['median_ms']:10.2f} ms/step (pass medians "
                                        + ", ".join(f"{m:.1f}" for m in row["pass_median_ms"]) + ")"
                                        if "median_ms" in row else f"ERROR {row['error'][:300]}"), flush=True)
        steps_of.clear()
        torch._dynamo.reset()
        _free(device)
        add_ratios(w["rows"])
        write(result, stem)



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of: {', '.join(WORKLOADS)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on CUDA, 10 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5 on CUDA, 2 on CPU)")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="dtype of every variant but the reference (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--shrink", action=argparse.BooleanOptionalAction, default=None,
                    help="CPU-sized shapes (default on for CPU, off for CUDA)")
    ap.add_argument("--width", type=int, default=None, help="override every workload's width")
    ap.add_argument("--batch", type=int, default=None, help="override every workload's batch size")
    ap.add_argument("--size", type=int, default=None, help="override every workload's image size")
    ap.add_argument("--layouts", default="channels_last",
                    help="comma list for the nft_fast and floor rows: channels_last, nchw (first is the main one)")
    ap.add_argument("--variants", default=None,
                    help="comma list of row-name prefixes to run (reference, eager_tuned, compile, nft_fast, floor)")
    ap.add_argument("--interpret", action="store_true", help="CPU: also time the triton backend under the interpreter")
    ap.add_argument("--passes", type=int, default=1,
                    help="> 1: per workload, warm every variant, then this many round-robin passes of --steps "
                         "steps each (drift of a shared machine falls on every row alike; no peak memory)")
    ap.add_argument("--compile-last", action="store_true",
                    help="run every workload's compile row after all other rows (for a time-budgeted run)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip the variants left once this many seconds passed")
    ap.add_argument("--tag", default=None, help="file name stem under --results (default step_<device>_<date>)")
    ap.add_argument("--results", default=str(RESULTS), help="folder of the JSON + markdown (default bench/results)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps if args.steps is not None else (50 if cuda else 10)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.shrink = (not cuda) if args.shrink is None else args.shrink
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    layouts = [l.strip() for l in args.layouts.split(",") if l.strip()]
    if not layouts or any(l not in ("channels_last", "nchw") for l in layouts):
        ap.error("--layouts takes channels_last and/or nchw")
    keep = [v.strip() for v in args.variants.split(",")] if args.variants else None
    if cuda:
        torch.backends.cudnn.benchmark = True  # for every variant alike
    backends = usable_backends(device, args.interpret)

    env = env_info(device)
    stem = args.tag or f"step_{'cpu' if not cuda else _slug(env['device'])}_{datetime.datetime.now():%Y%m%d-%H%M}"
    result = {"env": env, "args": vars(args), "backends": backends, "workloads": {}}
    t_start = time.perf_counter()
    print(f"{env['device']}; torch {env['torch']}; backends {backends}; -> {args.results}/{stem}.{{json,md}}", flush=True)

    # Set every workload up first; rows are then run in table order, or with --compile-last every
    # compile row after all the others (compilation is what a time budget cannot afford).
    plan: List[Tuple[str, str, Callable]] = []
    ctxs: Dict[str, Ctx] = {}
    for wname in names:
        wl = WORKLOADS[wname]
        s = wl.shrunk if args.shrink else wl.full
        s = replace(s, **{k: v for k, v in (("width", args.width), ("batch", args.batch), ("size", args.size)) if v})
        w = result["workloads"][wname] = {"shape": asdict(s), "shape_text": describe(wl, s), "dtype": args.dtype, "rows": {}}
        try:
            c = ctxs[wname] = Ctx(wl, s, device, args.dtype)
        except Exception as e:  # noqa: BLE001 - one broken workload must not stop the others
            w["error"] = f"{type(e).__name__}: {e}"
            print(f"{wname}: setup failed: {w['error']}", flush=True)
            continue
        w.update(first_masked=c.first_masked, num_masks=c.num_masks, num_sites=c.num_sites)
        for name, factory in variant_list(c, backends, layouts):
            if keep and not any(name.startswith(k) for k in keep):
                continue
            w["rows"][name] = {"skipped": "not run (interrupted)"}  # table order; replaced when run
            plan.append((wname, name, factory))
    if args.compile_last:
        plan.sort(key=lambda e: e[1] == "compile")  # stable: the others keep their order
    write(result, stem)

    if args.passes > 1:
        run_interleaved(plan, result, stem, args, device)
    else:
        run_sequential(plan, result, stem, args, device, t_start)
    ctxs.clear()
    _free(device)
    result["seconds"] = time.perf_counter() - t_start
    write(result, stem)
    print("\n" + markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
