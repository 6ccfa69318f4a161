"""Baseline defenses to compare NFT against, on the same mask machinery and result type.

* :func:`finetune` -- vanilla fine-tuning of every weight (``mixup_alpha > 0``: FT+MixUp).
* :func:`anp` -- Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), as in the
  official code (``csdongxian/ANP_backdoor``: ``optimize_mask_cifar.py`` then
  ``prune_neuron_cifar.py``). :func:`anp_prune` re-prunes from the learned masks at
  another threshold without optimising again.
* :data:`NFT_ABLATIONS` and :func:`run_defense` -- one entry point for every defense
  by name (``"none"``, ``"ft"``, ``"ft_mixup"``, ``"anp"``, ``"nft"`` and its ablations).

Every defense works on a copy (the caller's model is never modified), is seeded, takes
a clean ``Dataset`` (sampled with replacement, as :func:`nft_fast.purify`) or a
``DataLoader`` (used as given, restarted when exhausted), and returns a
:class:`nft_fast.purifier.PurifyResult`. ``finetune`` and ``anp`` return a plain model
(original architecture, no masks); the NFT variants return the masked model as
:func:`nft_fast.purify` does (``result.folded()`` gives the plain one for every defense).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layout import guard_convs
from .. import _checks
from .._loop import Batches, CleanData, first_batch, fork_rng, infer_num_classes, model_device, num_samples, progress_bar
from ..config import PRESETS, NFTConfig
from ..masks import MASK_NAME, attach_masks, fold_masks, mask_sites
from ..ops import use_backend
from ..purifier import PurifyResult, purify

__all__ = [
    "finetune", "anp", "anp_prune", "anp_selection", "ANPResult", "ANPTrainer",
    "NFT_ABLATIONS", "DEFENSES", "run_defense",
]

EvaluateFn = Optional[Callable[[nn.Module], Dict[str, float]]]


# --- shared helpers ---------------------------------------------------------------------

def _samples_per_class(model: nn.Module, data: CleanData, n_data: int) -> float:
    """``len(clean_set) / num_classes`` (classes read off the model's output on one sample)."""
    return n_data / infer_num_classes(model, first_batch(data)[0])


def _round_bounds(steps: int, rounds: int) -> List[int]:
    """Steps per round: ``steps`` split as evenly as possible into ``rounds``."""
    return [(r + 1) * steps // rounds - r * steps // rounds for r in range(rounds)]


# --- fine-tuning ---------------------------------------------------------------------------

def _finetune_step(net: nn.Module, opt, sched, x: torch.Tensor, y: torch.Tensor, mixup_alpha: float,
                   rng: np.random.Generator, gen_perm: torch.Generator) -> float:
    """One SGD step on the batch (mixed with a shuffled copy of itself when ``mixup_alpha > 0``); the loss."""
    if mixup_alpha > 0:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        perm = torch.randperm(x.shape[0], generator=gen_perm).to(x.device)
        out = net(lam * x + (1 - lam) * x[perm]).float()
        loss = lam * F.cross_entropy(out, y) + (1 - lam) * F.cross_entropy(out, y[perm])
    else:
        loss = F.cross_entropy(net(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def finetune(
    model: nn.Module,
    clean_data: CleanData,
    *,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    mixup_alpha: float = 0.0,
    seed: int = 0,
    evaluate_fn: EvaluateFn = None,
    rounds: int = 5,
    progress: bool = True,
) -> PurifyResult:
    """Vanilla fine-tuning of every weight on the clean set (``mixup_alpha > 0``: FT+MixUp).

    SGD (``lr``, ``momentum``, ``weight_decay`` on every parameter) with a cosine LR over
    the ``steps`` (stepped every step, to 0); BN in ``train()`` mode, so its running
    statistics are updated too. With ``mixup_alpha > 0`` each batch is mixed with a
    shuffled copy of itself, ``lam ~ Beta(alpha, alpha)`` per batch, and the loss is
    ``lam * CE(y) + (1 - lam) * CE(y[perm])``.

    History: one entry per round (``round``, ``steps``, ``lr`` of its first step, mean
    ``loss``, ``seconds``, plus ``evaluate_fn(model)``). ``result.model`` is a plain model
    (a masked input has its masks folded in first) in the input's train/eval mode.
    """
    for name, v in (("steps", steps), ("batch_size", batch_size), ("rounds", rounds)):
        _checks.positive_int(name, v)
    if rounds > steps:
        raise ValueError(f"rounds ({rounds}) must not exceed steps ({steps})")
    _checks.number("lr", lr, lo_open=True)
    _checks.number("momentum", momentum, hi=1.0)
    _checks.number("weight_decay", weight_decay)
    _checks.number("mixup_alpha", mixup_alpha)
    n_data = num_samples(clean_data)
    was_training = model.training
    net = fold_masks(model)  # a deep copy (masks, if any, folded in)
    for p in net.parameters():
        p.requires_grad_(True)
    guard_convs(net)  # every weight trains, in whatever layout the model came (nft_fast.layout)
    device = model_device(net)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng = np.random.default_rng(seed)
    gen_data = torch.Generator().manual_seed(seed)
    gen_perm = torch.Generator().manual_seed(seed)
    history: List[Dict[str, Any]] = []
    bar = progress_bar(steps, "FT+MixUp" if mixup_alpha > 0 else "FT", progress)
    t_start = time.perf_counter()
    with fork_rng(device):
        torch.manual_seed(seed)  # transforms of the user's dataset, dropout: global RNG
        n_c = _samples_per_class(net, clean_data, n_data)
        batches = Batches(clean_data, batch_size, gen_data)
        net.train()
        done = 0
        for r, n_steps in enumerate(_round_bounds(steps, rounds)):
            t0 = time.perf_counter()
            round_lr = opt.param_groups[0]["lr"]
            total, count = 0.0, 0
            for x, y in batches.take(n_steps):
                v = _finetune_step(net, opt, sched, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                   mixup_alpha, rng, gen_perm)
                done += 1
                if not math.isfinite(v):
                    raise FloatingPointError(f"finetune: non-finite loss ({v}) at step {done}; lower lr or check the data")
                total += v
                count += 1
                bar.update(1)
                bar.set_postfix(round=r + 1, loss=f"{v:.3f}", refresh=False)
            entry: Dict[str, Any] = {"round": r + 1, "steps": count, "lr": round_lr,
                                     "loss": total / max(count, 1), "seconds": time.perf_counter() - t0}
            if evaluate_fn is not None:
                entry.update(evaluate_fn(net))
                net.train()
            history.append(entry)
    bar.close()
    net.train(was_training)
    return PurifyResult(net, history, time.perf_counter() - t_start, n_c)


# --- ANP ---------------------------------------------------------------------------------

class ANPTrainer:
    """ANP's mask optimisation on a model that already holds masks (:func:`attach_masks`).

    Per masked norm neuron: a mask ``m`` (init 1) on the weight and adversarial noise
    ``(delta, xi)`` giving ``weight * (m + delta)`` and ``bias * (1 + xi)`` in the perturbed
    forward. One :meth:`step` (``mask_train`` of the official code, for one batch):

    1. ``delta, xi ~ U[-eps, eps]``; ``pgd_steps`` times ``noise += eps / pgd_steps *
       sign(grad CE)`` (ascent; not clipped back to ``[-eps, eps]`` -- the official code
       does not -- unless ``clip_noise``).
    2. ``loss = anp_alpha * CE(natural) + (1 - anp_alpha) * CE(perturbed)`` (with
       ``eps == 0``: ``anp_alpha * CE(natural)``), SGD with momentum on the masks,
       then clamp them to ``[0, 1]``.

    The model stays in ``train()`` mode (batch statistics; running statistics get
    updated, so :func:`anp` discards this copy and prunes a copy of the original).
    The perturbed forward substitutes ``neuron_mask`` / ``bias`` through
    ``torch.func.functional_call`` under the torch backend (which differentiates through
    both); the natural forward is the model's own.
    """

    def __init__(self, model: nn.Module, *, eps: float = 0.4, pgd_steps: int = 1, anp_alpha: float = 0.2,
                 mask_lr: float = 0.2, momentum: float = 0.9, clip_noise: bool = False, seed: int = 0) -> None:
        _checks.number("eps", eps)
        _checks.positive_int("pgd_steps", pgd_steps)
        _checks.number("anp_alpha", anp_alpha, hi=1.0)
        _checks.number("mask_lr", mask_lr, lo_open=True)
        _checks.number("momentum", momentum, hi=1.0)
        self.sites = mask_sites(model)
        if not self.sites:
            raise ValueError("ANP needs masked norm layers (BatchNorm/LayerNorm with an affine weight); "
                             "the model has none (check its exclude list)")
        bad = [s.name for s in self.sites if s.kind not in ("bn", "ln")]
        if bad:
            raise ValueError(f"ANP masks norm layers only; these masks are on other modules: {bad[:5]}")
        self.model = model
        self.eps, self.pgd_steps, self.anp_alpha, self.clip_noise = float(eps), pgd_steps, float(anp_alpha), clip_noise
        for n, p in model.named_parameters():
            p.requires_grad_(n.rsplit(".", 1)[-1] == MASK_NAME)
        self.masks = [s.mask for s in self.sites]
        self.noise_w = [torch.zeros_like(m, requires_grad=True) for m in self.masks]
        self.noise_b = [None if s.module.bias is None else torch.zeros_like(m, requires_grad=True)
                        for s, m in zip(self.sites, self.masks)]
        self.opt = torch.optim.SGD(self.masks, lr=mask_lr, momentum=momentum)
        self.gen = torch.Generator().manual_seed(seed)
        self.steps_done = 0
        model.train()

    def _noises(self) -> List[torch.Tensor]:
        return [t for pair in zip(self.noise_w, self.noise_b) for t in pair if t is not None]

    @torch.no_grad()
    def reset_noise(self, rand_init: bool = True) -> None:
        """Noise to ``U[-eps, eps]`` (``rand_init``) or to zero."""
        for t in self._noises():
            if rand_init:
                u = torch.rand(t.shape, generator=self.gen, dtype=t.dtype)
                t.copy_(u.mul_(2 * self.eps).sub_(self.eps))
            else:
                t.zero_()

    def forward(self, x: torch.Tensor, perturbed: bool = False, detach_noise: bool = False) -> torch.Tensor:
        """Logits of the masked model, with the current noise when ``perturbed``."""
        if not perturbed:
            return self.model(x)
        params: Dict[str, torch.Tensor] = {}
        for s, m, dw, db in zip(self.sites, self.masks, self.noise_w, self.noise_b):
            pre = f"{s.name}." if s.name else ""
            params[pre + MASK_NAME] = m + (dw.detach() if detach_noise else dw)
            if db is not None:
                params[pre + "bias"] = s.module.bias * (1 + (db.detach() if detach_noise else db))
        with use_backend("torch"):
            return torch.func.functional_call(self.model, params, (x,))

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Step 1: random start in ``[-eps, eps]`` then ``pgd_steps`` signed ascent steps on CE."""
        if self.eps <= 0:
            self.reset_noise(rand_init=False)
            return
        self.reset_noise(rand_init=True)
        noises = self._noises()
        step = self.eps / self.pgd_steps
        for _ in range(self.pgd_steps):
            loss = F.cross_entropy(self.forward(x, perturbed=True).float(), y)
            grads = torch.autograd.grad(loss, noises)
            with torch.no_grad():
                for t, g in zip(noises, grads):
                    t.add_(torch.sign(g), alpha=step)
                    if self.clip_noise:
                        t.clamp_(-self.eps, self.eps)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        """One batch of the mask optimisation; returns ``loss``, ``loss_nat``, ``loss_rob``, ``correct``."""
        self.attack(x, y)
        if self.eps > 0:
            loss_rob = F.cross_entropy(self.forward(x, perturbed=True, detach_noise=True).float(), y)
        else:
            loss_rob = torch.zeros(())
        out = self.forward(x).float()
        loss_nat = F.cross_entropy(out, y)
        loss = self.anp_alpha * loss_nat + (1 - self.anp_alpha) * loss_rob
        self.opt.zero_grad(set_to_none=False)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for m in self.masks:
                m.clamp_(0.0, 1.0)
        self.steps_done += 1
        v = float(loss.detach())
        if not math.isfinite(v):
            raise FloatingPointError(f"anp: non-finite loss ({v}) at iteration {self.steps_done}; check the data")
        return {"loss": v, "loss_nat": float(loss_nat.detach()), "loss_rob": float(loss_rob.detach()),
                "correct": int((out.argmax(1) == y).sum())}

    def mask_values(self) -> Dict[str, torch.Tensor]:
        """The learned masks, ``{module name: mask}`` (copies), in schedule order."""
        return {s.name: m.detach().clone() for s, m in zip(self.sites, self.masks)}


_PRUNE_BY = ("threshold", "number")


def anp_selection(masks: Mapping[str, torch.Tensor], threshold: Optional[float] = 0.2, *,
                  prune_by: str = "threshold", prune_k: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Which neurons ANP prunes: ``{module name: bool tensor}``.

    ``prune_by="threshold"``: every neuron whose mask is ``<= threshold`` (the official
    ``prune_neuron_cifar.py`` compares with ``<=``). ``prune_by="number"``: the ``prune_k``
    neurons with the lowest masks over all layers (stable order on ties, as the official
    sorted list).
    """
    _checks.one_of("prune_by", prune_by, _PRUNE_BY)
    if prune_by == "threshold":
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number, got {threshold!r}")
        return {n: m <= threshold for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    if not isinstance(prune_k, int) or isinstance(prune_k, bool) or not 0 <= prune_k <= total:
        raise ValueError(f"prune_by='number' needs prune_k, an integer in [0, {total}], got {prune_k!r}")
    flat = torch.cat([m.detach().reshape(-1).float().cpu() for m in masks.values()]) if masks else torch.zeros(0)
    sel = torch.zeros(total, dtype=torch.bool)
    sel[torch.sort(flat, stable=True).indices[:prune_k]] = True
    out, off = {}, 0
    for n, m in masks.items():
        out[n] = sel[off:off + m.numel()].view(m.shape).to(m.device)
        off += m.numel()
    return out


def anp_prune(model: nn.Module, masks: Mapping[str, torch.Tensor], threshold: Optional[float] = 0.2, *,
              prune_by: str = "threshold", prune_k: Optional[int] = None, inplace: bool = False) -> nn.Module:
    """The pruned model: a copy of ``model`` (the backdoored one, not inplace) with the weight
    (BN gamma) of every selected neuron set to 0 -- see :func:`anp_selection`. Every other
    weight, bias and running statistic is left as it is (official ``pruning()``).

    ``masks`` is ``{module name: learned mask}`` (``ANPResult.mask_values``); the names
    are ``named_modules()`` names of ``model``.
    """
    sel = anp_selection(masks, threshold, prune_by=prune_by, prune_k=prune_k)
    out = model if inplace else copy.deepcopy(model)
    for name, s in sel.items():
        try:
            mod = out.get_submodule(name)
        except AttributeError:
            raise ValueError(f"anp_prune: the model has no module named {name!r}") from None
        w = getattr(mod, "weight", None)
        if w is None or w.shape != s.shape:
            raise ValueError(f"anp_prune: module {name!r} has no weight of the mask's shape {tuple(s.shape)}")
        with torch.no_grad():
            w[s.to(w.device)] = 0
    return out


@dataclass
class ANPResult(PurifyResult):
    """:class:`PurifyResult` of :func:`anp`: ``model`` is the pruned plain model;
    ``mask_values`` the learned masks ``{module name: mask}``; ``base_model`` a copy of the
    unpruned (backdoored) model, so :meth:`prune` can try other thresholds."""

    mask_values: Dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: Optional[nn.Module] = field(default=None, repr=False)

    def masks(self) -> Dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.mask_values.items()}

    def prune(self, threshold: Optional[float] = 0.2, *, prune_by: str = "threshold",
              prune_k: Optional[int] = None) -> nn.Module:
        """The backdoored model pruned at another threshold (or number) from the same masks."""
        if self.base_model is None:
            raise ValueError("this ANPResult holds no base model to prune")
        return anp_prune(self.base_model, self.mask_values, threshold, prune_by=prune_by, prune_k=prune_k)


def _anp_round(trainer: ANPTrainer, r: int, batches: Iterator, device: torch.device, bar) -> Dict[str, Any]:
    """ANP iterations over ``batches``; the history entry: mean losses, natural-batch accuracy,
    mask statistics."""
    t0 = time.perf_counter()
    sums = {"loss": 0.0, "loss_nat": 0.0, "loss_rob": 0.0}
    correct = seen = count = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        info = trainer.step(x, y)
        for k in sums:
            sums[k] += info[k]
        correct += info["correct"]
        seen += y.shape[0]
        count += 1
        bar.update(1)
        bar.set_postfix(loss=f"{info['loss']:.3f}", refresh=False)
    flat = torch.cat([m.detach().reshape(-1) for m in trainer.masks])
    entry: Dict[str, Any] = {"round": r + 1, "iter": trainer.steps_done, "steps": count}
    entry.update({k: v / max(count, 1) for k, v in sums.items()})
    entry.update(acc=correct / max(seen, 1), mask_mean=float(flat.mean()), mask_min=float(flat.min()),
                 seconds=time.perf_counter() - t0)
    return entry


def _prune_entry(mask_values: Mapping[str, torch.Tensor], threshold: Optional[float], prune_by: str,
                 prune_k: Optional[int]) -> Dict[str, Any]:
    """The ``stage="prune"`` history entry: how many of how many neurons were pruned."""
    sel = anp_selection(mask_values, threshold, prune_by=prune_by, prune_k=prune_k)
    return {"stage": "prune", "prune_by": prune_by, "threshold": threshold if prune_by == "threshold" else None,
            "prune_k": prune_k if prune_by == "number" else None,
            "pruned": int(sum(int(s.sum()) for s in sel.values())),
            "num_neurons": int(sum(s.numel() for s in sel.values()))}


def anp(
    model: nn.Module,
    clean_data: CleanData,
    *,
    eps: float = 0.4,
    pgd_steps: int = 1,
    anp_alpha: float = 0.2,
    mask_lr: float = 0.2,
    iters: int = 2000,
    batch_size: int = 128,
    threshold: float = 0.2,
    prune_by: str = "threshold",
    prune_k: Optional[int] = None,
    exclude: Sequence[str] = (),
    seed: int = 0,
    evaluate_fn: EvaluateFn = None,
    progress: bool = True,
    log_every: int = 500,
    clip_noise: bool = False,
) -> ANPResult:
    """Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), as the official code.

    Masks go on every affine BatchNorm/LayerNorm (all BNs, the stem's too, as ANP's
    ``NoisyBatchNorm2d`` everywhere; ``exclude`` as in :func:`attach_masks`) of a copy of
    ``model``; ``iters`` steps of :class:`ANPTrainer` (batch ``batch_size``, masks SGD lr
    ``mask_lr`` momentum 0.9, noise ``eps`` with ``pgd_steps`` ascent steps, trade-off
    ``anp_alpha``) learn them, with BN in ``train()`` mode. The result is a copy of the
    *original* model (its running statistics untouched) with gamma = 0 for every pruned
    neuron: mask ``<= threshold`` (``prune_by="threshold"``) or the ``prune_k`` lowest
    (``prune_by="number"``); the other neurons keep their weights (hard pruning).

    History: one entry per ``log_every`` iterations (mean ``loss``/``loss_nat``/``loss_rob``,
    natural-batch ``acc``, ``mask_mean``/``mask_min``), then a final ``stage="prune"``
    entry (``prune_by``, ``threshold``, ``prune_k``, ``pruned``, ``num_neurons``, plus
    ``evaluate_fn(pruned model)``). ``result.mask_values`` holds the learned masks;
    ``result.prune(0.3)`` (or :func:`anp_prune`) prunes again at another threshold
    without re-optimising.
    """
    _checks.positive_int("iters", iters)
    _checks.positive_int("batch_size", batch_size)
    _checks.positive_int("log_every", log_every)
    _checks.one_of("prune_by", prune_by, _PRUNE_BY)
    if prune_by == "threshold":
        anp_selection({}, threshold)  # validates the threshold before the long optimisation
    n_data = num_samples(clean_data)
    base = fold_masks(model)  # a deep copy of the backdoored model (masks, if any, folded in)
    masked = copy.deepcopy(base)
    attach_masks(masked, exclude=exclude)
    trainer = ANPTrainer(masked, eps=eps, pgd_steps=pgd_steps, anp_alpha=anp_alpha, mask_lr=mask_lr,
                         clip_noise=clip_noise, seed=seed)
    if prune_by == "number":  # validate before the long optimisation
        anp_selection(trainer.mask_values(), prune_by="number", prune_k=prune_k)
    device = model_device(masked)
    gen_data = torch.Generator().manual_seed(seed)
    history: List[Dict[str, Any]] = []
    bar = progress_bar(iters, "ANP", progress)
    t_start = time.perf_counter()
    with fork_rng(device):
        torch.manual_seed(seed)  # transforms of the user's dataset: global RNG
        n_c = _samples_per_class(base, clean_data, n_data)
        batches = Batches(clean_data, batch_size, gen_data)
        masked.train()
        for r, n_steps in enumerate(_round_bounds(iters, math.ceil(iters / log_every))):
            history.append(_anp_round(trainer, r, batches.take(n_steps), device, bar))
    bar.close()
    mask_values = trainer.mask_values()
    del trainer, masked
    pruned = anp_prune(base, mask_values, threshold, prune_by=prune_by, prune_k=prune_k)
    entry = _prune_entry(mask_values, threshold, prune_by, prune_k)
    if evaluate_fn is not None:
        entry.update(evaluate_fn(pruned))
    history.append(entry)
    return ANPResult(pruned, history, time.perf_counter() - t_start, n_c, mask_values=mask_values, base_model=base)


# --- dispatch --------------------------------------------------------------------------------

#: NFT ablations: ``NFTConfig`` overrides applied on top of the given (or default) config.
NFT_ABLATIONS: Dict[str, Dict[str, Any]] = {
    "nft": {},
    "nft_no_mixup": {"mixup_alpha": 0.0},   # lam = 1: plain cross-entropy
    "nft_no_reg": {"reg_coef": 0.0},        # no |1 - m| regularizer
    "nft_no_floor": {"floor_alpha": 0.0},   # floors mu(l) = 0: masks clamped to [0, 1]
    "nft_adv": {"adv_eps": 0.05},           # + L-inf PGD adversarial inputs in the mask objective
    "nft_videomix": {"mixup_kind": "videomix"},  # cut-and-mix (VideoMix cuboids for clips)
    "nft_strong": dict(PRESETS["strong"]),  # + trigger unlearning (NFTConfig.preset("strong"))
    "nft_strong_no_refresh": dict(PRESETS["strong"], trigger_refresh=False),
    "nft_strong_no_mixup": dict(PRESETS["strong"], mixup_alpha=0.0),
    # strong with the class-agnostic feature-space generator (nft_fast.inversion) as the trigger
    "nft_feature": dict(PRESETS["strong"], trigger_kind="feature"),
}

DEFENSES = ("none", "ft", "ft_mixup", "anp") + tuple(NFT_ABLATIONS)


def run_defense(name: str, model: nn.Module, clean_data: CleanData, cfg: Optional[NFTConfig] = None,
                **kw) -> PurifyResult:
    """Run the defense ``name`` (one of :data:`DEFENSES`) on a copy of ``model``.

    * ``"none"``: no defense -- a deep copy of the model, empty history (``kw`` ignored).
    * ``"ft"`` / ``"ft_mixup"``: :func:`finetune` (``ft_mixup``: ``mixup_alpha=1.0`` unless given).
    * ``"anp"``: :func:`anp`.
    * ``"nft"``, ``"nft_no_mixup"``, ``"nft_no_reg"``, ``"nft_no_floor"``:
      :func:`nft_fast.purify` with ``(cfg or NFTConfig()).replace(**NFT_ABLATIONS[name])``.

    ``kw`` go to the defense's function (``seed=`` is accepted by every defense: for the
    NFT variants it replaces ``cfg.seed``). For the baselines ``cfg`` only supplies the
    default ``seed``, so one config seeds a whole grid.
    """
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; known defenses: {', '.join(DEFENSES)}")
    if name == "none":
        return PurifyResult(copy.deepcopy(model), [], 0.0, 0.0)
    if name in NFT_ABLATIONS:
        cfg = (cfg or NFTConfig()).replace(**NFT_ABLATIONS[name])
        if "seed" in kw:  # one keyword seeds every defense of a grid
            cfg = cfg.replace(seed=kw.pop("seed"))
        return purify(model, clean_data, cfg, **kw)
    if cfg is not None:
        kw.setdefault("seed", cfg.seed)
    if name == "anp":
        return anp(model, clean_data, **kw)
    if name == "ft_mixup":
        kw.setdefault("mixup_alpha", 1.0)
    return finetune(model, clean_data, **kw)
