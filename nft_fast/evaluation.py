"""ACC / ASR / RA: clean accuracy, attack success rate and robust accuracy on triggered inputs."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Union

import torch
import torch.nn as nn

from ._loop import model_device

__all__ = [
    "evaluate", "adversarial_signal", "pgd_linf", "Target",
]

Target = Union[int, str, Callable[[torch.Tensor], torch.Tensor], None]


def _target_labels(y: torch.Tensor, target: Target, num_classes: int) -> torch.Tensor:
    if callable(target):
        return target(y)
    if target == "all2all":
        return (y + 1) % num_classes
    if isinstance(target, int):
        return torch.full_like(y, target)
    raise ValueError("evaluate: the poison loader yields (x, y) pairs, so `target` must be given "
                     "(an int for all-to-one, 'all2all', or a callable y -> target labels)")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    clean_loader: Optional[Iterable] = None,
    poison_loader: Optional[Iterable] = None,
    target: Target = None,
    device: Optional[torch.device] = None,
) -> Dict[str, float]:
    """Evaluate in ``eval()`` mode (the model's mode is restored afterwards).

    ``clean_loader`` yields ``(x, y)``. ``poison_loader`` yields triggered inputs as
    ``(x, y_true, y_target)``, or ``(x, y_true)`` with ``target`` saying the attack's
    labels. Samples whose true class equals their target are ignored for ASR and RA.

    Returns ``acc`` (clean top-1), ``asr`` (triggered inputs sent to the target), ``ra``
    (triggered inputs still given their true label), as fractions, with sample counts.
    """
    if device is None:
        device = model_device(model)
    was_training = model.training
    model.eval()
    out: Dict[str, float] = {}
    try:
        if clean_loader is not None:
            correct = n = 0
            loss = 0.0
            for x, y in clean_loader:
                x, y = x.to(device), y.to(device)
                logits = model(x).float()
                loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                correct += (logits.argmax(1) == y).sum().item()
                n += y.numel()
            out.update(acc=correct / n if n else float("nan"), clean_loss=loss / n if n else float("nan"), n_clean=n)
        if poison_loader is not None:
            hit = keep = n = 0
            for batch in poison_loader:
                x, y = batch[0].to(device), batch[1].to(device)
                logits = model(x)
                yt = batch[2].to(device) if len(batch) > 2 else _target_labels(y, target, logits.shape[1])
                sel = y != yt
                pred = logits.argmax(1)[sel]
                hit += (pred == yt[sel]).sum().item()
                keep += (pred == y[sel]).sum().item()
                n += int(sel.sum())
            out.update(asr=hit / n if n else float("nan"), ra=keep / n if n else float("nan"), n_poison=n)
    finally:
        model.train(was_training)
    return out


def pgd_linf(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
             steps: int, gen: torch.Generator, lo: Union[float, torch.Tensor],
             hi: Union[float, torch.Tensor]) -> torch.Tensor:
    """Untargeted L-inf PGD: a uniform random start in the ``eps`` ball (drawn on CPU from
    ``gen``), then ``steps`` signed ascent steps of ``2.5 * eps / steps`` on ``CE(forward(x + d), y)``;
    inputs are clamped to ``[lo, hi]``. Returns the detached adversarial batch (``x``'s layout)."""
    d = torch.empty_like(x)
    d.copy_((torch.rand(x.shape, generator=gen) * 2 - 1) * eps)
    for _ in range(steps):
        d.requires_grad_(True)
        with torch.enable_grad():
            loss = torch.nn.functional.cross_entropy(forward(torch.clamp(x + d, lo, hi)).float(), y)
            g, = torch.autograd.grad(loss, d)
        d = (d.detach() + (2.5 * eps / steps) * g.sign()).clamp_(-eps, eps)
    return torch.clamp(x + d, lo, hi).detach()


def adversarial_signal(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float = 0.05,
    steps: int = 5,
    batch_size: int = 256,
    seed: int = 0,
) -> Dict[str, float]:
    """A backdoor signal that needs no poisoned data: where small adversarial perturbations
    of the clean set send it.

    Each clean sample gets an untargeted L-inf PGD perturbation (radius ``eps``, ``steps``
    steps, random start, clamped to the set's value range) in ``eval()`` mode. A backdoored
    network has a shortcut to its target class, so its adversarial examples pile up in that
    class; a clean (or purified) one spreads them over the classes. Returns ``adv_acc``
    (accuracy under the perturbation), ``adv_top_class`` and ``adv_top_share`` (the class
    receiving most misclassified adversarial examples, among samples not of that class, and
    the share it gets), plus the clean ``clean_acc``. ``adv_top_share`` near 1 is the warning sign;
    compare it with the backdoored model's value.
    """
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError("adversarial_signal: x and y must hold the same non-zero number of samples")
    device = model_device(model)
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    lo, hi = float(x.min()), float(x.max())
    preds, clean_preds = [], []
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            xa = pgd_linf(model, xb, yb, eps, steps, gen, lo, hi)
            with torch.no_grad():
                preds.append(model(xa).argmax(1).cpu())
                clean_preds.append(model(xb).argmax(1).cpu())
    finally:
        model.train(was_training)
    p, c = torch.cat(preds), torch.cat(clean_preds)
    y = y.cpu()
    wrong = p != y
    n_cls = int(max(p.max(), y.max())) + 1
    share = torch.zeros(n_cls)
    for k in range(n_cls):
        cand = y != k
        share[k] = (wrong & cand & (p == k)).sum() / cand.sum().clamp(min=1)
    top = int(share.argmax())
    return {"clean_acc": float((c == y).float().mean()), "adv_acc": float((~wrong).float().mean()),
            "adv_top_class": top, "adv_top_share": float(share[top])}
