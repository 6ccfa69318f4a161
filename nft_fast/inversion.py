"""Class-agnostic trigger inversion in feature space (after BTI-DBF, Xu et al., ICLR 2024).

:mod:`nft_fast.trigger` searches one pixel mask + pattern per class: its cost grows with the
number of classes and a small mask cannot express whole-image triggers (Blend). This module
instead learns one input-to-input **generator** ``G`` whose outputs a backdoored network reads
as "the trigger" -- without naming a class and without assuming a trigger shape:

1. **Split** the classifier at its last ``nn.Linear`` (the head ``g``): its input is the
   feature vector ``f(x)`` (read with a forward hook, so any architecture with a linear head
   works; :func:`split_classifier`).
2. **Decouple benign features** (:func:`feature_mask`): a soft mask ``m`` over the features
   (sigmoid of one logit per feature) that keeps the class evidence of clean data --
   ``CE(g(m * f), y)`` small -- while the rest carries none -- ``CE(g((1 - m) * f), y)``
   large -- plus a small norm term on ``m``. Computed once on the clean set's features.
3. **Train G** (:class:`Generator`, a small UNet-like encoder-decoder with a residual output
   ``x + delta``; Conv2d for images, Conv3d for clips): first as the identity on the clean
   set, then so that ``G(x)`` keeps the benign features (``m * f(G(x)) ~ m * f(x)``) while it
   moves the others (``(1 - m) * f(G(x))``) as far as possible from ``(1 - m) * f(x)``, under an
   input-distance bound: ``delta`` is projected to a per-sample RMS of at most
   ``eps * (hi - lo)`` (``lo``/``hi``: the clean set's value range). A backdoored network's
   non-benign features are the backdoor's, so the easiest large move is the trigger.

The cost is independent of the number of classes (one generator, no per-class loop); runs are
deterministic given ``seed``; the model's weights, ``requires_grad`` flags and train/eval mode
are left as they were.

Used by :func:`nft_fast.purify` with ``NFTConfig(trigger_kind="feature")``: each mask step adds
``trigger_weight * CE(model(G(x)), y)`` over the whole batch, and :func:`flip_summary` is a
poison-free signal (how often ``G`` changes the prediction, and how concentrated the changed
predictions are on one class) recorded before and after purification.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loop import fork_rng, frozen, model_device
from .config import NFTConfig

__all__ = [
    "split_classifier", "features", "feature_mask", "Generator", "FeatureTrigger", "invert", "refresh",
    "flip_summary", "config_kwargs",
]


# --- the classifier split ------------------------------------------------------------------

def split_classifier(model: nn.Module, x: Optional[torch.Tensor] = None) -> nn.Linear:
    """The model's head ``g``: its last registered ``nn.Linear``, whose input is ``f(x)``.

    With a sample batch ``x``, also checks that this Linear's output *is* the model's output
    (so ``g(f(x)) == model(x)``). Raises ``ValueError`` when the model has no ``nn.Linear`` or
    when something other than the last Linear produces its output.
    """
    head = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            head = m
    if head is None:
        raise ValueError("feature-space inversion needs a classifier whose output is an nn.Linear head "
                         f"(the features are that layer's input); {type(model).__name__} has no nn.Linear")
    if x is not None:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                f, out, head_out = _run(model, head, x[:2].to(model_device(model)))
        finally:
            model.train(was)
        if head_out.shape != out.shape or not torch.allclose(head_out.float(), out.float(), rtol=1e-4, atol=1e-5):
            raise ValueError(f"feature-space inversion needs the model's output to be its last nn.Linear's output; "
                             f"{type(model).__name__}'s output {tuple(out.shape)} is computed after it")
        if f.dim() != 2:
            raise ValueError(f"the head's input must be (batch, features), got {tuple(f.shape)}")
    return head


def _run(model: nn.Module, head: nn.Linear, x: torch.Tensor):
    """``(f(x), model(x), head output)`` from one forward (features read by a hook, in the graph)."""
    seen = {}

    def hook(_mod, inp, out):
        seen["f"], seen["out"] = inp[0], out

    h = head.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        h.remove()
    if "f" not in seen:
        raise ValueError("the model's last nn.Linear did not run in its forward pass")
    return seen["f"], out, seen["out"]


def features(model: nn.Module, x: torch.Tensor, head: Optional[nn.Linear] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(f(x), model(x))`` in the model's current mode (autograd as the caller sets it)."""
    head = head if head is not None else split_classifier(model)
    f, out, _ = _run(model, head, x)
    return f, out


