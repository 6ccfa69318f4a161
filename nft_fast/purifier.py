"""The fast NFT engine: :class:`Purifier` (one step) and :func:`purify` (the whole loop).

Same semantics as :mod:`nft_fast.reference` (the authors' algorithm), computed with less work:
every non-mask weight is frozen (no weight gradients, no data gradient below the first
mask), the regularizer gradient is applied analytically inside one fused mask update
over a flat buffer that holds every mask, and nothing unused is computed.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import _checks, distributed, inversion, layout, ops, resume
from ._bn import bn_buffers, kept
from ._loop import (Batches, check_batch_size, check_clean_data, check_model, check_norm_batch, fork_rng,
                    infer_num_classes, model_device, num_samples, progress_bar)
from .config import NFTConfig
from .data import check_inputs
from .machine import cpu_bf16_warning
from .evaluation import pgd_linf
from .trigger import Perturbation, ScanResult, Trigger, scan, search, synthesize, universal
from .masks import MASK_NAME, attach_masks, fold_masks, mask_parameters, mask_sites


__all__ = [
    "Purifier", "PurifyResult", "purify", "recalibrate_bn", "find_triggers", "gather",
]


class Purifier:
    """Learns the masks of ``model`` (which must already hold masks, see :func:`attach_masks`).

    Args:
        model: a masked model; it is switched to ``train()`` and every non-mask
            parameter is frozen. Do not move it to another device afterwards.
        cfg: hyper-parameters (reference defaults).
        samples_per_class: ``N_c = len(clean_set) / num_classes`` of the regularizer.
        num_classes: the classes of the model's logits, which :meth:`step` checks labels
            against before computing anything; None: read off the model's output on one
            sample (eval mode, nothing changed) at the first step.
    """

    def __init__(self, model: nn.Module, cfg: Optional[NFTConfig] = None, samples_per_class: float = 1.0,
                 num_classes: Optional[int] = None, group=None) -> None:
        self.cfg = _checks.config(cfg, "Purifier")
        self.world = distributed.world(group)
        if self.world is not None and self.cfg.cuda_graph:
            raise ValueError("Purifier: cuda_graph captures a single-process step; turn it off for distributed "
                             f"purification (world size {self.world.size})")
        check_model(model, "Purifier")
        _checks.number("samples_per_class", samples_per_class, lo_open=True)
        if num_classes is not None:
            _checks.positive_int("num_classes", num_classes, owner="Purifier")
        self.num_classes = num_classes
        masks = mask_parameters(model)
        if not masks:
            raise ValueError("model has nothing to mask: it holds no neuron_mask parameters "
                             "(call nft_fast.attach_masks(model) first, or check its exclude list)")
        self.model = model
        self.samples_per_class = float(samples_per_class)
        self.device = masks[0].device
        for n, p in model.named_parameters():
            p.requires_grad_(n.rsplit(".", 1)[-1] == MASK_NAME)
        self.channels_last = layout.wants_channels_last(model, self.cfg.channels_last)
        if self.channels_last:
            layout.to_channels_last(model)
        # One flat buffer holds every mask (the parameters become views of it), another
        # every gradient: autograd accumulates in place into the views, so the fused
        # update sees all masks and gradients as single contiguous tensors.
        dtype = masks[0].dtype
        self._mask = torch.cat([m.detach().reshape(-1).to(dtype) for m in masks])
        # distributed: the step's three loss values ride behind the gradients in one all-reduce
        self._comm = torch.zeros(self._mask.numel() + (3 if self.world is not None else 0), dtype=dtype,
                                 device=self._mask.device)
        self._grad = self._comm[: self._mask.numel()]
        self._buf = torch.zeros_like(self._mask)
        floors, off = [], 0
        for l, p in enumerate(masks, start=1):
            n = p.numel()
            p.data = self._mask[off:off + n].view_as(p)
            p.grad = self._grad[off:off + n].view_as(p)
            floors.append(torch.full((n,), self.cfg.floor(l), dtype=dtype))
            off += n
        self._floor = torch.cat(floors).to(self.device)
        self._masks = masks
        self.lr = self.cfg.lr
        self.steps_done = 0
        self._rng = np.random.default_rng(self.cfg.seed)
        self._gen = torch.Generator().manual_seed(self.cfg.seed)
        self._autocast = self.cfg.precision == "bf16"
        slow_bf16 = cpu_bf16_warning() if self._autocast and self.device.type == "cpu" else None
        if slow_bf16:
            warnings.warn(slow_bf16, stacklevel=2)
        # BN buffers are snapshotted around the adversarial forwards so running statistics
        # reflect the (MixUp) clean batches only, as in the reference.
        # unlearning triggers (NFTConfig.trigger_weight), one per step in turn
        self.triggers: List[Union[Trigger, Perturbation]] = []
        self.trigger_weight = self.cfg.trigger_weight  # the scan may raise it (NFTConfig.trigger_confident)
        self._bn_buffers = bn_buffers(model)
        model.train()

    @property
    def num_masks(self) -> int:
        return self._mask.numel()

    def flat_masks(self) -> torch.Tensor:
        """A copy of every mask, concatenated in schedule order."""
        return self._mask.detach().clone()

    def regularizer(self) -> float:
        """``R = sum |1 - m|`` over every mask."""
        return float((1 - self._mask).abs().sum())

    def draw(self, batch_size: int):
        """Draw ``(lam, perm)`` for one step from the purifier's seeded generators."""
        a = self.cfg.mixup_alpha
        lam = float(self._rng.beta(a, a)) if a > 0 else 1.0
        return lam, torch.randperm(batch_size, generator=self._gen)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            return self.model(x).float()

    def adversarial(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """An L-inf PGD perturbation of ``x`` (radius ``adv_eps``, ``adv_steps`` signed steps of
        ``2.5 * eps / steps`` from a uniform random start) maximising CE, clamped to the batch's
        value range. BN running statistics are left unchanged; no mask gradient is kept."""
        return pgd_linf(self._forward, x, y, self.cfg.adv_eps, self.cfg.adv_steps, self._gen, x.min(), x.max())

    def step(self, x: torch.Tensor, y: torch.Tensor, lam: Optional[float] = None,
             perm: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """One NFT step on the batch ``(x, y)``; ``lam``/``perm`` are drawn when omitted.

        Returns ``loss`` (MixUp cross-entropy), ``reg`` (R before the update), ``total``
        (``loss + reg_coef * R / N_c``) and ``lam``.
        """
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"step: x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
        if x.dim() == 0 or y.dim() != 1 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
            raise ValueError(f"step: x and y must hold the same non-zero number of samples (y 1-D), got shapes "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if not x.is_floating_point() or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"step: x must be floating-point and y integer labels, got {x.dtype} and {y.dtype}")
        if lam is not None:  # checked before anything changes (a NaN lam would poison every mask)
            scalar = (isinstance(lam, torch.Tensor) and lam.numel() == 1 and lam.is_floating_point()) or \
                isinstance(lam, (np.floating, np.integer))
            _checks.number("lam", float(lam) if scalar else lam, 0.0, 1.0, owner="step")
        check_inputs(x, "batch x")  # NaN/inf in x would turn every mask NaN before the loss check
        if self.num_classes is None:
            self.num_classes = infer_num_classes(self.model, x)
        if bool((y < 0).any()) or bool((y >= self.num_classes).any()):  # before any forward or change
            raise ValueError(f"step: labels must lie in 0..{self.num_classes - 1} (the model's classes), got y with "
                             f"min {int(y.min())} and max {int(y.max())}")
        if lam is None or perm is None:
            dl, dp = self.draw(x.shape[0])
            lam = dl if lam is None else lam
            perm = dp if perm is None else perm
        if self.cfg.mixup_kind == "auto" or self.cfg.reg_coef_clips is not None:  # purify() resolves it first
            self.cfg = self.cfg.for_inputs(x.dim() == 5)
        if self.cfg.cuda_graph:
            return self._graph_step(x, y, lam, perm)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        perm = perm.to(self.device)
        if self.world is not None:
            return self._shard_step(x, y, lam, perm)
        if self.cfg.mixup_kind == "videomix":
            x_mix, lam = ops.videomix_batch(x, perm, float(lam), self._gen, channels_last=self.channels_last)
            loss = ops.mixup_cross_entropy(self._forward(x_mix), y, perm, lam)
        else:
            loss = self._mixup_loss(x, y, perm, lam)
        self._grad.zero_()
        extra: Dict[str, torch.Tensor] = {}
        weights = {"adv_loss": self.cfg.adv_weight}
        use_adv = self.cfg.adv_eps > 0 and self.cfg.adv_weight > 0
        use_trig = bool(self.triggers) and self.trigger_weight > 0
        if (use_adv or use_trig) and self.channels_last:
            x = layout.like_model(x, True)
        if use_adv or use_trig:
            with kept(self._bn_buffers):  # restored after backward: batch_norm saved them for it
                total = loss
                if use_adv:
                    extra["adv_loss"] = F.cross_entropy(self._forward(self.adversarial(x, y)), y)
                    total = total + weights["adv_loss"] * extra["adv_loss"]
                stamped = self._trigger_inputs(x, y) if use_trig else None
                if stamped is not None:
                    xt, yt, weights["trigger_loss"] = stamped
                    extra["trigger_loss"] = F.cross_entropy(self._forward(xt), yt)
                    total = total + weights["trigger_loss"] * extra["trigger_loss"]
                total.backward()
        else:
            loss.backward()
        reg = self.regularizer()
        reg_scale = self._reg_scale
        ops.mask_update_(self._mask, self._grad, self._buf, self._floor, self.lr, self.cfg.momentum, reg_scale)
        self.steps_done += 1
        loss_v = self._finite(float(loss.detach()))
        info = {"loss": loss_v, "reg": reg, "total": loss_v + reg_scale * reg, "lam": float(lam)}
        for k, v in extra.items():
            info[k] = float(v.detach())
            info["total"] += weights[k] * info[k]
        return info

    def trigger_weight_of(self, trig: Union[Trigger, Perturbation]) -> float:
        """The unlearning weight of ``trig``: :attr:`trigger_weight` for patch triggers (the scan
        may have raised it, NFTConfig.trigger_confident), ``cfg.trigger_weight`` for universal
        perturbations."""
        return self.cfg.trigger_weight if isinstance(trig, Perturbation) else self.trigger_weight

    def _trigger_inputs(self, x: torch.Tensor, y: torch.Tensor) -> Optional[tuple]:
        """This step's trigger (they take turns) on the batch's samples outside its target class,
        after its online step when it has one: ``(x_triggered, y, weight)``, or None when no
        sample is left."""
        trig = self.triggers[self.steps_done % len(self.triggers)]
        # a class-agnostic trigger (target None: nft_fast.inversion) keeps the whole batch
        keep = y != trig.target if trig.target is not None else torch.ones_like(y, dtype=torch.bool)
        if not bool(keep.any()):
            return None
        if 0 < self.cfg.trigger_rows < int(keep.sum()):  # the first rows: batches come shuffled
            keep = keep & (keep.cumsum(0) <= self.cfg.trigger_rows)
        if self.cfg.trigger_online and isinstance(trig, Perturbation):
            trig.ascend(self._forward, x[keep])
        return trig.apply(x[keep]), y[keep], self.trigger_weight_of(trig)

    def _shard_rows(self, n: int, device: torch.device) -> torch.Tensor:
        """This rank's contiguous share of the rows ``0 .. n - 1``."""
        return torch.tensor_split(torch.arange(n, device=device), self.world.size)[self.world.rank]

    def _shard_step(self, x: torch.Tensor, y: torch.Tensor, lam, perm: torch.Tensor) -> Dict[str, float]:
        """:meth:`step` on this rank's contiguous shard of the global batch ``(x, y)`` (every rank
        holds the same batch and draws): each loss is this shard's sum over the global batch size,
        BatchNorm uses the global batch's statistics, and one all-reduce sums the mask gradients
        and the loss values, so every rank applies the update one process would. The trigger's
        online step and the adversarial inputs are computed on the whole batch by every rank
        (identical, as in one process), their losses on the shard."""
        w, n = self.world, x.shape[0]
        if n < w.size:
            raise ValueError(f"step: a batch of {n} samples cannot be split over {w.size} ranks: use a batch size of at "
                             f"least the world size")
        rows = self._shard_rows(n, x.device)
        if self.cfg.mixup_kind == "videomix":
            x_mix, lam = ops.videomix_batch(x, perm, float(lam), self._gen, channels_last=self.channels_last)
        else:
            x_mix = ops.mixup_batch(x, perm, lam, channels_last=self.channels_last)
        use_adv = self.cfg.adv_eps > 0 and self.cfg.adv_weight > 0
        use_trig = bool(self.triggers) and self.trigger_weight > 0
        if (use_adv or use_trig) and self.channels_last:
            x = layout.like_model(x, True)
        self._grad.zero_()
        terms: Dict[str, torch.Tensor] = {}
        weights = {"adv_loss": self.cfg.adv_weight, "trigger_loss": self.trigger_weight}
        with distributed.synced(self.model, w):  # updates the BN running statistics, as in one process
            out = self._forward(x_mix[rows])
        terms["loss"] = (lam * F.cross_entropy(out, y[rows], reduction="sum")
                         + (1 - lam) * F.cross_entropy(out, y[perm][rows], reduction="sum")) / n
        total = terms["loss"]
        with kept(self._bn_buffers) if (use_adv or use_trig) else contextlib.nullcontext():
            # whole-batch parts outside the synced block: BN sees the whole batch, as in one process
            x_adv = self.adversarial(x, y) if use_adv else None
            stamped = self._trigger_inputs(x, y) if use_trig else None
            with distributed.synced(self.model, w):
                if x_adv is not None:
                    terms["adv_loss"] = F.cross_entropy(self._forward(x_adv[rows]), y[rows], reduction="sum") / n
                    total = total + weights["adv_loss"] * terms["adv_loss"]
                if stamped is not None:
                    xt, yt, weights["trigger_loss"] = stamped
                    kr = self._shard_rows(xt.shape[0], x.device)
                    terms["trigger_loss"] = F.cross_entropy(self._forward(xt[kr]), yt[kr], reduction="sum") / xt.shape[0]
                    total = total + weights["trigger_loss"] * terms["trigger_loss"]
            total.backward()
        names = ("loss", "adv_loss", "trigger_loss")
        tail = self._comm[self._grad.numel():]
        tail.copy_(torch.stack([terms[k].detach().to(tail.dtype) if k in terms else tail.new_zeros(()) for k in names]))
        distributed.all_reduce_sum(self._comm, w)  # the one collective of the step (besides BatchNorm's)
        reg = self.regularizer()
        reg_scale = self._reg_scale
        ops.mask_update_(self._mask, self._grad, self._buf, self._floor, self.lr, self.cfg.momentum, reg_scale)
        self.steps_done += 1
        vals = dict(zip(names, tail.tolist()))
        loss_v = self._finite(vals["loss"])
        info = {"loss": loss_v, "reg": reg, "total": loss_v + reg_scale * reg, "lam": float(lam)}
        for k in terms:
            if k != "loss":
                info[k] = vals[k]
                info["total"] += weights[k] * vals[k]
        return info

    @property
    def _reg_scale(self) -> float:
        return self.cfg.reg_coef / (self.samples_per_class if self.cfg.reg_per_class else 1.0)

    def _finite(self, loss: float) -> float:
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({loss}) at step {self.steps_done}: check the inputs for NaN/inf")
        return loss

    def _mixup_loss(self, x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, lam) -> torch.Tensor:
        """MixUp cross-entropy of the model: one pass builds the mixed batch in the layout the
        first layer wants, one the loss with its logit gradient (fused kernels on triton)."""
        x_mix = ops.mixup_batch(x, perm, lam, channels_last=self.channels_last)
        return ops.mixup_cross_entropy(self._forward(x_mix), y, perm, lam)

    def _graph_body(self) -> None:
        """The step as captured: every input comes from a static buffer (``self._static``)."""
        st = self._static
        loss = self._mixup_loss(st["x"], st["y"], st["perm"], st["lam"])
        self._grad.zero_()
        loss.backward()
        st["reg"].copy_((1 - self._mask).abs().sum())  # R before the update, as step() reports
        ops.mask_update_(self._mask, self._grad, self._buf, self._floor, st["lr"], self.cfg.momentum, st["reg_scale"])
        st["loss"].copy_(loss.detach())

    def _feed_static(self, x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> Dict[str, Any]:
        """Copy one step's inputs (batch, labels, perm, lam, lr) into the static buffers the
        captured step reads on the device (created on first use), so each replay sees them."""
        st = getattr(self, "_static", None)
        if st is not None and (st["x"].shape != x.shape or st["y"].shape != y.shape):
            raise ValueError(f"cuda_graph needs a static batch shape: captured {tuple(st['x'].shape)}, got {tuple(x.shape)} "
                             "(drop the last partial batch)")
        if st is None:
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None for m in self.model.modules()):
                raise ValueError("cuda_graph: BatchNorm with momentum=None (cumulative average) reads a host-side "
                                 "counter every step; set a momentum")
            st = self._static = {
                "x": torch.empty(x.shape, dtype=x.dtype, device=self.device,
                                 memory_format=layout.memory_format(x.dim(), self.channels_last)),
                "y": torch.empty(y.shape, dtype=y.dtype, device=self.device),
                "perm": torch.empty(perm.shape, dtype=torch.int64, device=self.device),
                "lam": torch.empty((), dtype=torch.float32, device=self.device),
                "lr": torch.empty(1, dtype=self._mask.dtype, device=self.device),
                "loss": torch.empty((), dtype=torch.float32, device=self.device),
                "reg": torch.empty((), dtype=self._mask.dtype, device=self.device),
            }
        st["reg_scale"] = self._reg_scale
        st["x"].copy_(x, non_blocking=True)
        st["y"].copy_(y, non_blocking=True)
        st["perm"].copy_(perm, non_blocking=True)
        st["lam"].fill_(float(lam))
        st["lr"].fill_(float(self.lr))
        return st

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> Dict[str, float]:
        if self.device.type != "cuda":
            raise ValueError("NFTConfig(cuda_graph=True) needs the model on a CUDA device")
        st = self._feed_static(x, y, lam, perm)
        reg_scale = st["reg_scale"]
        if getattr(self, "_graph", None) is None:
            # Warm-up steps on a side stream (allocator, cuDNN and Triton autotuning), as the
            # capture requires; they are real steps, so the step count includes them. BN
            # buffers and the optimizer state are restored after them to keep the sequence
            # identical to uncaptured stepping from here on.
            keep = [t.clone() for t in (self._mask, self._buf)]
            with kept(self._bn_buffers):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._graph_body()
                torch.cuda.current_stream().wait_stream(side)
            self._mask.copy_(keep[0])
            self._buf.copy_(keep[1])
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):  # records only: nothing runs until replay
                self._graph_body()
        self._graph.replay()
        self.steps_done += 1
        loss_v, reg = self._finite(float(st["loss"])), float(st["reg"])
        return {"loss": loss_v, "reg": reg, "total": loss_v + reg_scale * reg, "lam": float(lam)}


@dataclass
class PurifyResult:
    """What :func:`purify` returns: the masked ``model``, per-round ``history`` and timings."""

    model: nn.Module
    history: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_class: float = 0.0

    def folded(self) -> nn.Module:
        """The purified model in its original architecture (masks folded into the weights)."""
        return fold_masks(self.model)

    def masks(self) -> Dict[str, torch.Tensor]:
        return {s.name: s.mask.detach().clone() for s in mask_sites(self.model)}


def gather(data: Union[Dataset, DataLoader], limit: int = 8192, *, seed: int = 0, max_bytes: Optional[int] = 1 << 30,
           num_workers: int = 0) -> tuple:
    """A bounded sample of a clean Dataset / DataLoader as ``(x, y)`` tensors: what the trigger
    scans, the feature-trigger inversion and BatchNorm recalibration work on.

    The bound: at most ``limit`` samples and, unless ``max_bytes`` is None, no more than fit in
    ``max_bytes`` as float32 inputs (1 GiB: 8,192 samples up to 3x104x104, 7,133 at 3x112x112,
    1,783 at 3x224x224), so the sample's memory does not grow with the clean set.

    A map-style Dataset within the bound is taken whole, in index order. A larger one gives a
    seeded, class-stratified random subset: the per-class quotas are as even as the classes
    allow (each class gets ``min(its size, q)`` for the largest ``q`` that fits; what remains
    goes one each to classes drawn at random), the items of each class are drawn at random,
    and the subset is read in index order. Every draw comes from a generator seeded with
    ``seed``, never the global RNG, so a given dataset and seed always give the same subset (a
    resumed purification sees the one the interrupted run saw). The labels are read without
    reading inputs: ``targets`` (folder datasets, torchvision's), a TensorDataset's or
    ArrayDataset's labels, a Subset's of its parent; a Dataset exposing none gets a uniform
    random subset. Only the chosen items are read, through a DataLoader with ``num_workers``
    worker processes when above 0.

    A DataLoader, or an iterable dataset, is used as given: its first samples up to the bound,
    in the order it yields them (shuffle it, or pass its Dataset, for a random subset)."""
    from torch.utils.data import IterableDataset, Subset

    from .data import dataset_labels, stratified_subset

    _checks.positive_int("limit", limit, owner="gather")
    if max_bytes is not None:
        _checks.positive_int("max_bytes", max_bytes, owner="gather")
    _checks.seed("seed", seed, owner="gather")

    def bound(x: torch.Tensor) -> int:  # samples within limit and max_bytes, from one sample's size
        per = 4 * max(1, x[0].numel() if x.dim() else 1)
        return limit if max_bytes is None else max(1, min(limit, max_bytes // per))

    if isinstance(data, (DataLoader, IterableDataset)):
        loader = isinstance(data, DataLoader)
        xs, ys, n, k = [], [], 0, limit
        for b in data:
            x, y = (torch.as_tensor(b[0]), torch.as_tensor(b[1]).view(-1)) if loader else \
                (torch.as_tensor(b[0]).unsqueeze(0), torch.as_tensor(b[1]).view(1))
            if not xs:
                k = bound(x)
            xs.append(x)
            ys.append(y)
            n += y.numel()
            if n >= k:
                break
        return torch.cat(xs)[:k], torch.cat(ys)[:k].long()
    n = len(data)
    with torch.random.fork_rng(devices=[]):  # a random transform's draw here leaves the caller's stream alone
        k = bound(torch.as_tensor(data[0][0]).unsqueeze(0))
    if n <= k:
        idx = torch.arange(n)
    else:
        labels = dataset_labels(data)
        idx = (torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values if labels is None
               else stratified_subset(labels, k, seed))

    def items():  # the chosen items, in order
        if num_workers > 0:
            for b in DataLoader(Subset(data, idx.tolist()), batch_size=64, num_workers=num_workers):
                yield from zip(b[0], b[1])
        else:
            yield from (data[i] for i in idx.tolist())

    x, y = None, torch.empty(idx.numel(), dtype=torch.long)
    for j, (xi, yi) in enumerate(items()):
        xi = torch.as_tensor(xi)
        if x is None:
            x = torch.empty((idx.numel(), *xi.shape), dtype=xi.dtype)
        x[j] = xi
        y[j] = torch.as_tensor(yi).view(())
    return x, y


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 128,
                   channels_last: Optional[bool] = None) -> None:
    """Re-estimate every BatchNorm's running statistics on ``x`` (cumulative average over
    batches of ``batch_size``, a last batch of one sample joined to the one before), in place;
    the model's train/eval mode is kept. Batches are fed in the layout :mod:`nft_fast.layout`
    picks (``channels_last`` as in :class:`NFTConfig`)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    was = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    dev = model_device(model)
    cl = layout.wants_channels_last(model, channels_last)
    starts = list(range(0, x.shape[0], batch_size))
    if len(starts) > 1 and x.shape[0] - starts[-1] == 1:
        starts.pop()  # a last batch of one sample joins the one before (no statistics from one value)
    try:
        for i, end in zip(starts, starts[1:] + [x.shape[0]]):
            model(layout.like_model(x[i:end].to(dev), cl))
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was)


def scan_kwargs(cfg: NFTConfig) -> Dict[str, Any]:
    """The keywords :func:`nft_fast.trigger.scan` / ``synthesize`` get from ``cfg``."""
    return {"steps": cfg.trigger_steps, "l1": cfg.trigger_l1, "batch_size": cfg.trigger_batch, "seed": cfg.seed}


def purify(
    model: nn.Module,
    clean_data: Union[Dataset, DataLoader],
    cfg: Optional[NFTConfig] = None,
    *,
    num_classes: Optional[int] = None,
    samples_per_class: Optional[float] = None,
    exclude: Sequence[str] = (),
    inplace: bool = False,
    evaluate_fn: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
    test_loader: Optional[Iterable] = None,
    poison_loader: Optional[Iterable] = None,
    target=None,
    progress: bool = True,
    num_workers: int = 0,
    checkpoint=None,
    group=None,
) -> PurifyResult:
    """Purify ``model`` with NFT on ``clean_data`` (a Dataset, sampled with replacement as
    in the reference, or a DataLoader, used as given and restarted when exhausted).

    The model is copied first unless ``inplace``; masks are attached (skipping ``exclude``)
    if it has none. ``evaluate_fn(model) -> {"acc": ..., "asr": ...}`` runs after each
    round (e.g. ``lambda m: evaluate(m, test_loader, poison_loader)``) and is recorded in
    the history; passing ``test_loader`` / ``poison_loader`` (and ``target``) instead records
    :func:`nft_fast.evaluate`'s ACC/ASR/RA. ``result.model`` is the masked model;
    ``result.folded()`` the plain one; both have the caller's train/eval mode and
    ``requires_grad`` flags (new masks trainable).

    ``checkpoint`` (e.g. a :class:`nft_fast.resume.StateFolder`) saves the whole state at every
    round boundary (after the trigger scan and after each round, :mod:`nft_fast.resume`); if
    ``checkpoint.load()`` returns a saved state, purification continues from it with the same
    result, bit for bit, as a run that was never stopped (a Dataset as clean data; the state's
    config must be ``cfg``, else :class:`nft_fast.resume.StateError`).

    Distributed: when a ``torch.distributed`` process group (``group``, else the default one) of
    more than one rank is initialised, every rank calls ``purify`` with the same arguments; each
    draws the same global batches of ``cfg.batch_size`` and computes its shard of them, BatchNorm
    uses the global batch's statistics and the mask gradients are all-reduced once per step, so
    every rank ends with the masks and statistics one process would compute
    (:mod:`nft_fast.distributed`). Scans run on every rank alike. A DataLoader as ``clean_data``
    must yield the same (global) batches on every rank. Only rank 0 saves ``checkpoint`` states.

    Every argument is checked before the model is copied or changed: ``cfg`` (again: a field
    changed after creation), the model (not on the meta device), the clean data ((x, y)
    pairs the model takes, finite inputs within ``nft_fast.data.MAX_ABS_INPUT``, labels in
    range; of a map-style Dataset of more than 512 items, 256 leading and 256 random ones, every
    batch being checked again when drawn) and a Dataset's batch size (at most
    ``max(len(clean_data), 128)``); mistakes raise
    ``TypeError`` / ``ValueError`` naming the argument.
    """
    # everything is checked before the model is copied or changed (inplace: the caller's)
    cfg = _checks.config(cfg, "purify")
    check_model(model, "purify")
    if num_classes is not None:
        _checks.positive_int("num_classes", num_classes, owner="purify")
    if samples_per_class is not None:
        _checks.number("samples_per_class", samples_per_class, lo_open=True, owner="purify")
    x0, model_classes = check_clean_data(model, clean_data, "purify")
    cfg = cfg.for_inputs(x0.dim() == 5)  # mixup_kind="auto", reg_coef_clips
    if not isinstance(clean_data, DataLoader):  # a DataLoader's batches are the caller's
        check_batch_size(cfg.batch_size, num_samples(clean_data), "purify")
        check_norm_batch(model, x0, cfg.batch_size, "purify")
    elif checkpoint is not None:
        raise ValueError("purify: checkpoint needs a Dataset as clean_data (a DataLoader's position cannot be saved)")
    was_training = model.training  # the returned model gets the caller's mode and requires_grad flags
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    if evaluate_fn is None and (test_loader is not None or poison_loader is not None):
        from .evaluation import evaluate

        evaluate_fn = lambda m: evaluate(m, test_loader, poison_loader, target)  # noqa: E731
    n_data = num_samples(clean_data)
    if not inplace:
        model = copy.deepcopy(model)
    if not mask_parameters(model):
        attach_masks(model, exclude=exclude)
    if num_classes is None:
        num_classes = model_classes
    n_c = samples_per_class if samples_per_class is not None else n_data / num_classes
    purifier = Purifier(model, cfg, samples_per_class=n_c, num_classes=model_classes, group=group)
    if purifier.world is not None and not isinstance(clean_data, DataLoader):
        if cfg.batch_size < purifier.world.size:
            raise ValueError(f"purify: batch_size {cfg.batch_size} is smaller than the world size "
                             f"({purifier.world.size}): every rank needs a share of each batch")
    if purifier.world is not None and purifier.world.rank != 0:
        checkpoint = _ReadOnly(checkpoint) if checkpoint is not None else None
    gen = torch.Generator().manual_seed(cfg.seed)
    history: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    saved = checkpoint.load() if checkpoint is not None else None
    xs = ys = None
    if cfg.trigger_weight > 0 or cfg.bn_recalibrate:  # both need the clean set as tensors
        xs, ys = gather(clean_data, seed=cfg.seed, num_workers=num_workers)
    if saved is not None:  # everything up to its round boundary, as it was
        trig_info = resume.restore(purifier, saved, gen)
        history = saved.meta["history"]
        t_start -= saved.meta["seconds"]
    else:
        trig_info = _arm_triggers(purifier, xs, ys) if cfg.trigger_weight > 0 else {}
        if trig_info:
            trig_info["trigger_seconds"] = time.perf_counter() - t_start
    outer_rng = torch.get_rng_state()

    def save(rounds_done: int) -> None:
        checkpoint.save(resume.capture(purifier, gen, rounds_done, history, trig_info, time.perf_counter() - t_start,
                                       outer_rng, inner=rounds_done > 0))

    if checkpoint is not None and saved is None:
        save(0)
    start = 0 if saved is None else saved.round
    bar = progress_bar(cfg.steps, "NFT", progress)
    bar.update(purifier.steps_done)
    try:
        with fork_rng(purifier.device):
            torch.manual_seed(cfg.seed)  # transforms of the user's dataset draw from the global RNG
            if start > 0:
                resume.restore_inner_rng(saved, purifier.device)
            batches = Batches(clean_data, cfg.batch_size, gen, num_workers)
            for r in range(start, cfg.rounds):
                entry = _run_round(purifier, r, batches, bar, xs, ys)
                if r == 0 and trig_info:
                    entry["scan"] = trig_info
                if evaluate_fn is not None:
                    entry.update(evaluate_fn(model))
                    model.train()
                history.append(entry)
                if checkpoint is not None:
                    save(r + 1)
    finally:
        bar.close()
    if cfg.bn_recalibrate:
        _recalibrate(model, xs, cfg, history, evaluate_fn)
    model.train(was_training)
    for n, p in model.named_parameters():  # masks purify attached stay trainable
        p.requires_grad_(requires_grad.get(n, True))
    return PurifyResult(model, history, time.perf_counter() - t_start, n_c)


class _ReadOnly:
    """A checkpoint other ranks load from but never save to (rank 0 writes)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def load(self):
        return self.inner.load()

    def save(self, state) -> None:
        pass


def find_triggers(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, cfg: NFTConfig) -> ScanResult:
    """The patch-trigger search ``cfg`` asks for (:meth:`NFTConfig.search_mode`): the per-class
    scan or the class-agnostic search; a :class:`nft_fast.trigger.ScanResult` either way."""
    n = int(ys.unique().numel())
    if cfg.search_mode(n) == "agnostic":
        # each step scores every class on one batch: the search keeps the mask-step batch size
        return search(model, xs, ys, restarts=min(cfg.trigger_restarts, n),
                      **dict(scan_kwargs(cfg), batch_size=cfg.batch_size))
    return scan(model, xs, ys, **scan_kwargs(cfg))


def _arm_triggers(purifier: Purifier, xs: torch.Tensor, ys: torch.Tensor) -> Dict[str, Any]:
    """Scan the clean set for triggers; when one is anomalous enough, hand the ``trigger_top``
    most suspicious (plus their Blend-style twins) to the purifier to unlearn."""
    cfg, model = purifier.cfg, purifier.model
    if cfg.trigger_kind == "feature":
        trig = inversion.invert(model, xs, ys, **inversion.config_kwargs(cfg))
        purifier.triggers = [trig]
        info = inversion.flip_summary(model, xs, trig)
        info["trigger_unlearning"] = True
        return info
    found = find_triggers(model, xs, ys, cfg)
    info = found.summary()
    info["trigger_search"] = cfg.search_mode(int(ys.unique().numel()))
    info["trigger_unlearning"] = found.max_anomaly >= cfg.trigger_min_anomaly
    if info["trigger_unlearning"]:
        purifier.triggers = found.ranked()[: cfg.trigger_top]
        if cfg.trigger_blend > 0:
            purifier.triggers += [synthesize(model, xs, ys, t.target, kind="blend", alpha=cfg.trigger_blend,
                                             **scan_kwargs(cfg)) for t in purifier.triggers]
        confident = 0 < cfg.trigger_confident <= found.max_anomaly
        info["trigger_mode"] = ("confident" if confident else "patch") + ("+universal" if cfg.trigger_universal > 0 else "")
        purifier.trigger_weight = cfg.trigger_confident_weight if confident else cfg.trigger_weight
        # universal perturbations in every mode: a small patch can stand out beyond doubt on a
        # whole-image (Blend) backdoor too, and the patch alone leaves it in place
        if cfg.trigger_universal > 0:  # taken in turn with the patch triggers
            grids = (0, cfg.trigger_universal_blocks) if cfg.trigger_universal_blocks > 0 else (0,)
            us = [universal(model, xs, ys, purifier.triggers[0].target, rms=cfg.trigger_universal,
                            batch_size=cfg.batch_size, seed=cfg.seed, blocks=b) for b in grids]
            purifier.triggers += us
            info["universal_success"] = us[0].success
            if len(us) > 1:
                info["universal_low_success"] = us[1].success
    return info


def _run_round(purifier: Purifier, r: int, batches: Batches, bar, xs, ys) -> Dict[str, Any]:
    """Round ``r`` (0-based) of mask learning at its learning rate; its history entry."""
    cfg = purifier.cfg
    purifier.lr = cfg.round_lr(r)
    t0 = time.perf_counter()
    feature = cfg.trigger_kind == "feature" and bool(purifier.triggers)
    if r > 0 and purifier.triggers and cfg.trigger_refresh:
        # the masked model's remaining shortcut: warm-started, a third of the steps
        if feature:
            kw = inversion.config_kwargs(cfg, refresh=True)
            purifier.triggers = [inversion.refresh(purifier.model, xs, ys, t, **kw) for t in purifier.triggers]
        else:
            kw = dict(scan_kwargs(cfg), steps=max(1, cfg.trigger_steps // 3))
            purifier.triggers = [
                universal(purifier.model, xs, ys, t.target, rms=cfg.trigger_universal, steps=20,
                          batch_size=cfg.batch_size, seed=cfg.seed + r, init=t, blocks=t.blocks)
                if isinstance(t, Perturbation) else synthesize(purifier.model, xs, ys, t.target, init=t, **kw)
                for t in purifier.triggers]
    losses, steps = 0.0, 0
    for x, y in batches.take(cfg.steps_per_round):
        info = purifier.step(x, y)
        losses += info["loss"]
        steps += 1
        bar.update(1)
        bar.set_postfix(round=r + 1, loss=f"{info['loss']:.3f}", refresh=False)
    entry: Dict[str, Any] = {
        "round": r + 1, "lr": purifier.lr, "steps": steps, "loss": losses / max(steps, 1),
        "reg": purifier.regularizer(), "seconds": time.perf_counter() - t0,
    }
    if purifier.triggers:
        entry.update(trigger_norm=purifier.triggers[0].norm, trigger_success=purifier.triggers[0].success)
    if feature and r == cfg.rounds - 1:
        # the poison-free signal "after": G refreshed against the purified (masked) model
        # (before any BN recalibration); history[0]["scan"] holds the one "before"
        t1 = time.perf_counter()
        after = inversion.refresh(purifier.model, xs, ys, purifier.triggers[0], **inversion.config_kwargs(cfg, refresh=True))
        entry["inversion_after"] = inversion.flip_summary(purifier.model, xs, after)
        entry["inversion_after"]["seconds"] = time.perf_counter() - t1
        purifier.model.train()
    return entry


def _recalibrate(model: nn.Module, xs: torch.Tensor, cfg: NFTConfig, history: List[Dict[str, Any]],
                 evaluate_fn) -> None:
    """Re-estimate BN statistics on the unmixed clean set; the last round's metrics are kept
    under ``*_before_recalibration`` and replaced by the recalibrated model's."""
    recalibrate_bn(model, xs, cfg.batch_size, cfg.channels_last)
    if evaluate_fn is not None and history:
        history[-1].update({f"{k}_before_recalibration": v for k, v in history[-1].items()
                            if k in ("acc", "asr", "ra")})
        history[-1].update(evaluate_fn(model))
        model.train()
