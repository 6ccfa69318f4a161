"""Backdoor attacks: poisoned training sets, triggered test sets, and the
training of backdoored models.

Images are float tensors ``(N, C, H, W)`` in ``[0, 1]``; labels are int64. Every random
choice (trigger patterns, WaNet grids, generator initialisation, which samples get
poisoned) comes from a ``torch.Generator`` seeded from the attack's ``seed``, so an attack
rebuilt from :meth:`Attack.to_dict` (plus :meth:`Attack.state_dict` for InputAware) gives
the same triggers::

    atk = build_attack("badnets", target=0, seed=1)
    x_tr, y_tr, flags = atk.poison_train(x, y, rate=0.1)
    x_bd, y_true, y_target = atk.poison_test(x_test, y_test)
"""
from __future__ import annotations

import math
import time
from statistics import NormalDist
from typing import Any, Dict, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .._loop import progress_bar
from ..layout import guard_convs

_EPS = 1e-7


class Attack:
    """Base class: sample selection, label flipping and (de)serialisation.

    Subclasses set ``name``/``defaults`` and implement :meth:`apply` (static attacks build
    their trigger once per image shape in :meth:`_make`).
    """

    name: str = ""
    clean_label: bool = False
    defaults: Dict[str, Any] = {}

    def __init__(self, target: int = 0, all2all: bool = False, seed: int = 0, num_classes: int = 10, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; known: {sorted(self.defaults)}")
        if not 0 <= int(target) < int(num_classes):
            raise ValueError(f"{self.name}: target {target} is not a class of 0..{num_classes - 1}")
        if all2all and self.clean_label:
            raise ValueError(f"{self.name} is a clean-label attack and supports only all-to-one (all2all=False)")
        self.target, self.all2all, self.seed, self.num_classes = int(target), bool(all2all), int(seed), int(num_classes)
        for k, v in {**self.defaults, **params}.items():
            setattr(self, k, v)
        self._cache: Dict[Tuple[int, ...], Any] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items() if k != 'name')})"

    # --- randomness -----------------------------------------------------------------
    clips = False  # whether apply() also takes (N, C, T, H, W) clips

    def _gen(self, stream: int) -> torch.Generator:
        """An independent CPU generator per purpose (0: trigger, 1: selection, 2: noise, 3: nets)."""
        return torch.Generator().manual_seed((self.seed * 0x9E3779B1 + stream) % (2 ** 63))

    def _trigger(self, x: Tensor) -> Any:
        """The trigger for images shaped like ``x`` (built once per ``(C, H, W)``, on CPU)."""
        if x.dim() != 4 and not (x.dim() == 5 and self.clips):
            what = "images (N, C, H, W) or clips (N, C, T, H, W)" if self.clips else "images (N, C, H, W)"
            raise ValueError(f"{self.name}: expected {what}, got shape {tuple(x.shape)}")
        key = (x.shape[1],) + tuple(x.shape[-2:])  # a clip gets the same trigger on every frame
        if key not in self._cache:
            self._cache[key] = self._make(*key)
        return self._cache[key]

    def _make(self, c: int, h: int, w: int) -> Any:
        raise NotImplementedError

    # --- the attack -----------------------------------------------------------------
    def apply(self, x: Tensor) -> Tensor:
        """A triggered copy of ``x`` (``x`` is never modified)."""
        raise NotImplementedError

    def target_labels(self, y: Tensor) -> Tensor:
        """The attacker's labels: ``target`` everywhere, or ``(y + 1) % num_classes`` for all-to-all."""
        return (y + 1) % self.num_classes if self.all2all else torch.full_like(y, self.target)

    def candidates(self, y: Tensor) -> Tensor:
        """Which samples may be poisoned (bool mask): those whose label the attack changes, or
        for clean-label attacks the samples of the target class."""
        return y == self.target if self.clean_label else self.target_labels(y) != y

    def num_cross(self, n_poison: int) -> int:
        """Extra label-keeping 'noise' samples for ``n_poison`` poisoned ones (WaNet only)."""
        return 0

    def apply_noise(self, x: Tensor, g: torch.Generator) -> Tensor:
        raise NotImplementedError

    def select(self, y: Tensor, rate: float) -> Tuple[Tensor, Tensor]:
        """Indices ``(poisoned, noise)`` that :meth:`poison_train` uses: ``round(rate * #candidates)``
        random candidates, and :meth:`num_cross` random others (disjoint)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{self.name}: poison rate must be in [0, 1], got {rate}")
        if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels must be in 0..{self.num_classes - 1} (min {int(y.min())}, max {int(y.max())})")
        g = self._gen(1)
        y = y.cpu()
        cand = self.candidates(y).nonzero().flatten()
        pick = cand[torch.randperm(cand.numel(), generator=g)[: int(round(rate * cand.numel()))]]
        rest = torch.ones(y.numel(), dtype=torch.bool)
        rest[pick] = False
        rest = rest.nonzero().flatten()
        cross = rest[torch.randperm(rest.numel(), generator=g)[: min(self.num_cross(pick.numel()), rest.numel())]]
        return pick.sort().values, cross.sort().values

    def poison_train(self, x: Tensor, y: Tensor, rate: float) -> Tuple[Tensor, Tensor, Tensor]:
        """``(x', y', poisoned)``: ``rate`` of the candidates triggered (and relabelled unless
        clean-label); WaNet also warps label-keeping noise samples (see :meth:`select`)."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{self.name}: x has {x.shape[0]} samples but y has {y.shape[0]}")
        pick, cross = self.select(y, rate)
        x2, y2 = x.clone(), y.clone()
        flags = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        if pick.numel():
            pick = pick.to(x.device)
            x2[pick] = self.apply(x[pick])
            if not self.clean_label:
                y2[pick] = self.target_labels(y[pick])
            flags[pick] = True
        if cross.numel():
            cross = cross.to(x.device)
            x2[cross] = self.apply_noise(x[cross], self._gen(2))
        return x2, y2, flags

    def poison_test(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """``(x_triggered, y_true, y_target)`` for the samples whose target differs from their label."""
        yt = self.target_labels(y)
        keep = yt != y
        return self.apply(x[keep]), y[keep].clone(), yt[keep]

    # --- serialisation --------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """``name`` and the constructor parameters (JSON-serialisable)."""
        return {"name": self.name, "target": self.target, "all2all": self.all2all, "seed": self.seed,
                "num_classes": self.num_classes, **{k: getattr(self, k) for k in self.defaults}}

    def state_dict(self) -> Dict[str, Tensor]:
        """Tensors needed besides :meth:`to_dict` (none for static attacks)."""
        return {}

    def load_state_dict(self, sd: Dict[str, Tensor]) -> None:
        if sd:
            raise ValueError(f"{self.name} has no state; got keys {sorted(sd)[:5]}")


# --- static attacks -------------------------------------------------------------------

class _CornerPatch(Attack):
    """A ``(C, s, s)`` patch put at the bottom-right corner, blended with ``alpha`` (on every
    frame of a ``(N, C, T, H, W)`` clip: a clip-level trigger)."""

    clips = True

    def _patch(self, c: int, h: int, w: int) -> Tensor:
        raise NotImplementedError

    def _make(self, c: int, h: int, w: int) -> Tensor:
        p = self._patch(c, h, w)
        if p.shape[-1] > min(h, w):
            raise ValueError(f"{self.name}: a {p.shape[-1]}x{p.shape[-1]} patch does not fit {h}x{w} images")
        return p

    def apply(self, x: Tensor) -> Tensor:
        p = self._trigger(x).to(x)
        s, a = p.shape[-1], float(self.alpha)
        p = p.view(p.shape[:1] + (1,) * (x.dim() - 4) + p.shape[1:])
        out = x.clone()
        out[..., -s:, -s:] = (1 - a) * x[..., -s:, -s:] + a * p
        return out


class BadNets(_CornerPatch):
    """A 3x3 checkerboard (1 where ``i + j`` is even) blended into the bottom-right corner."""

    name = "badnets"
    defaults = {"alpha": 0.6, "size": 3}

    def _patch(self, c: int, h: int, w: int) -> Tensor:
        i = torch.arange(int(self.size))
        return ((i[:, None] + i[None, :]) % 2 == 0).float().expand(c, -1, -1)


class Trojan(_CornerPatch):
    """A fixed random binary watermark of side ``size`` (default ``max(3, round(min(H, W) / 7))``)
    pasted (``alpha=1``) at the bottom-right corner."""

    name = "trojan"
    defaults = {"size": None, "alpha": 1.0}

    def _patch(self, c: int, h: int, w: int) -> Tensor:
        s = int(self.size) if self.size is not None else max(3, round(min(h, w) / 7))
        return (torch.rand(c, s, s, generator=self._gen(0)) < 0.5).float()


class Blend(Attack):
    """A fixed uniform-noise image blended over the whole input."""

    name = "blend"
    defaults = {"alpha": 0.2}

    def _make(self, c: int, h: int, w: int) -> Tensor:
        return torch.rand(c, h, w, generator=self._gen(0))

    def apply(self, x: Tensor) -> Tensor:
        return (1 - self.alpha) * x + self.alpha * self._trigger(x).to(x)


class SIG(Attack):
    """Clean-label: a horizontal sinusoid ``delta * sin(2 pi j f / W)`` added and clipped;
    training poisons only target-class samples (labels unchanged)."""

    name = "sig"
    clean_label = True
    defaults = {"delta": 20 / 255, "f": 6}

    def _make(self, c: int, h: int, w: int) -> Tensor:
        j = torch.arange(w, dtype=torch.float64)
        return (self.delta * torch.sin(2 * math.pi * j * self.f / w)).float().expand(c, h, w)

    def apply(self, x: Tensor) -> Tensor:
        return (x + self._trigger(x).to(x)).clamp(0, 1)


class WaNet(Attack):
    """Warping-based trigger (Nguyen & Tran 2021): a ``k x k`` random flow field, upsampled
    bicubically, of strength ``s``; ``cross_ratio`` times as many extra training samples are
    warped with a randomly perturbed field and keep their labels (noise mode)."""

    name = "wanet"
    defaults = {"k": 4, "s": 0.5, "grid_rescale": 1.0, "cross_ratio": 2.0}

    def _make(self, c: int, h: int, w: int) -> Tuple[Tensor, Tensor]:
        ins = torch.rand(1, 2, self.k, self.k, generator=self._gen(0)) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        gy, gx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        scale = torch.tensor([w, h], dtype=torch.float32)  # grid is (x, y); the paper divides by H (square images)
        grid = ((torch.stack((gx, gy), -1)[None] + self.s * noise / scale) * self.grid_rescale).clamp(-1, 1)
        return grid, scale

    def _warp(self, x: Tensor, grid: Tensor) -> Tensor:
        return F.grid_sample(x, grid.to(x).expand(x.shape[0], -1, -1, -1), align_corners=True)

    def apply(self, x: Tensor) -> Tensor:
        return self._warp(x, self._trigger(x)[0])

    def num_cross(self, n_poison: int) -> int:
        return int(round(self.cross_ratio * n_poison))

    def apply_noise(self, x: Tensor, g: torch.Generator) -> Tensor:
        grid, scale = self._trigger(x)
        noise = (torch.rand(x.shape[0], *grid.shape[1:], generator=g) * 2 - 1) / scale
        return self._warp(x, (grid + noise).clamp(-1, 1))


# --- input-aware dynamic attack -------------------------------------------------------

def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(min(4, cout), cout), nn.ReLU())