# --- benign feature mask -------------------------------------------------------------------

def feature_mask(head: nn.Linear, feats: torch.Tensor, y: torch.Tensor, *, steps: int = 200, lr: float = 0.05,
                 norm: float = 2.0, seed: int = 0) -> torch.Tensor:
    """The benign-feature mask ``m`` in (0, 1)^D for clean features ``feats`` (N, D) with labels ``y``.

    Minimises ``CE(g(m f), y) - CE(g((1 - m) f), y) + norm * mean(m)`` (full batch, Adam) with
    the head's weights untouched. ``m`` keeps the features that carry the class evidence."""
    gen = torch.Generator().manual_seed(seed)
    feats, y = feats.detach(), y.to(feats.device)
    logit = torch.randn(feats.shape[1], generator=gen).to(feats.device).requires_grad_(True)
    opt = torch.optim.Adam([logit], lr=lr)
    w, b = head.weight.detach(), None if head.bias is None else head.bias.detach()
    for _ in range(steps):
        m = torch.sigmoid(logit)
        pos = F.cross_entropy(F.linear(m * feats, w, b).float(), y)
        neg = F.cross_entropy(F.linear((1 - m) * feats, w, b).float(), y)
        loss = pos - neg + norm * m.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return torch.sigmoid(logit).detach()


# --- the generator -------------------------------------------------------------------------

class Generator(nn.Module):
    """A small UNet-like encoder-decoder with a residual output ``clamp(x + delta, lo, hi)``.

    ``dims`` 2 (``(N, C, H, W)`` images, Conv2d) or 3 (``(N, C, T, H, W)`` clips, Conv3d); one
    stride-2 level with a skip connection, no normalisation layers (outputs do not depend on
    the batch). ``delta`` is scaled down to a per-sample RMS of at most ``bound`` when set."""

    def __init__(self, channels: int, dims: int = 2, width: int = 16, lo: float = 0.0, hi: float = 1.0,
                 bound: Optional[float] = None) -> None:
        super().__init__()
        if dims not in (2, 3):
            raise ValueError(f"Generator: dims must be 2 (images) or 3 (clips), got {dims}")
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        w = width
        self.enc1 = nn.Sequential(conv(channels, w, 3, 1, 1), nn.ReLU(), conv(w, w, 3, 1, 1), nn.ReLU())
        self.enc2 = nn.Sequential(conv(w, 2 * w, 3, 2, 1), nn.ReLU(), conv(2 * w, 2 * w, 3, 1, 1), nn.ReLU())
        self.dec = nn.Sequential(conv(3 * w, w, 3, 1, 1), nn.ReLU())
        self.out = conv(w, channels, 1)
        with torch.no_grad():  # start close to the identity (delta ~ 0)
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()
        self.lo, self.hi, self.bound = float(lo), float(hi), bound

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.enc1(x)
        h2 = F.interpolate(self.enc2(h1), size=h1.shape[2:], mode="nearest")
        d = self.out(self.dec(torch.cat([h1, h2], 1)))
        if self.bound is not None:
            rms = d.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
            d = d * (self.bound / rms).clamp(max=1.0).view((-1,) + (1,) * (d.dim() - 1))
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta(x)).clamp(self.lo, self.hi)


