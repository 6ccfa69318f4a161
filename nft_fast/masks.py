"""Soft per-neuron masks attached to any ``nn.Module`` in place, and folded back out.

Attaching swaps a module's class for a masked subclass (``BatchNorm2d`` ->
``MaskedBatchNorm2d``) and registers a ``neuron_mask`` parameter of ones, so the
module object, its parameters, buffers and hooks stay the same objects and
``state_dict`` keys keep their names (plus ``*.neuron_mask``).
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn

from . import ops
from ._bn import bn_forward_args

__all__ = [
    "attach_masks", "mask_sites", "mask_parameters", "fold_masks", "unfreeze", "MaskSite", "masked_class",
    "MASK_NAME", "MaskedBatchNorm1d", "MaskedBatchNorm2d", "MaskedBatchNorm3d", "MaskedLayerNorm",
    "MaskedLinear", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d",
]

MASK_NAME = "neuron_mask"

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = _BN_TYPES + (nn.LayerNorm,)


class _MaskedBatchNorm:
    """``y = (gamma * m) * x_hat + beta``; running statistics as ``nn.BatchNorm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.forward_fused(input)

    def forward_fused(self, input: torch.Tensor, residual: Optional[torch.Tensor] = None,
                      relu: bool = False) -> torch.Tensor:
        """``relu(self(input) + residual)`` in one op (see :func:`nft_fast._bn.norm_act`)."""
        self._check_input_dim(input)
        rm, rv, bn_training, eaf = bn_forward_args(self)
        return ops.masked_batch_norm(input, rm, rv, self.weight, self.bias, self.neuron_mask, bn_training, eaf, self.eps,
                                     residual, relu)

    def _fold(self) -> None:
        self.weight.mul_(self.neuron_mask)


class _MaskedLayerNorm:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.masked_layer_norm(input, self.normalized_shape, self.weight, self.bias, self.neuron_mask, self.eps)

    def _fold(self) -> None:
        self.weight.mul_(self.neuron_mask)