class _Generator(nn.Module):
    """Small conv encoder-decoder (per-sample GroupNorm, so outputs never depend on the batch);
    returns logits of the input's size standardised per sample, so that they cannot all
    saturate (which kills the diversity loss's gradient)."""

    def __init__(self, cin: int, cout: int, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_block(cin, w), _block(w, w, 2))
        self.enc2 = nn.Sequential(_block(w, 2 * w), _block(2 * w, 2 * w, 2))
        self.dec2 = _block(2 * w, w)
        self.dec1 = nn.Sequential(_block(w, w), nn.Conv2d(w, cout, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h1 = self.enc1(x)
        h = self.dec2(F.interpolate(self.enc2(h1), size=h1.shape[-2:], mode="bilinear", align_corners=False))
        out = self.dec1(F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return F.group_norm(out, 1, eps=1e-5)


class InputAware(Attack):
    """Input-aware dynamic backdoor (Nguyen & Tran 2020): a generator ``G`` makes a per-input
    pattern in ``[0, 1]`` and a mask generator ``M`` a per-input mask; ``x' = x + (G(x) - x) M(x)``.

    The generators are trained with the classifier (:meth:`train_jointly`, used by
    :func:`train_backdoored`); :meth:`state_dict` holds their weights.
    """

    name = "inputaware"
    defaults = {"cross_ratio": 1.0, "width": 16, "lambda_div": 1.0, "lambda_norm": 100.0,
                "mask_density": 0.032, "mask_epochs": 2, "lr_g": 0.01}

    def __init__(self, target: int = 0, all2all: bool = False, seed: int = 0, num_classes: int = 10, **params: Any) -> None:
        super().__init__(target, all2all, seed, num_classes, **params)
        self.gen: Optional[_Generator] = None
        self.mask: Optional[_Generator] = None

    def build_generators(self, in_channels: int) -> None:
        """Fresh, seeded (untrained) generators for ``in_channels``-channel images."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2 ** 62, (), generator=self._gen(3))))
            self.gen = _Generator(in_channels, in_channels, int(self.width))
            self.mask = _Generator(in_channels, 1, int(self.width))

    def _nets(self, device: torch.device) -> Tuple[_Generator, _Generator]:
        if self.gen is None or self.mask is None:
            raise RuntimeError("inputaware: the trigger generators are not trained; run train_backdoored() "
                               "or load_state_dict() with the saved generator weights first")
        if next(self.gen.parameters()).device != device:
            self.gen.to(device)
            self.mask.to(device)
        return self.gen, self.mask

    def _pattern(self, x: Tensor) -> Tensor:
        return torch.sigmoid(2 * self._nets(x.device)[0](x))  # the paper's tanh(.) / 2 + 0.5

    def _mask(self, x: Tensor) -> Tensor:
        # the paper's tanh(.) / 2 + 0.5 then its sharp threshold; the (standardised) logits are
        # shifted by the normal quantile so that about mask_density of the pixels start "on"
        m = torch.sigmoid(2 * (self._nets(x.device)[1](x) - NormalDist().inv_cdf(1 - self.mask_density)))
        return torch.tanh(m * 20 - 10) / (2 + _EPS) + 0.5

    def generate(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(pattern, mask)`` for inputs ``x``, in ``[0, 1]`` (differentiable; no ``no_grad``)."""
        return self._pattern(x), self._mask(x)

    @staticmethod
    def _blend(x: Tensor, pattern: Tensor, mask: Tensor) -> Tensor:
        return x + (pattern - x) * mask

    @torch.no_grad()
    def apply(self, x: Tensor, source: Optional[Tensor] = None) -> Tensor:
        """Trigger ``x`` with the pattern and mask generated from ``x`` (or from ``source``:
        a cross trigger, which the backdoored model should ignore)."""
        if x.dim() != 4:
            raise ValueError(f"{self.name}: expected images (N, C, H, W), got shape {tuple(x.shape)}")
        src = x if source is None else source
        return torch.cat([self._blend(x[i:i + 512], *self.generate(src[i:i + 512])) for i in range(0, x.shape[0], 512)]
                         or [x.clone()])

    def state_dict(self) -> Dict[str, Tensor]:
        if self.gen is None or self.mask is None:
            return {}
        return {f"{p}.{k}": v.detach().cpu().contiguous().clone()
                for p, net in (("gen", self.gen), ("mask", self.mask)) for k, v in net.state_dict().items()}

    def load_state_dict(self, sd: Dict[str, Tensor]) -> None:
        if "gen.enc1.0.0.weight" not in sd:
            raise ValueError(f"inputaware: state has no generator weights (keys {sorted(sd)[:5]})")
        self.build_generators(int(sd["gen.enc1.0.0.weight"].shape[1]))
        for p, net in (("gen", self.gen), ("mask", self.mask)):
            net.load_state_dict({k[len(p) + 1:]: v for k, v in sd.items() if k.startswith(p + ".")})
        self.gen.eval()
        self.mask.eval()

    @staticmethod
    def _dist(a: Tensor, b: Tensor) -> Tensor:
        return (((a - b) ** 2).mean(dim=(1, 2, 3)) + _EPS).sqrt()  # eps: finite gradient at a == b

    def train_jointly(self, model: nn.Module, x: Tensor, y: Tensor, rate: float = 0.1, epochs: int = 5,
                      batch_size: int = 128, lr: float = 0.05, seed: int = 0, progress: bool = True) -> Dict[str, Any]:
        """Pre-train the mask generator (``mask_epochs``), then train ``model`` and the pattern
        generator together: per batch ``round(rate * B)`` backdoored samples (target labels),
        ``round(cross_ratio * rate * B)`` with a trigger made from another image (labels kept),
        the rest clean. Classifier: SGD(momentum 0.9, wd 5e-4), cosine LR; generators: Adam."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"inputaware: poison rate must be in [0, 1], got {rate}")
        device = next(model.parameters()).device
        guard_convs(model)  # its weights train: keep a channels_last model clear of the oneDNN bug
        if self.gen is None:
            self.build_generators(x.shape[1])
        gen, mask = self._nets(device)
        n = x.shape[0]
        bs = min(batch_size, n)
        steps = max(1, n // bs)
        nb = int(round(rate * bs))
        nc = min(int(round(self.cross_ratio * rate * bs)), bs - nb)
        g = torch.Generator().manual_seed(seed)
        bar = progress_bar((self.mask_epochs + epochs) * steps, "train (input-aware)", progress)

        def batches():
            p1, p2 = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
            for b in range(steps):
                i1, i2 = p1[b * bs:(b + 1) * bs], p2[b * bs:(b + 1) * bs]
                yield x[i1].to(device), y[i1].to(device), x[i2].to(device)

        def tick(loss: Tensor) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # 1) mask generator: diverse masks of bounded density
            mask.train().requires_grad_(True)
            opt_m = torch.optim.Adam(mask.parameters(), lr=self.lr_g, betas=(0.5, 0.9))
            for _ in range(int(self.mask_epochs)):
                for x1, _, x2 in batches():
                    m1, m2 = self._mask(x1), self._mask(x2)
                    div = (self._dist(x1, x2) / (self._dist(m1, m2) + _EPS)).mean()
                    loss = self.lambda_norm * F.relu(m1 - self.mask_density).mean() + self.lambda_div * div
                    opt_m.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_m.step()
                    tick(loss)
            mask.eval().requires_grad_(False)
            # 2) classifier + pattern generator
            gen.train().requires_grad_(True)
            params = [p for p in model.parameters() if p.requires_grad]
            opt_c = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
            opt_g = torch.optim.Adam(gen.parameters(), lr=self.lr_g, betas=(0.5, 0.9))
            sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs * steps) for o in (opt_c, opt_g)]
            model.train()
            for _ in range(epochs):
                for x1, y1, x2 in batches():
                    p1, m1 = self.generate(x1[:nb])
                    p2, m2 = self.generate(x2[nb:nb + nc])
                    inputs = torch.cat([self._blend(x1[:nb], p1, m1), self._blend(x1[nb:nb + nc], p2, m2), x1[nb + nc:]])
                    targets = torch.cat([self.target_labels(y1[:nb]), y1[nb:]])
                    loss = F.cross_entropy(model(inputs), targets)
                    if nb:  # diversity: different inputs must get different patterns
                        div = self._dist(x1[:nb], x2[:nb]) / (self._dist(p1, self._pattern(x2[:nb])) + _EPS)
                        loss = loss + self.lambda_div * div.mean()
                    opt_c.zero_grad(set_to_none=True)
                    opt_g.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_c.step()
                    opt_g.step()
                    for s in sched:
                        s.step()
                    tick(loss)
            gen.eval().requires_grad_(False)
        bar.close()
        model.eval()
        return {"poisoned": nb * steps * epochs, "cross": nc * steps * epochs, "seconds": time.perf_counter() - t0}


# --- registry -------------------------------------------------------------------------

ATTACKS: Dict[str, Type[Attack]] = {c.name: c for c in (BadNets, Blend, SIG, Trojan, WaNet, InputAware)}


def build_attack(name: str, **kw: Any) -> Attack:
    """An attack by name (case-insensitive; ``-``/``_`` ignored) with its parameters."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    return ATTACKS[key](**kw)


def attack_from_dict(d: Dict[str, Any], state: Optional[Dict[str, Tensor]] = None) -> Attack:
    """Rebuild an attack from :meth:`Attack.to_dict` (and :meth:`Attack.state_dict`)."""
    d = dict(d)
    if "name" not in d:
        raise ValueError(f"attack dict has no 'name' (keys {sorted(d)})")
    atk = build_attack(d.pop("name"), **d)
    if state:
        atk.load_state_dict(state)
    return atk


def train_backdoored(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, rate: float = 0.1, epochs: int = 5,
                     batch_size: int = 128, lr: float = 0.05, seed: int = 0, progress: bool = True,
                     checkpoint=None) -> Dict[str, Any]:
    """Train ``model`` in place on data poisoned by ``attack``; returns ``{"poisoned", "seconds"}``.

    Static attacks poison once (:meth:`Attack.poison_train`) and use
    :func:`nft_fast.train.train_classifier` (``checkpoint``: its epoch checkpoints); InputAware
    trains its generators jointly (no checkpoints: ``checkpoint`` must be None).
    """
    if isinstance(attack, InputAware):
        if checkpoint is not None:
            raise ValueError("inputaware trains its generators jointly and has no epoch checkpoints")
        return attack.train_jointly(model, x, y, rate, epochs, batch_size, lr, seed, progress)
    from ..data import ArrayDataset
    from .train import train_classifier

    t0 = time.perf_counter()
    xp, yp, flags = attack.poison_train(x, y, rate)
    train_classifier(model, ArrayDataset(xp, yp), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                     checkpoint=checkpoint)
    return {"poisoned": int(flags.sum()), "seconds": time.perf_counter() - t0}