@dataclass
class FeatureTrigger:
    """A trained generator as an unlearning trigger: the same duck type as
    :class:`nft_fast.trigger.Trigger` (``target`` is ``None``: no class is named or skipped)."""

    generator: Generator
    mask: torch.Tensor  # the benign-feature mask m (D,)
    norm: float  # mean per-sample RMS of G(x) - x on the clean set
    success: float  # fraction of clean samples whose prediction G changes
    target: Optional[int] = None
    kind: str = "feature"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``G(x)``, without gradient (the generator is fixed while the masks learn)."""
        g = self.generator
        if next(g.parameters()).device != x.device:
            g.to(x.device)
        with torch.no_grad():
            return g(x.contiguous()).to(x.dtype)


@torch.no_grad()
def _clean_features(model: nn.Module, head: nn.Linear, x: torch.Tensor, chunk: int = 512):
    dev = model_device(model)
    fs, outs = [], []
    for i in range(0, x.shape[0], chunk):
        f, out, _ = _run(model, head, x[i:i + chunk].to(dev))
        fs.append(f.float())
        outs.append(out.float())
    return torch.cat(fs), torch.cat(outs)


def _train_generator(model, head, g: Generator, x: torch.Tensor, m: torch.Tensor, *, steps: int, lr: float,
                     benign: float, batch_size: int, gen: torch.Generator) -> None:
    """Adam on G: push the non-benign features of G(x) away from x's, keep the benign ones."""
    dev = model_device(model)
    opt = torch.optim.Adam(g.parameters(), lr=lr)
    m = m.to(dev)
    for _ in range(steps):
        xb = x[torch.randint(x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)].to(dev)
        with torch.no_grad():
            f0 = _run(model, head, xb)[0].float()
        f1 = _run(model, head, g(xb))[0].float()
        d = (f1 - f0).pow(2)
        scale = f0.pow(2).mean().clamp_min(1e-12)  # relative to the clean features' energy
        away = (d * (1 - m)).mean() / scale
        keep = (d * m).mean() / scale
        # log: scale-free, so a near-identity G (delta ~ 0, where ``away`` and its gradient
        # vanish quadratically) still gets a usable push outwards, up to the bound
        loss = -torch.log(away + 1e-12) + benign * keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _identity(g: Generator, x: torch.Tensor, steps: int, lr: float, batch_size: int, gen: torch.Generator,
              dev: torch.device) -> None:
    opt = torch.optim.Adam(g.parameters(), lr=lr)
    for _ in range(steps):
        xb = x[torch.randint(x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)].to(dev)
        loss = g.delta(xb).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def _finish(model, head, g: Generator, m: torch.Tensor, x: torch.Tensor, chunk: int = 512) -> FeatureTrigger:
    g.eval()
    for p in g.parameters():
        p.requires_grad_(False)
    dev = model_device(model)
    dist = flips = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk].to(dev)
        xg = g(xb)
        dist += float((xg - xb).flatten(1).pow(2).mean(1).sqrt().sum())
        flips += float((model(xg).argmax(1) != model(xb).argmax(1)).sum())
    n = max(x.shape[0], 1)
    return FeatureTrigger(g.cpu(), m.cpu(), dist / n, flips / n)


