"""ACC / ASR / RA (SPEC section 5)."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Union

import torch
import torch.nn as nn

from ._loop import model_device

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