class _MaskedLinear:
    """``y = m * (W x) + b``: a mask per output neuron, bias untouched."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.masked_linear(input, self.weight, self.bias, self.neuron_mask)

    def _fold(self) -> None:
        self.weight.mul_(self.neuron_mask.view(-1, 1))


class _MaskedConv:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.masked_conv(input, lambda x: self._conv_forward(x, self.weight, None), self.bias, self.neuron_mask)

    def _fold(self) -> None:
        self.weight.mul_(self.neuron_mask.view((-1,) + (1,) * (self.weight.dim() - 1)))


_MIXINS: Tuple[Tuple[tuple, type], ...] = (
    (_BN_TYPES, _MaskedBatchNorm),
    ((nn.LayerNorm,), _MaskedLayerNorm),
    ((nn.Linear,), _MaskedLinear),
    (_CONV_TYPES, _MaskedConv),
)
_MASKED_CLASSES: Dict[type, type] = {}


def masked_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """The masked subclass of ``cls`` (created once per class; user subclasses keep their code)."""
    if cls not in _MASKED_CLASSES:
        mixin = next((m for types, m in _MIXINS if issubclass(cls, types)), None)
        if mixin is None:
            raise TypeError(f"cannot mask modules of type {cls.__name__}")
        doc = f"``{cls.__qualname__}`` with a soft per-neuron ``{MASK_NAME}`` (see :func:`attach_masks`)."
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", (mixin, cls),
                                    {"_nft_base": cls, "__module__": __name__, "__doc__": doc})
    return _MASKED_CLASSES[cls]


MaskedBatchNorm1d = masked_class(nn.BatchNorm1d)
MaskedBatchNorm2d = masked_class(nn.BatchNorm2d)
MaskedBatchNorm3d = masked_class(nn.BatchNorm3d)
MaskedLayerNorm = masked_class(nn.LayerNorm)
MaskedLinear = masked_class(nn.Linear)
MaskedConv1d = masked_class(nn.Conv1d)
MaskedConv2d = masked_class(nn.Conv2d)
MaskedConv3d = masked_class(nn.Conv3d)


@dataclass
class MaskSite:
    """One masked module. ``layer`` is the 1-based schedule index (floor mu(layer))."""

    name: str
    module: nn.Module
    kind: str  # "bn", "ln", "linear", "conv"
    layer: int
    numel: int

    @property
    def mask(self) -> nn.Parameter:
        return getattr(self.module, MASK_NAME)


def _kind(m: nn.Module) -> str:
    if isinstance(m, _BN_TYPES):
        return "bn"
    if isinstance(m, nn.LayerNorm):
        return "ln"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, _CONV_TYPES):
        return "conv"
    return "other"


def _mask_shape(m: nn.Module) -> torch.Size:
    if isinstance(m, (nn.Linear,) + _CONV_TYPES):
        return torch.Size([m.weight.shape[0]])
    return m.weight.shape


def _norm_eligible(m: nn.Module) -> bool:
    # A mask folds into gamma, so the norm must have one (affine / elementwise_affine).
    return isinstance(m, _NORM_TYPES) and getattr(m, "weight", None) is not None and not isinstance(m, nn.SyncBatchNorm)


def _neuron_eligible(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, _CONV_TYPES) and not getattr(m, "transposed", False)


def _out_features(m: nn.Module) -> int:
    return m.weight.shape[0]


def _norm_features(m: nn.Module) -> int:
    return m.num_features if isinstance(m, _BN_TYPES) else m.normalized_shape[-1]


def _followed_by_norm_static(model: nn.Module) -> set:
    """Names of conv/linear modules whose next leaf module (registration order) is a norm of the same width."""
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    out = set()
    for (n, m), (_, nxt) in zip(leaves, leaves[1:]):
        if _neuron_eligible(m) and isinstance(nxt, _NORM_TYPES) and _norm_features(nxt) == _out_features(m):
            out.add(n)
    return out


def _followed_by_norm_traced(model: nn.Module, example_input) -> set:
    """Names of conv/linear modules whose output tensor is fed straight into a norm (one traced forward)."""
    # id -> (name, tensor): holding the tensor keeps its id from being reused by a later one.
    produced: Dict[int, tuple] = {}
    fed = set()
    handles = []
    for n, m in model.named_modules():
        if _neuron_eligible(m):
            handles.append(m.register_forward_hook(lambda mod, inp, out, n=n: produced.__setitem__(id(out), (n, out))))
        elif isinstance(m, _NORM_TYPES):
            def pre(mod, inp):
                hit = produced.get(id(inp[0])) if inp else None
                if hit is not None and hit[1] is inp[0]:
                    fed.add(hit[0])
            handles.append(m.register_forward_pre_hook(pre))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return fed


def _last_neuron_module(model: nn.Module) -> Optional[str]:
    last = None
    for n, m in model.named_modules():
        if _neuron_eligible(m):
            last = n
    return last


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or (any(c in p for c in "*?[") and fnmatch.fnmatchcase(name, p)) for p in patterns)


def attach_masks(
    model: nn.Module,
    exclude: Iterable[str] = (),
    *,
    norms: bool = True,
    neurons: bool = False,
    mask_head: bool = False,
    example_input: Optional[Union[torch.Tensor, Tuple[torch.Tensor, ...]]] = None,
    freeze: bool = True,
) -> List[MaskSite]:
    """Attach a ``neuron_mask`` of ones to every eligible module of ``model``, in place.

    Args:
        exclude: full names from ``named_modules()`` (``"bn1"`` is the stem only, not
            ``layer1.0.bn1``); glob patterns (``"layer4.*"``) are accepted too.
        norms: mask affine BatchNorm1d/2d/3d and LayerNorm (mask on gamma only).
        neurons: also mask Linear/Conv1d/2d/3d outputs that are not fed straight into a
            norm (a norm would normalise the mask away). With ``example_input`` this is
            decided by tracing one forward; otherwise by the next module in registration order.
        mask_head: with ``neurons``, also mask the model's last Linear/Conv (the classifier).
        freeze: set ``requires_grad=False`` on every non-mask parameter.

    Returns the mask sites in schedule order (site ``i`` is layer ``i + 1``). Modules that
    already hold a ``neuron_mask`` (e.g. reference ``Masked_BN2d``) are kept as they are.
    """
    exclude = tuple(exclude)
    lazy = [n for n, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(f"attach_masks: the model has uninitialised lazy parameters ({', '.join(lazy[:3])}); "
                         "run one forward pass first")
    names = dict(model.named_modules())
    for p in exclude:
        if not any(c in p for c in "*?[") and p not in names:
            raise ValueError(f"attach_masks: exclude names a module that does not exist: {p!r}")
    to_mask = []
    if neurons:
        fed = _followed_by_norm_traced(model, example_input) if example_input is not None else _followed_by_norm_static(model)
        head = None if mask_head else _last_neuron_module(model)
    for n, m in model.named_modules():
        if _matches(n, exclude) or hasattr(m, MASK_NAME) and isinstance(getattr(m, MASK_NAME), nn.Parameter):
            continue
        if norms and _norm_eligible(m):
            to_mask.append(m)
        elif neurons and _neuron_eligible(m) and n not in fed and n != head:
            to_mask.append(m)
    for m in to_mask:
        w = m.weight
        m.__class__ = masked_class(type(m))
        m.register_parameter(MASK_NAME, nn.Parameter(torch.ones(_mask_shape(m), device=w.device, dtype=w.dtype)))
    if freeze:
        for n, p in model.named_parameters():
            p.requires_grad_(n.rsplit(".", 1)[-1] == MASK_NAME)
    return mask_sites(model)


def mask_sites(model: nn.Module) -> List[MaskSite]:
    """Every module holding a ``neuron_mask``, in ``named_parameters()`` (= schedule) order."""
    sites = []
    for n, m in model.named_modules():
        p = m._parameters.get(MASK_NAME)
        if p is not None:
            sites.append(MaskSite(n, m, _kind(m), len(sites) + 1, p.numel()))
    return sites


def mask_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The mask parameters in schedule order: index ``l - 1`` is layer ``l``."""
    return [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == MASK_NAME]