def invert(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 800, eps: float = 0.07,
           width: int = 16, lr: float = 3e-3, identity_steps: int = 50, mask_steps: int = 200,
           mask_norm: float = 2.0, benign: float = 1.0, batch_size: int = 128, seed: int = 0) -> FeatureTrigger:
    """Train a backdoor generator for ``model`` on the clean set ``(x, y)``; its :class:`FeatureTrigger`.

    ``steps`` Adam steps on G (lr ``lr``) after ``identity_steps`` of identity training;
    ``eps``: the bound on the per-sample RMS of ``G(x) - x`` as a fraction of the clean set's
    value range; ``benign``: weight of keeping the benign features; ``mask_steps``: steps of
    :func:`feature_mask`. The model runs in eval() mode and is left unchanged."""
    if x.dim() not in (4, 5):
        raise ValueError(f"invert: inputs must be (N, C, H, W) images or (N, C, T, H, W) clips, got {tuple(x.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError("invert: x and y must hold the same non-zero number of samples")
    head = split_classifier(model, x)
    dev = model_device(model)
    lo, hi = float(x.min()), float(x.max())
    with fork_rng(dev), frozen(model):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        g = Generator(x.shape[1], x.dim() - 2, width, lo, hi, bound=eps * max(hi - lo, 1e-12)).to(dev)
        f0, _ = _clean_features(model, head, x)
        m = feature_mask(head, f0, y, steps=mask_steps, norm=mask_norm, seed=seed)
        _identity(g, x, identity_steps, lr, batch_size, gen, dev)
        _train_generator(model, head, g, x, m, steps=steps, lr=lr, benign=benign, batch_size=batch_size, gen=gen)
        return _finish(model, head, g, m, x)


def refresh(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trig: FeatureTrigger, *, steps: int = 70,
            lr: float = 3e-3, mask_steps: int = 200, mask_norm: float = 2.0, benign: float = 1.0, batch_size: int = 128,
            seed: int = 0) -> FeatureTrigger:
    """``trig``'s generator warm-started against the (partly purified) ``model``: the benign mask
    is re-learnt on its features, then ``steps`` more generator steps. ``trig`` is not modified."""
    head = split_classifier(model, x)
    dev = model_device(model)
    g = copy.deepcopy(trig.generator).to(dev)
    g.train()
    for p in g.parameters():
        p.requires_grad_(True)
    with fork_rng(dev), frozen(model):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        f0, _ = _clean_features(model, head, x)
        m = feature_mask(head, f0, y, steps=mask_steps, norm=mask_norm, seed=seed)
        _train_generator(model, head, g, x, m, steps=steps, lr=lr, benign=benign, batch_size=batch_size, gen=gen)
        return _finish(model, head, g, m, x)


# --- the poison-free signal ----------------------------------------------------------------

@torch.no_grad()
def flip_summary(model: nn.Module, x: torch.Tensor, trig: FeatureTrigger, chunk: int = 512) -> Dict[str, float]:
    """How the model reads ``G(x)`` on clean inputs (eval() mode, restored):

    ``inversion_flip_rate`` -- share of samples whose prediction G changes;
    ``inversion_suspect`` -- the class most changed predictions go to;
    ``inversion_concentration`` -- the share of changed predictions that go there;
    ``inversion_target_rate`` -- share of samples not predicted ``suspect`` on x that are on G(x);
    ``inversion_distance`` -- mean per-sample RMS of ``G(x) - x``.
    A backdoored model flips most inputs, to one class; a clean one few, spread out."""
    dev = model_device(model)
    g = trig.generator.to(dev)
    was = model.training
    model.eval()
    try:
        p0, p1, dist = [], [], 0.0
        for i in range(0, x.shape[0], chunk):
            xb = x[i:i + chunk].to(dev)
            xg = g(xb)
            dist += float((xg - xb).flatten(1).pow(2).mean(1).sqrt().sum())
            p0.append(model(xb).argmax(1).cpu())
            p1.append(model(xg).argmax(1).cpu())
    finally:
        model.train(was)
    p0, p1 = torch.cat(p0), torch.cat(p1)
    flipped = p1[p0 != p1]
    n = max(p0.numel(), 1)
    if flipped.numel():
        counts = torch.bincount(flipped)
        suspect = int(counts.argmax())
        conc = float(counts.max()) / flipped.numel()
    else:
        suspect, conc = int(torch.bincount(p1).argmax()), 0.0
    other = p0 != suspect
    target_rate = float((p1[other] == suspect).float().mean()) if bool(other.any()) else 0.0
    return {"inversion_flip_rate": flipped.numel() / n, "inversion_suspect": suspect,
            "inversion_concentration": conc, "inversion_target_rate": target_rate,
            "inversion_distance": dist / n}


def config_kwargs(cfg: NFTConfig, refresh: bool = False) -> Dict[str, float]:
    """The keywords :func:`invert` (or, with ``refresh``, :func:`refresh`: a third of the
    steps, no ``eps`` -- the bound lives in the generator) gets from an ``NFTConfig``."""
    kw = {"steps": cfg.inversion_steps, "eps": cfg.inversion_eps, "mask_norm": cfg.inversion_mask_norm,
          "batch_size": cfg.batch_size, "seed": cfg.seed}
    if refresh:
        kw.pop("eps")
        kw["steps"] = max(1, cfg.inversion_steps // 3)
    return kw
