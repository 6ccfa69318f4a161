"""Purification hyper-parameters; the defaults are the reference (paper) settings."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from . import _checks

__all__ = [
    "NFTConfig", "PRESETS", "MAX_STEPS", "AUTO_SCAN_CLASSES",
]

_PRECISIONS = ("fp32", "bf16")
#: Upper limit of every step count (steps, adv_steps, trigger_steps, inversion_steps): the
#: reference takes 1000 steps; a million is days of CPU time, more is a typo.
MAX_STEPS = 1_000_000
_TRIGGER_KINDS = ("patch", "feature")
_F32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
#: trigger_search="auto" scans every class up to this many classes, and searches class-agnostically above.
AUTO_SCAN_CLASSES = 16


@dataclass
class NFTConfig:
    """Hyper-parameters of one NFT run. The defaults are the reference (paper) settings."""

    steps: int = 1000
    rounds: int = 5
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.95
    eta_min: float = 0.02
    mixup_alpha: float = 1.0
    reg_coef: float = 1e-3
    floor_alpha: float = 0.8
    floor_beta: float = 0.5
    seed: int = 0
    precision: str = "fp32"
    # None: channels_last (channels_last_3d for Conv3d) whenever the model has Conv2d or
    # Conv3d layers (faster convolutions on CPU and GPU; numerically equivalent, not
    # bit-identical, to NCHW).
    channels_last: Optional[bool] = None
    # Extensions beyond the reference (all off by default; see docs/purification.md):
    # adversarial inputs inside the mask objective -- each step adds
    # ``adv_weight * CE(model(x + delta), y)`` where ``delta`` is an L-inf PGD perturbation
    # of radius ``adv_eps`` (``adv_steps`` steps, random start) of the *unmixed* clean batch.
    # Backdoored networks are easiest to fool along the trigger's features, so the masks
    # learn to suppress the neurons that carry them.
    adv_eps: float = 0.0
    adv_steps: int = 1
    adv_weight: float = 1.0
    # Trigger unlearning: synthesize a trigger per class from the clean set (nft_fast.trigger),
    # then each step adds ``trigger_weight * CE(model(trigger(x)), y)`` for the
    # ``trigger_top`` most suspicious classes (re-synthesized against the masked model at
    # the start of every round when ``trigger_refresh``).
    trigger_weight: float = 0.0
    trigger_top: int = 1
    trigger_steps: int = 150
    # Samples per step of each class's trigger search in the per-class scan and its refreshes
    # (Neural Cleanse's 32: a quarter of the cost of 128 at the same anomaly ranking).
    trigger_batch: int = 32
    # > 0: the unlearning term (and the online universal step) takes at most this many of the
    # batch's samples outside the trigger's class, a fixed share of each step's cost; 0: all.
    trigger_rows: int = 0
    trigger_l1: float = 0.01
    trigger_refresh: bool = True
    # > 0: also unlearn a whole-image Blend-style trigger of the suspect class (pattern
    # learned under a uniform mask of this strength), alternating with the patch trigger.
    trigger_blend: float = 0.0
    # Unlearn only when the scan's anomaly index reaches this value (0: always); the
    # "auto" preset uses Neural Cleanse's 2.0, so a model without an anomalously small
    # trigger gets the plain reference objective.
    trigger_min_anomaly: float = 0.0
    # What the unlearning term unlearns (when trigger_weight > 0): "patch" -- the scan's
    # per-class mask+pattern triggers above; "feature" -- one class-agnostic generator G
    # (nft_fast.inversion, BTI-DBF style: moves the non-benign features of the last Linear's
    # input), each step adding ``trigger_weight * CE(model(G(x)), y)`` over the whole batch
    # (trigger_top, trigger_steps, trigger_l1, trigger_blend and trigger_min_anomaly are
    # patch-only). inversion_steps: generator steps (a third of them at each refresh);
    # inversion_eps: bound on the per-sample RMS of G(x) - x, as a fraction of the clean
    # set's value range; inversion_mask_norm: weight of the benign-mask norm term.
    trigger_kind: str = "patch"
    # How the patch trigger to unlearn is found: "classes" -- Neural Cleanse's scan, one
    # search per class (its cost grows with the number of classes); "agnostic" --
    # ``trigger_restarts`` class-agnostic searches, each settling on the easiest class to
    # reach that the earlier ones did not (nft_fast.trigger.search; the same cost for 10 or
    # 1,000 classes); "auto" -- "classes" up to AUTO_SCAN_CLASSES classes, "agnostic" above.
    trigger_search: str = "classes"
    # > 0: also unlearn a universal additive trigger of the suspect class (RMS at most this
    # fraction of the value range; nft_fast.trigger.universal), in turn with the patch trigger.
    trigger_universal: float = 0.0
    # True: the universal perturbation also takes one step against the masked model each time
    # it is unlearned (universal adversarial training of the masks towards the suspect class),
    # so the masks must close every small universal route to that class, not one found route.
    trigger_online: bool = False
    # > 0: a second, low-frequency universal perturbation (constant on a blocks x blocks grid of
    # each frame: a brightness or colour shift, a blended image's mean, which adversarial noise
    # cannot stand in for) is unlearned in turn with the patch and the full-resolution one.
    trigger_universal_blocks: int = 0
    # > 0: when the scan's anomaly index reaches this value (a small trigger found beyond
    # doubt), the patch trigger is unlearned with weight trigger_confident_weight, else at
    # trigger_weight; universal perturbations (trigger_universal) take their turns at
    # trigger_weight either way. The decision and the index are in the scan's history entry
    # (trigger_mode: "confident" or "patch", "+universal" when they are unlearned).
    trigger_confident: float = 0.0
    trigger_confident_weight: float = 3.0
    trigger_restarts: int = 4
    inversion_steps: int = 800
    inversion_eps: float = 0.07
    inversion_mask_norm: float = 2.0
    # Re-estimate BatchNorm running statistics on the unmixed clean set after the last
    # round (MixUp batches have a smaller variance than real inputs).
    bn_recalibrate: bool = False
    # The reference divides reg_coef by N_c (clean samples per class), so one-shot data
    # pulls the masks to 1 sixty times harder than 1% data; False uses reg_coef as is.
    reg_per_class: bool = True
    # Capture the whole step (MixUp, forward, backward, mask update) as one CUDA graph and
    # replay it; lam, perm, the batch and the learning rate are fed through device buffers.
    # CUDA only, static batch shape, no extra losses (adv_* / trigger_*).
    cuda_graph: bool = False
    # "videomix": cut-and-mix instead of blending (VideoMix for clips: a spatio-temporal cuboid
    # of another clip pasted in, its volume share (1 - lam) with lam ~ Beta(mixup_alpha,
    # mixup_alpha); CutMix's rectangle for images); the labels are weighted by the actual shares.
    mixup_kind: str = "mixup"
    # "auto" above: VideoMix for clip inputs (N, C, T, H, W), MixUp for images.
    # reg_coef_clips: the reg_coef used instead when the inputs are clips (None: reg_coef).
    reg_coef_clips: Optional[float] = None

    def __post_init__(self) -> None:
        own = "NFTConfig"
        for name in ("steps", "rounds", "batch_size", "adv_steps", "trigger_top", "trigger_steps", "trigger_batch",
                     "inversion_steps", "trigger_restarts"):
            _checks.positive_int(name, getattr(self, name), owner=own, hi=MAX_STEPS if name.endswith("steps") else None)
        for name in ("trigger_online", "trigger_refresh", "bn_recalibrate", "reg_per_class", "cuda_graph"):
            _checks.one_of(name, getattr(self, name), (True, False), owner=own)
        for name in ("trigger_universal_blocks", "trigger_rows"):
            _checks.number(name, getattr(self, name), owner=own)
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"NFTConfig: {name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.steps % self.rounds:
            raise ValueError(f"NFTConfig: steps ({self.steps}) must be a multiple of rounds ({self.rounds})")
        for name in ("eta_min", "mixup_alpha", "reg_coef", "floor_beta", "adv_eps", "adv_weight", "trigger_weight",
                     "trigger_l1", "trigger_min_anomaly", "trigger_blend", "trigger_universal", "trigger_confident",
                     "trigger_confident_weight", "inversion_mask_norm"):
            _checks.number(name, getattr(self, name), owner=own)
        _checks.number("lr", self.lr, hi=_F32_MAX, lo_open=True, owner=own)  # a step size of the float32 masks
        _checks.seed("seed", self.seed, owner=own)
        _checks.number("inversion_eps", self.inversion_eps, lo_open=True, owner=own)
        _checks.number("momentum", self.momentum, hi=1.0, hi_open=True, owner=own)
        # masks are clamped to [floor, 1]
        _checks.number("floor_alpha", self.floor_alpha, hi=1.0, owner=own)
        _checks.one_of("precision", self.precision, _PRECISIONS, owner=own)
        _checks.one_of("mixup_kind", self.mixup_kind, ("mixup", "videomix", "auto"), owner=own)
        if self.reg_coef_clips is not None:
            _checks.number("reg_coef_clips", self.reg_coef_clips, owner=own)
        if self.cuda_graph and self.mixup_kind != "mixup":
            raise ValueError("NFTConfig: cuda_graph captures the MixUp step only (mixup_kind='mixup')")
        _checks.one_of("trigger_kind", self.trigger_kind, _TRIGGER_KINDS, owner=own)
        _checks.one_of("trigger_search", self.trigger_search, ("classes", "agnostic", "auto"), owner=own)
        if self.trigger_restarts < 3:
            raise ValueError(f"NFTConfig: trigger_restarts must be at least 3 (the anomaly index compares them), "
                             f"got {self.trigger_restarts}")
        if self.cuda_graph and ((self.adv_eps > 0 and self.adv_weight > 0) or self.trigger_weight > 0):
            raise ValueError("NFTConfig: cuda_graph captures the plain NFT step only: turn off adv_* and trigger_* losses")

    @property
    def steps_per_round(self) -> int:
        return self.steps // self.rounds

    def search_mode(self, num_classes: int) -> str:
        """``"classes"`` or ``"agnostic"``: how the trigger is searched for a task of ``num_classes``."""
        if self.trigger_search == "auto":
            return "classes" if num_classes <= AUTO_SCAN_CLASSES else "agnostic"
        return self.trigger_search

    def floor(self, layer: int) -> float:
        """Lower clamp bound mu(l) = alpha * exp(-beta * l) of mask layer l (1-based)."""
        return self.floor_alpha * math.exp(-self.floor_beta * layer)

    def round_lr(self, r: int) -> float:
        """Learning rate of round r (0-based): CosineAnnealingLR(T_max=rounds, eta_min) stepped per round."""
        return self.eta_min + (self.lr - self.eta_min) * (1 + math.cos(math.pi * r / self.rounds)) / 2

    @classmethod
    def preset(cls, name: str, **overrides) -> "NFTConfig":
        """A named configuration: ``"reference"`` (the paper's settings, ``NFTConfig()``) or
        ``"strong"`` (trigger unlearning added to the mask objective; docs/purification.md
        gives the ablations behind each choice) or ``"auto"`` (strong when the clean-set
        trigger scan finds an anomalous class, the reference otherwise). ``overrides``
        replace single fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def for_inputs(self, clips: bool) -> "NFTConfig":
        """This configuration with its input-dependent choices made for images (``clips=False``)
        or clips (5-D inputs): ``mixup_kind="auto"`` becomes ``"videomix"`` for clips and
        ``"mixup"`` for images, and ``reg_coef_clips`` (when set) replaces ``reg_coef`` for clips.
        A configuration without such choices comes back unchanged."""
        kw: dict = {}
        if self.mixup_kind == "auto":
            kw["mixup_kind"] = "videomix" if clips else "mixup"
        if self.reg_coef_clips is not None:
            kw["reg_coef_clips"] = None
            if clips:
                kw["reg_coef"] = self.reg_coef_clips
        return dataclasses.replace(self, **kw) if kw else self

    def replace(self, **kw) -> "NFTConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Named configurations (:meth:`NFTConfig.preset`).
PRESETS = {
    "reference": {},
    "strong": {"trigger_weight": 1.0, "trigger_top": 1, "trigger_refresh": True, "bn_recalibrate": False,
               "steps": 400, "rounds": 4, "reg_coef": 0.05, "trigger_universal": 0.15, "trigger_online": True,
               "trigger_universal_blocks": 4, "trigger_confident": 3.0, "trigger_search": "auto",
               # clips: VideoMix, and a sixth of the pull (at 10 clips per class, the pull per
               # sample of 1% image data; docs/purification.md)
               "mixup_kind": "auto", "reg_coef_clips": 0.05 / 6},
}
PRESETS["auto"] = dict(PRESETS["strong"], trigger_min_anomaly=2.0)