def fold_masks(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A model of the original architecture with every mask folded into its weights.

    ``gamma' = gamma * m`` for norms and ``W' = diag(m) W`` for Linear/Conv; the result's
    ``state_dict`` loads into the original (unmasked) class. The masked model is left
    untouched unless ``inplace``. Reference ``Masked_BN*`` modules are folded into
    plain ``nn.BatchNorm*``.
    """
    out = model if inplace else copy.deepcopy(model)
    for parent in list(out.modules()):
        for cname, child in list(parent.named_children()):
            mask = child._parameters.get(MASK_NAME)
            if mask is None:
                continue
            with torch.no_grad():
                if hasattr(child, "_fold"):
                    child._fold()
                    del child._parameters[MASK_NAME]
                    child.__class__ = child._nft_base
                else:  # a foreign masked norm (reference Masked_BN*): rebuild as its plain base
                    setattr(parent, cname, _plain_norm_from(child))
    return out


def _plain_norm_from(child: nn.Module) -> nn.Module:
    base = next((b for b in type(child).__mro__[1:] if b in _NORM_TYPES), None)
    if base is None or not isinstance(child, _NORM_TYPES):
        raise TypeError(f"cannot fold masks of {type(child).__name__}: no known plain base class")
    plain = copy.copy(child)
    plain._parameters = dict(child._parameters)
    mask = plain._parameters.pop(MASK_NAME)
    plain.weight.mul_(mask)
    plain.__class__ = base
    return plain


def unfreeze(model: nn.Module) -> None:
    """Let every parameter require grad again (e.g. after purification, for further training)."""
    for p in model.parameters():
        p.requires_grad_(True)
