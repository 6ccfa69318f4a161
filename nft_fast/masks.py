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
    "MaskedGroupNorm", "MaskedLinear", "MaskedConv1d", "MaskedConv2d", "MaskedConv3d",
]

MASK_NAME = "neuron_mask"

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = _BN_TYPES + (nn.LayerNorm, nn.GroupNorm)
# torch's own forward of each norm type that a subclass may keep or override
_BASE_FORWARD = {nn.LayerNorm: nn.LayerNorm.forward, nn.GroupNorm: nn.GroupNorm.forward}


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
    """LayerNorm over the trailing ``normalized_shape``; a class with ``nft_channels_first = True``
    (``nft_fast.models.LayerNorm2d``, torchvision's layout) normalises dim 1 instead."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if getattr(self, "nft_channels_first", False):
            y = ops.masked_layer_norm(input.movedim(1, -1), self.normalized_shape, self.weight, self.bias,
                                      self.neuron_mask, self.eps)
            return y.movedim(-1, 1)
        return ops.masked_layer_norm(input, self.normalized_shape, self.weight, self.bias, self.neuron_mask, self.eps)

    def _fold(self) -> None:
        self.weight.mul_(self.neuron_mask)


class _MaskedGroupNorm:
    """``y = (gamma * m) * x_hat + beta`` per channel after per-group statistics; torch only
    (see :mod:`nft_fast.ops.masked_group_norm`)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.masked_group_norm(input, self.num_groups, self.weight, self.bias, self.neuron_mask, self.eps)

    def _fold(self) -> None:
        self.weight.mul_(self.neuron_mask)


class _MaskedOwnForward:
    """A LayerNorm/GroupNorm subclass with a forward of its own (e.g. torchvision's ``LayerNorm2d``,
    which permutes NCHW to NHWC around ``F.layer_norm``): its own code runs with ``weight * m`` in
    place of the weight, so any layout it handles is handled, and folding ``gamma' = gamma * m``
    gives exactly the masked function. Runs on the torch backend (the class's own calls)."""

    def forward(self, *args, **kwargs):
        w = self._parameters["weight"]
        self._parameters["weight"] = w * self.neuron_mask
        try:
            return self._nft_base.forward(self, *args, **kwargs)
        finally:
            self._parameters["weight"] = w

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
    ((nn.GroupNorm,), _MaskedGroupNorm),
    ((nn.Linear,), _MaskedLinear),
    (_CONV_TYPES, _MaskedConv),
)
_MASKED_CLASSES: Dict[type, type] = {}


def masked_class(cls: Type[nn.Module]) -> Type[nn.Module]:
    """The masked subclass of ``cls`` (created once per class; user subclasses keep their code)."""
    if cls not in _MASKED_CLASSES:
        mixin = next((m for types, m in _MIXINS if issubclass(cls, types)), None)
        base = next((b for b in _BASE_FORWARD if issubclass(cls, b)), None)
        if base is not None and cls.forward is not _BASE_FORWARD[base] and not getattr(cls, "nft_channels_first", False):
            mixin = _MaskedOwnForward
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
MaskedGroupNorm = masked_class(nn.GroupNorm)
MaskedLinear = masked_class(nn.Linear)
MaskedConv1d = masked_class(nn.Conv1d)
MaskedConv2d = masked_class(nn.Conv2d)
MaskedConv3d = masked_class(nn.Conv3d)


@dataclass
class MaskSite:
    """One masked module. ``layer`` is the 1-based schedule index (floor mu(layer))."""

    name: str
    module: nn.Module
    kind: str  # "bn", "ln", "gn", "linear", "conv"
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
    if isinstance(m, nn.GroupNorm):
        return "gn"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, _CONV_TYPES):
        return "conv"
    return "other"


def _mask_shape(m: nn.Module) -> torch.Size:
    if isinstance(m, (nn.Linear,) + _CONV_TYPES):
        return torch.Size([m.weight.shape[0]])
    return m.weight.shape  # norms: one mask per gamma entry (GroupNorm: per channel)


def _norm_eligible(m: nn.Module) -> bool:
    # A mask folds into gamma, so the norm must have one (affine / elementwise_affine).
    return isinstance(m, _NORM_TYPES) and getattr(m, "weight", None) is not None and not isinstance(m, nn.SyncBatchNorm)


def _neuron_eligible(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, _CONV_TYPES) and not getattr(m, "transposed", False)


def _weight_used_directly(model: nn.Module) -> set:
    """Names of Linear/Conv modules whose weight their parent reads itself, never calling their
    forward: ``nn.MultiheadAttention``'s ``out_proj``. A neuron mask there would not act in the
    forward, yet folding would apply it."""
    return {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
            for c, _ in m.named_children()}


def _out_features(m: nn.Module) -> int:
    return m.weight.shape[0]


def _norm_features(m: nn.Module) -> int:
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    return m.num_features if isinstance(m, _BN_TYPES) else m.normalized_shape[-1]


def _followed_by_norm_static(model: nn.Module) -> set:
    """Names of conv/linear modules whose next leaf module (registration order) is a norm of the same width."""
    leaves = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    out = set()
    for (n, m), (_, nxt) in zip(leaves, leaves[1:]):
        if _neuron_eligible(m) and isinstance(nxt, _NORM_TYPES) and _norm_features(nxt) == _out_features(m):
            out.add(n)
    return out


def _followed_by_norm_traced(model: nn.Module, example_input) -> Tuple[set, set]:
    """One traced forward: the names of conv/linear modules whose output tensor is fed straight
    into a norm, and the names of those whose forward ran at all (a module whose weight its
    parent reads directly, as torchvision's Swin attention does with ``qkv``/``proj``, never runs)."""
    # id -> (name, tensor): holding the tensor keeps its id from being reused by a later one.
    produced: Dict[int, tuple] = {}
    fed = set()
    called = set()
    handles = []

    def post(mod, inp, out, n):
        called.add(n)
        produced[id(out)] = (n, out)

    for n, m in model.named_modules():
        if _neuron_eligible(m):
            handles.append(m.register_forward_hook(lambda mod, inp, out, n=n: post(mod, inp, out, n)))
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
    return fed, called


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
        norms: mask affine BatchNorm1d/2d/3d, LayerNorm and GroupNorm (mask on gamma only).
        neurons: also mask Linear/Conv1d/2d/3d outputs that are not fed straight into a
            norm (a norm would normalise the mask away). With ``example_input`` this is
            decided by tracing one forward, and modules whose forward never runs (their parent
            reads the weight itself) are left unmasked; otherwise by the next module in
            registration order. The children of ``nn.MultiheadAttention`` are never masked.
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
        skip = _weight_used_directly(model)
        if example_input is not None:
            fed, called = _followed_by_norm_traced(model, example_input)
            skip |= {n for n, m in names.items() if _neuron_eligible(m) and n not in called}
        else:
            fed = _followed_by_norm_static(model)
        fed = fed | skip
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
