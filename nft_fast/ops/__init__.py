"""One dispatch point for every op: each backend is an interchangeable implementation.

An op registers implementations per backend with :func:`register`; callers ask
:func:`resolve` for the one to use on a given device. The pure-PyTorch ``torch``
implementation always exists and is the oracle the others are tested against.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, Iterator

import torch

from .. import _build
from ..errors import BackendUnavailable

__all__ = [
    "set_backend", "get_backend", "use_backend", "backend_available", "BackendUnavailable", "BACKENDS",
    "register", "resolve", "resolved_backend", "implementations",
    "masked_batch_norm", "masked_layer_norm", "masked_group_norm", "masked_linear", "masked_conv", "mask_update_",
    "mixup_batch", "videomix_batch", "mixup_cross_entropy", "channels_last_format",
    "frozen_conv", "freeze_convs", "thaw_convs",
]

BACKENDS = ("torch", "cpp", "cuda", "triton")
_CHOICES = BACKENDS + ("auto",)


_IMPLS: Dict[str, Dict[str, Callable]] = {}
_global_backend = "auto"
_local = threading.local()


def register(op: str, backend: str, fn: Callable) -> Callable:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = fn
    return fn


def backend_available(name: str) -> bool:
    """Whether backend ``name`` can run at all in this process (built and importable)."""
    if name == "torch":
        return True
    if name == "cpp":
        return _build.cpp_compiled()
    if name == "cuda":  # a GPU, or the CPU emulator (NFT_FAST_CUDA_EMU=1, like TRITON_INTERPRET)
        return (_build.cuda_compiled() and torch.cuda.is_available()) or _build.cuda_emu_enabled()
    if name == "triton":
        return _build.triton_usable()
    return False


def _check(name: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {_CHOICES}")
    if name != "auto" and not backend_available(name):
        raise BackendUnavailable(f"backend {name!r} is not available here: {_build.why_unavailable(name)}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op: 'torch', 'cpp', 'cuda', 'triton' or 'auto'."""
    global _global_backend
    _global_backend = _check(name)


def get_backend() -> str:
    return getattr(_local, "override", None) or _global_backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Per-call override of the backend (thread-local), e.g. ``with use_backend("torch"): ...``."""
    _check(name)
    prev = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = prev


def _auto_order(device: torch.device) -> tuple:
    if device.type == "cuda":
        return ("cuda", "triton", "torch")
    return ("cpp", "torch")


def cuda_launch(device: torch.device):
    """``(module, sms, stream)`` for launching csrc/cuda kernels on tensors of ``device``: nft_fast._C,
    the device's SM count and current stream on a GPU; the emulator module (a 2-SM "GPU", so
    split reductions still have several chunks) and stream 0 for CPU tensors under emulation."""
    mod = _build.cuda_ext(device)
    if device.type == "cuda":
        return mod, torch.cuda.get_device_properties(device).multi_processor_count, \
            torch.cuda.current_stream(device).cuda_stream
    return mod, 2, 0


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend in ("torch",):
        return True
    if backend == "cpp":
        return device.type == "cpu"
    if backend == "cuda":
        return device.type == "cuda" or (device.type == "cpu" and _build.cuda_emu_enabled())
    if backend == "triton":
        return device.type == "cuda" or _build.triton_interpret()
    return False


def resolve(op: str, device: torch.device) -> Callable:
    """Implementation of ``op`` for tensors on ``device`` under the current backend.

    An explicitly chosen backend that has no implementation of ``op`` (or cannot run on
    ``device``) falls back to the torch implementation, which is always correct.
    """
    impls = _IMPLS[op]
    name = get_backend()
    order = _auto_order(device) if name == "auto" else (name, "torch")
    for b in order:
        fn = impls.get(b)
        if fn is not None and _device_ok(b, device) and backend_available(b):
            return fn
    return impls["torch"]


def resolved_backend(op: str, device: torch.device) -> str:
    fn = resolve(op, device)
    return next(b for b, f in _IMPLS[op].items() if f is fn)


def implementations() -> Dict[str, tuple]:
    """Which backends implement which op."""
    return {op: tuple(impls) for op, impls in _IMPLS.items()}


# Importing the op modules registers their implementations.
from . import mask_update, masked_bn, masked_group_norm, masked_layer_norm, masked_neuron, mixup  # noqa: E402,F401
from .mask_update import mask_update_  # noqa: E402,F401
from .masked_bn import masked_batch_norm  # noqa: E402,F401
from .masked_group_norm import masked_group_norm  # noqa: E402,F401,F811  (the op shadows its module)
from .masked_layer_norm import masked_layer_norm  # noqa: E402,F401,F811  (the op shadows its module, as before)
from .masked_neuron import masked_conv, masked_linear  # noqa: E402,F401
from .mixup import channels_last_format, mixup_batch, mixup_cross_entropy, videomix_batch  # noqa: E402,F401
from .frozen_conv import freeze_convs, frozen_conv, thaw_convs  # noqa: E402,F401
