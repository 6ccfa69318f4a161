"""Memory layout of convolutional models: one policy for every entry point, and the guard
that keeps CPU training clear of a oneDNN heap-corruption bug.

channels_last (channels_last_3d for 5-D tensors) makes convolutions faster on CPU and GPU and
leaves the state dict unchanged. :func:`to_channels_last` converts a model in place and
guards it; the training loops (``train_classifier``, the baselines, the attacks that train
a model) call :func:`guard_convs` on whatever model they are given, whatever its layout.

The oneDNN bug (torch 2.13.0+cpu, oneDNN v3.12.0; plain-PyTorch repro:
``tests/repro/onednn_channels_last_1thread.py``, e.g. ``ONEDNN_MAX_CPU_ISA=AVX2 python
tests/repro/onednn_channels_last_1thread.py 1 1 cl``; regression test:
``tests/test_onednn_guard.py``): oneDNN's
``jit_avx2_1x1_convolution_bwd_weights`` -- the weight gradient of a 2-D 1x1 convolution with
a stride above 1, an NHWC (channels_last) input of 2 to 7 channels (fewer than the 8 fp32
lanes of AVX2), on a CPU where oneDNN runs AVX2 code (no AVX-512, or
``ONEDNN_MAX_CPU_ISA=AVX2``) -- writes past its buffers. With one intra-op thread glibc aborts
("corrupted double-linked list", "free(): invalid next size") or the process segfaults; with
two it may hang in the kernel. NCHW inputs, 3x3 or stride-1 1x1 convolutions, >= 8 channels,
Conv3d, bf16 (no oneDNN bf16 on AVX2) and AVX-512 CPUs take other kernels and are not
affected. Such convolutions are ResNet downsampling shortcuts of very narrow networks
(width 2-7), so the guard converts just their input (and their 1x1 weight's strides) to
NCHW: exact, and about free (``bench/onednn_guard.py``).
Drop the guard once torch's oneDNN is fixed (``NFT_FAST_ONEDNN_GUARD=0`` turns it off).
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch
import torch.nn as nn

__all__ = [
    "memory_format", "has_convs", "wants_channels_last", "to_channels_last", "like_model", "onednn_avx2_bug",
    "affected_conv", "guard_convs",
]

_CONV = (nn.Conv2d, nn.Conv3d)
# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above which the AVX2 kernel is not chosen.
_AVX512_ISAS = ("AVX512", "AVX10", "ALL")


def memory_format(ndim: int, channels_last: bool) -> torch.memory_format:
    """channels_last for 4-D, channels_last_3d for 5-D tensors when ``channels_last``; else contiguous."""
    if channels_last and ndim == 4:
        return torch.channels_last
    if channels_last and ndim == 5:
        return torch.channels_last_3d
    return torch.contiguous_format


def has_convs(model: nn.Module) -> bool:
    """True when ``model`` has a Conv2d or Conv3d layer: the models that run channels_last."""
    return any(isinstance(m, _CONV) for m in model.modules())


def wants_channels_last(model: nn.Module, setting: Optional[bool] = None) -> bool:
    """The layout decision: ``setting`` when given, else channels_last for convolutional models."""
    return has_convs(model) if setting is None else bool(setting)


def to_channels_last(model: nn.Module, *, restride_1x1: bool = False) -> nn.Module:
    """4-D parameters/buffers to channels_last and 5-D ones to channels_last_3d, in place
    (``model.to(memory_format=channels_last)`` refuses 5-D tensors); then :func:`guard_convs`.

    A 1x1 convolution weight is contiguous in both formats and keeps its strides, unless
    ``restride_1x1`` gives it channels_last strides as ``Tensor.to(memory_format=...)`` does. The
    memory order is the same, but oneDNN picks its weight-gradient kernels from the strides, so
    training differs in the last bits: classifier training restrides, so models trained from
    the same seed stay bit-identical across versions."""
    with torch.no_grad():
        for m in model.modules():
            for store in (m._parameters, m._buffers):
                for t in store.values():
                    if t is not None and t.dim() in (4, 5):
                        fmt = memory_format(t.dim(), True)
                        t.data = t.data.to(memory_format=fmt) if restride_1x1 else t.data.contiguous(memory_format=fmt)
    guard_convs(model)
    return model


def like_model(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in the layout a model converted by :func:`to_channels_last` runs fastest on."""
    return x.contiguous(memory_format=memory_format(x.dim(), channels_last))


def _onednn_isa_capped_below_avx512() -> bool:
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        v = os.environ.get(var, "").strip().upper()
        if v and not v.startswith(_AVX512_ISAS):
            return True
    return False


def onednn_avx2_bug() -> bool:
    """True when CPU convolutions may run oneDNN's faulty AVX2 1x1 weight-gradient kernel:
    an x86 CPU whose oneDNN runs AVX2 code. ``NFT_FAST_ONEDNN_GUARD=1`` / ``0`` forces it."""
    force = os.environ.get("NFT_FAST_ONEDNN_GUARD", "").strip()
    if force in ("0", "1"):
        return force == "1"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return not cap.startswith("AVX512") or _onednn_isa_capped_below_avx512()


def affected_conv(m: nn.Module) -> bool:
    """A convolution that can hit the bug: 2-D, 1x1 kernel, a stride above 1, 2-7 input
    channels per group (1 is guarded too: the cost is nil and the bound is empirical)."""
    return (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and max(m.stride) > 1
            and m.in_channels // m.groups < 8)


def _nchw_input(module: nn.Module, args: tuple):
    x = args[0]
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and torch.backends.mkldnn.enabled):
        return None
    # torch runs the convolution channels_last when the input *or* the weight suggests it, and a
    # 1x1 weight is contiguous in both formats: after model.to(memory_format=channels_last) its
    # strides say channels_last. Give it canonical NCHW strides (same values, same Parameter).
    w = module.weight
    if w.stride() != _nchw_strides(w.shape):
        with torch.no_grad():
            w.data = w.data.clone(memory_format=torch.contiguous_format)
    if not x.is_contiguous():
        return (x.contiguous(),) + tuple(args[1:])
    return None


def _nchw_strides(shape) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def guard_convs(model: nn.Module) -> int:
    """Make CPU training of ``model`` safe from the oneDNN bug (module docstring): every affected
    convolution gets a forward pre-hook that hands it an NCHW input. Idempotent; a no-op on
    CPUs that are not affected. Returns how many convolutions are guarded."""
    if not onednn_avx2_bug():
        return 0
    n = 0
    for m in model.modules():
        if affected_conv(m):
            if _nchw_input not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_nchw_input)
            n += 1
    return n
