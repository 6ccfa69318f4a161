"""Trigger synthesis from clean data only (Neural-Cleanse style), used two ways:

* as a **signal** that needs no poisoned data (:func:`scan`): for every class, the smallest
  input mask that sends clean images of the other classes there. A backdoored network has
  one class reachable with a tiny mask (its trigger); the anomaly index (median absolute
  deviation of the mask norms, as in Neural Cleanse) says how much smaller it is than the
  rest. Reported before and after purification, it tells a user whether to trust a run.
* as **unlearning inputs** inside the NFT mask objective (``NFTConfig.trigger_weight``):
  the synthesized trigger of the most suspicious class(es) is stamped on clean images,
  which must keep their true label -- the masks learn to switch off the neurons that
  carry the shortcut, which MixUp alone does not find.

A trigger is ``x' = (1 - m) * x + m * p`` with a per-pixel mask ``m`` in [0, 1] (shared
over channels) and a pattern ``p`` in the data's value range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._loop import frozen, model_device

__all__ = ["Trigger", "ScanResult", "synthesize", "scan", "search", "universal", "Perturbation", "backdoor_likely"]


@dataclass
class Trigger:
    """A synthesized trigger for class ``target``: ``mask`` (1, *S) and ``pattern`` (C, *S) for
    inputs ``(N, C, H, W)`` (S = (H, W)) or clips ``(N, C, T, H, W)`` (S = (1, H, W), shared by every frame)."""

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    norm: float  # L1 norm of the mask (pixels)
    success: float  # fraction of other-class clean images sent to ``target``
    kind: str = "patch"  # "patch": learned mask; "blend": a fixed uniform mask (Blend-style)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x.device, x.dtype)
        return (1 - m) * x + m * self.pattern.to(x.device, x.dtype)


@dataclass
class ScanResult:
    """Per-class triggers, and the anomaly index of each class's mask norm (larger = more suspicious)."""

    triggers: List[Trigger]
    anomaly: List[float] = field(default_factory=list)

    @property
    def suspect(self) -> int:
        """The class with the smallest trigger (highest anomaly index)."""
        return self.ranked()[0].target

    @property
    def max_anomaly(self) -> float:
        return max(self.anomaly)

    def ranked(self) -> List[Trigger]:
        """Triggers from most to least suspicious."""
        return [self.triggers[k] for k in sorted(range(len(self.anomaly)), key=lambda k: -self.anomaly[k])]

    def summary(self) -> Dict[str, float]:
        t = self.ranked()[0]
        norms = sorted(tr.norm for tr in self.triggers)
        return {"trigger_anomaly": self.max_anomaly, "trigger_suspect": self.suspect, "trigger_norm": t.norm,
                "trigger_median_norm": norms[len(norms) // 2], "trigger_success": t.success}


def synthesize(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    *,
    steps: int = 150,
    lr: float = 0.1,
    l1: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
    init: Optional[Trigger] = None,
    kind: str = "patch",
    alpha: float = 0.2,
) -> Trigger:
    """The smallest mask/pattern sending clean images of other classes to ``target``.

    Minimises ``CE(model(x'), target) + l1 * |m|_1`` over ``steps`` Adam steps on random
    batches of the non-``target`` samples, with the model in ``eval()`` mode and its
    parameters untouched (``init`` warm-starts from an earlier trigger).
    ``kind="blend"`` learns only the pattern, under a fixed uniform mask ``alpha`` (a
    whole-image, low-amplitude trigger such as Blend's, which no small mask can express).
    """
    if kind not in ("patch", "blend"):
        raise ValueError(f"synthesize: kind must be 'patch' or 'blend', got {kind!r}")
    if init is not None:
        kind = init.kind
        if kind == "blend":
            alpha = float(init.mask.reshape(-1)[0])
    src = x[y != target]
    if src.shape[0] == 0:
        raise ValueError(f"synthesize: the clean set has no samples outside class {target}")
    m, p, _ = _optimize(model, src, None, target, steps=steps, lr=lr, l1=l1, batch_size=batch_size, seed=seed,
                        init=init, kind=kind, alpha=alpha, value_range=(float(x.min()), float(x.max())))
    return Trigger(target, m, p, float(m.sum()), _success(model, src, (m, p), target), kind)


def _spatial(x: torch.Tensor) -> tuple:
    # clips (N, C, T, H, W): one mask and pattern shared by every frame (a clip-level
    # trigger), broadcast over T -- per-frame masks make a planted trigger look 8x larger
    return (1,) + tuple(x.shape[-2:]) if x.dim() == 5 else tuple(x.shape[2:])


def _optimize(model: nn.Module, src: torch.Tensor, src_y: Optional[torch.Tensor], target: Optional[int], *,
              steps: int, lr: float, l1: float, batch_size: int, seed: int, init: Optional[Trigger], kind: str,
              alpha: float, value_range: tuple, exclude: Sequence[int] = ()) -> tuple:
    """Adam on a mask/pattern pair; returns ``(mask, pattern, target)`` on the CPU.

    With ``target`` set: minimise ``CE(model(x'), target) + l1 |m|_1`` over ``src``. With
    ``target=None`` (class-agnostic): each step pushes the batch (samples of ``src_y`` other
    than the class) towards the class the triggered batch is most drawn to, among the
    classes not in ``exclude``, so the search settles on the easiest class to reach."""
    device = model_device(model)
    lo, hi = value_range
    c = src.shape[1]
    spatial = _spatial(src)
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        m0 = init.mask.clamp(1e-3, 1 - 1e-3)
        p0 = ((init.pattern - lo) / max(hi - lo, 1e-12)).clamp(1e-3, 1 - 1e-3)
        m_logit = torch.logit(m0).to(device).clone()
        p_logit = torch.logit(p0).to(device).clone()
    else:
        m_logit = torch.full((1,) + spatial, -3.0, device=device)
        p_logit = (torch.rand((c,) + spatial, generator=gen) * 2 - 1).to(device)
    fixed = torch.full((1,) + spatial, float(alpha), device=device)
    m_logit.requires_grad_(kind == "patch")
    p_logit.requires_grad_(True)
    opt = torch.optim.Adam([m_logit, p_logit] if kind == "patch" else [p_logit], lr=lr, betas=(0.5, 0.9))
    excluded = torch.tensor(sorted(set(int(k) for k in exclude)), dtype=torch.long, device=device)
    with frozen(model):
        for _ in range(steps):
            idx = torch.randint(src.shape[0], (min(batch_size, src.shape[0]),), generator=gen)
            xb = src[idx].to(device)
            m = torch.sigmoid(m_logit) if kind == "patch" else fixed
            p = lo + (hi - lo) * torch.sigmoid(p_logit)
            out = model((1 - m) * xb + m * p).float()
            if target is None:
                yb = src_y[idx].to(device)
                logp = F.log_softmax(out, 1)
                with torch.no_grad():  # mean log-probability of each class over the samples not of it
                    own = F.one_hot(yb, out.shape[1]).bool()
                    score = logp.masked_fill(own, 0).sum(0) / (~own).sum(0).clamp_min(1)
                    if excluded.numel():
                        score[excluded] = -float("inf")
                    target_now = int(score.argmax())
                keep = yb != target_now
                loss = -logp[keep, target_now].mean() if bool(keep.any()) else out.sum() * 0
            else:
                target_now = target
                loss = F.cross_entropy(out, torch.full((xb.shape[0],), target, device=device, dtype=torch.long))
            if kind == "patch":
                loss = loss + l1 * m.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        m = torch.sigmoid(m_logit).detach() if kind == "patch" else fixed
        p = (lo + (hi - lo) * torch.sigmoid(p_logit)).detach()
    return m.cpu(), p.cpu(), target_now


def _success(model: nn.Module, src: torch.Tensor, stamp, target: int) -> float:
    """Fraction of ``src`` that ``stamp`` (a batch -> triggered batch function, or a mask/pattern
    pair ``(m, p)``) sends to ``target``."""
    device = model_device(model)
    if isinstance(stamp, tuple):
        m, p = (t.to(device) for t in stamp)
        stamp = lambda xb: (1 - m) * xb + m * p  # noqa: E731
    hit = n = 0
    with frozen(model), torch.no_grad():
        for i in range(0, src.shape[0], 512):
            xb = src[i:i + 512].to(device)
            hit += int((model(stamp(xb)).argmax(1) == target).sum())
            n += xb.shape[0]
    return hit / max(n, 1)


@dataclass
class Perturbation:
    """A universal additive trigger for class ``target``: ``x' = clip(x + delta)`` with one
    ``delta`` (C, *S) for every input; it can change every pixel a little (a Blend-style or
    warping trigger) where a :class:`Trigger`'s small mask cannot."""

    target: int
    delta: torch.Tensor
    value_range: tuple
    norm: float  # RMS of delta
    success: float
    kind: str = "universal"
    radius: float = 0.0  # L2 bound of delta (0: unknown, no further steps)
    blocks: int = 0  # > 0: delta is constant on a blocks x blocks grid of each frame (low frequency)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.delta.to(x.device, x.dtype)).clamp(*self.value_range)

    def ascend(self, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, lr: float = 0.125) -> None:
        """One normalised-gradient step of ``delta`` (length ``lr * radius``) towards ``target`` on
        the batch ``x`` through ``forward`` (the model as it is now, e.g. masked during
        purification), projected back on the L2 ball; the gradient reaches ``delta`` only."""
        if self.radius <= 0:
            raise ValueError("Perturbation.ascend: the perturbation has no radius (make it with nft_fast.trigger.universal)")
        d = _universal_step(forward, x, self.delta.to(x.device, x.dtype), self.target, self.value_range,
                            lr * self.radius, self.radius, self.blocks)
        self.delta = d.to(self.delta.device, self.delta.dtype)


def _lowpass(g: torch.Tensor, blocks: int) -> torch.Tensor:
    """``g`` (C, [T,] H, W) averaged over a ``blocks`` x ``blocks`` grid of each frame and spread
    back: the projection onto deltas that are constant on each cell."""
    size = g.shape[-2:]
    flat = g.reshape((-1, 1) + tuple(size))
    low = F.adaptive_avg_pool2d(flat, (min(blocks, size[0]), min(blocks, size[1])))
    return F.interpolate(low, size=size, mode="nearest").reshape(g.shape)


def _universal_step(forward, xb: torch.Tensor, d: torch.Tensor, target: int, value_range: tuple, step: float,
                    radius: float, blocks: int) -> torch.Tensor:
    """``d`` moved by ``step`` (L2) along the normalised gradient towards ``target`` on ``xb``
    (low-passed when ``blocks``), then projected on the L2 ball of ``radius``."""
    d = d.detach().requires_grad_(True)
    out = forward((xb + d).clamp(*value_range)).float()
    loss = F.cross_entropy(out, torch.full((xb.shape[0],), target, device=xb.device, dtype=torch.long))
    (g,) = torch.autograd.grad(loss, d)
    with torch.no_grad():
        if blocks > 0:
            g = _lowpass(g, blocks)
        d = d - step * g / g.norm().clamp_min(1e-12)
        return d * (radius / d.norm().clamp_min(1e-12)).clamp(max=1.0)


def universal(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    *,
    rms: float = 0.1,
    steps: int = 60,
    batch_size: int = 128,
    seed: int = 0,
    init: Optional[Perturbation] = None,
    blocks: int = 0,
) -> Perturbation:
    """The universal perturbation, of RMS at most ``rms`` times the data's value range, that
    sends clean images of other classes to ``target`` (normalised-gradient ascent on the
    target's log-probability, projected on the L2 ball; ``init`` warm-starts). ``blocks > 0``
    keeps it constant on a ``blocks`` x ``blocks`` grid of each frame: a low-frequency
    perturbation (a brightness or colour shift, a blended image's mean) that high-frequency
    adversarial noise cannot stand in for."""
    src = x[y != target]
    if src.shape[0] == 0:
        raise ValueError(f"universal: the clean set has no samples outside class {target}")
    if blocks < 0:
        raise ValueError(f"universal: blocks must be >= 0, got {blocks}")
    device = model_device(model)
    lo, hi = float(x.min()), float(x.max())
    radius = rms * (hi - lo) * float(src[0].numel()) ** 0.5
    gen = torch.Generator().manual_seed(seed)
    d = (init.delta.clone() if init is not None else torch.zeros(tuple(src.shape[1:]))).to(device)
    with frozen(model):
        for _ in range(steps):
            idx = torch.randint(src.shape[0], (min(batch_size, src.shape[0]),), generator=gen)
            d = _universal_step(model, src[idx].to(device), d, target, (lo, hi), radius / 4, radius, blocks)
    d = d.detach()
    return Perturbation(target, d.cpu(), (lo, hi), float(d.pow(2).mean().sqrt()),
                        _success(model, src, lambda xb: (xb + d).clamp(lo, hi), target), radius=radius, blocks=blocks)


def _anomaly(norms: Sequence[float]) -> List[float]:
    """Neural Cleanse's anomaly index: ``(median - norm) / (1.4826 * MAD)`` (positive = smaller than usual)."""
    t = torch.tensor(list(norms), dtype=torch.float64)
    med = t.median()
    mad = (t - med).abs().median() * 1.4826
    mad = max(float(mad), 1e-12)
    return [float((med - v) / mad) for v in t]


def scan(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: Optional[Sequence[int]] = None,
    **kw,
) -> ScanResult:
    """A trigger per class (``classes``: default every label in ``y``) and their anomaly indices."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError("scan: x and y must hold the same non-zero number of samples")
    if classes is None:
        classes = sorted(int(c) for c in y.unique())
    if len(classes) < 3:
        raise ValueError(f"scan needs at least 3 classes to compare trigger sizes, got {len(classes)}")
    # several classes per forward on a GPU (small batches leave it idle); one at a time on a
    # CPU, where larger batches measured no faster
    rows = 512 if model_device(model).type == "cuda" else 0
    triggers = _scan_together(model, x, y, [int(k) for k in classes], max_rows=rows, **kw)
    return ScanResult(triggers, _anomaly([t.norm for t in triggers]))


def _scan_together(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: List[int], *, steps: int = 150,
                   lr: float = 0.1, l1: float = 0.01, batch_size: int = 128, seed: int = 0,
                   max_rows: int = 512) -> List[Trigger]:
    """:func:`synthesize` for every class in ``classes``, several classes per forward.

    Each class keeps its own generator (seeded with ``seed``, as :func:`synthesize` seeds it),
    its own batches of the other classes' samples and its own mask/pattern; one forward takes
    up to ``max_rows`` rows (``max_rows // batch_size`` classes, at least one). The model is in ``eval()``
    mode, so rows do not interact, each class's loss is its own mean, and Adam is elementwise:
    every class follows the same steps as alone (up to float rounding), at fewer, larger
    forwards."""
    for k in classes:
        if not bool((y != k).any()):
            raise ValueError(f"synthesize: the clean set has no samples outside class {k}")
    device = model_device(model)
    lo, hi = float(x.min()), float(x.max())
    c, spatial = x.shape[1], _spatial(x)
    per = max(1, max_rows // max(batch_size, 1))
    out: List[Trigger] = []
    for start in range(0, len(classes), per):
        group = classes[start:start + per]
        srcs = [x[y != k] for k in group]
        gens = [torch.Generator().manual_seed(seed) for _ in group]
        m_logit = torch.full((len(group), 1) + spatial, -3.0, device=device)
        p_logit = torch.stack([torch.rand((c,) + spatial, generator=g) * 2 - 1 for g in gens]).to(device)
        m_logit.requires_grad_(True)
        p_logit.requires_grad_(True)
        opt = torch.optim.Adam([m_logit, p_logit], lr=lr, betas=(0.5, 0.9))
        sizes = [min(batch_size, s.shape[0]) for s in srcs]
        target = torch.cat([torch.full((n,), k, dtype=torch.long) for n, k in zip(sizes, group)]).to(device)
        row_class = torch.cat([torch.full((n,), j, dtype=torch.long) for j, n in enumerate(sizes)]).to(device)
        weight = torch.cat([torch.full((n,), 1.0 / n) for n in sizes]).to(device)  # each class's own mean
        with frozen(model):
            for _ in range(steps):
                xb = torch.cat([s[torch.randint(s.shape[0], (n,), generator=g)]
                                for s, n, g in zip(srcs, sizes, gens)]).to(device)
                m = torch.sigmoid(m_logit)[row_class]
                p = lo + (hi - lo) * torch.sigmoid(p_logit)[row_class]
                logits = model((1 - m) * xb + m * p).float()
                loss = (F.cross_entropy(logits, target, reduction="none") * weight).sum() + l1 * torch.sigmoid(m_logit).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            ms = torch.sigmoid(m_logit).detach().cpu()
            ps = (lo + (hi - lo) * torch.sigmoid(p_logit)).detach().cpu()
        for j, k in enumerate(group):
            out.append(Trigger(k, ms[j], ps[j], float(ms[j].sum()), _success(model, srcs[j], (ms[j], ps[j]), k)))
    return out


def search(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    restarts: int = 4,
    steps: int = 150,
    lr: float = 0.1,
    l1: float = 0.01,
    batch_size: int = 128,
    seed: int = 0,
) -> ScanResult:
    """A class-agnostic scan whose cost does not grow with the number of classes.

    ``restarts`` searches, each for the smallest mask/pattern that sends clean images of
    other classes to *whichever* class is easiest to reach; every search excludes the
    classes the earlier ones settled on. A backdoored network's target is reachable with a
    far smaller trigger than any other class, so it is found by one of the searches, and its
    anomaly index (Neural Cleanse's MAD rule over the ``restarts`` candidates) stands out as in
    :func:`scan`. ``restarts * steps`` optimizer steps in all, for 10 or 1,000 classes."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError("search: x and y must hold the same non-zero number of samples")
    n_classes = int(y.unique().numel())
    if restarts < 3 or restarts > n_classes:
        raise ValueError(f"search: restarts must be in [3, {n_classes}] (the classes in y), got {restarts}")
    vr = (float(x.min()), float(x.max()))
    found: List[Trigger] = []
    for r in range(restarts):
        m, p, k = _optimize(model, x, y, None, steps=steps, lr=lr, l1=l1, batch_size=batch_size, seed=seed + r,
                            init=None, kind="patch", alpha=0.0, value_range=vr, exclude=[t.target for t in found])
        src = x[y != k]
        found.append(Trigger(k, m, p, float(m.sum()), _success(model, src, (m, p), k)))
    return ScanResult(found, _anomaly([t.norm for t in found]))


def backdoor_likely(before: Dict[str, float], after: Dict[str, float], threshold: float = 2.0,
                    norm_ratio: float = 0.5) -> bool:
    """The poison-free verdict on a purified model: its scan still finds an anomalously small
    trigger (index above ``threshold``) for the class the backdoored model's scan suspected,
    and that trigger is still small in absolute terms: its L1 norm under ``norm_ratio`` times
    the backdoored model's median class norm. The second test keeps a class that became the
    easiest of a purified model (every norm grows) from reading as a backdoor; a summary
    without norms is judged on the first test alone. ``before``/``after`` are
    :meth:`ScanResult.summary` dicts (docs/purification.md measures the rule)."""
    if not (after["trigger_anomaly"] > threshold and after["trigger_suspect"] == before["trigger_suspect"]):
        return False
    if "trigger_norm" in after and "trigger_median_norm" in before:
        return after["trigger_norm"] < norm_ratio * before["trigger_median_norm"]
    return True
