"""The facts about a machine that every measurement must name: CPU (model, the instruction set
torch's kernels use, native bf16 or not), intra-op threads, GPU, torch version.

Speed and even rounding depend on them: a bf16 step on a CPU without native bf16 (AVX2) is
an order of magnitude slower than fp32 (ResNet-18 B=64 on an AVX2 EPYC: 22.3 s vs 1.7 s),
while AVX-512 CPUs with bf16 run oneDNN's bf16 convolutions 2-4x faster than fp32.
"""
from __future__ import annotations

import os
import platform
from typing import Any, Dict, Optional

import torch

from .layout import onednn_avx2_bug


__all__ = [
    "machine_info", "describe", "cpu_name", "native_bf16_cpu", "cpu_bf16_warning", "available_memory",
]


def _cpu_flag(name: str) -> bool:
    fn = getattr(torch.cpu, f"_is_{name}_supported", None)  # private helpers; absent in some versions
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # noqa: BLE001 - a probe, never a failure
        return False


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16_cpu() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX): where a bf16 step can beat fp32."""
    return _cpu_flag("avx512_bf16") or _cpu_flag("amx_tile")


def cpu_bf16_warning() -> Optional[str]:
    """A sentence for users asking for bf16 on a CPU without native bf16; None where bf16 is fine."""
    if native_bf16_cpu():
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    return (f"this CPU has no native bf16 (torch CPU capability {cap}): precision='bf16' runs slower than "
            "fp32 here (13x on ResNet-18 B=64 on an AVX2 CPU); use fp32")


def available_memory() -> Optional[int]:
    """Bytes of memory a new allocation can get at most: ``MemAvailable`` of ``/proc/meminfo``,
    capped by a cgroup's limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``); None where
    neither is readable (callers then enforce no limit). An upper bound: for refusing sizes
    that cannot fit, not for planning."""
    avail: Optional[int] = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            avail = None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                lim = f.read().strip()
        except OSError:
            continue
        if lim.isdigit() and int(lim) < 1 << 60:  # "max" / a huge number: no limit
            avail = int(lim) if avail is None else min(avail, int(lim))
        break
    return avail


def machine_info() -> Dict[str, Any]:
    """CPU model, torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``), native
    bf16, intra-op threads, GPU, torch / Python versions, and whether the oneDNN guard is on."""
    return {
        "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": native_bf16_cpu(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "arch": platform.machine(),
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "onednn_avx2_guard": onednn_avx2_bug(),
    }


def describe(info: Optional[Dict[str, Any]] = None) -> str:
    """One line for reports: ``CPU <model> (AVX2, no native bf16), 2 threads; torch 2.13.0+cpu``."""
    i = info or machine_info()
    bf16 = "native bf16" if i["cpu_native_bf16"] else "no native bf16"
    s = f"CPU {i['cpu']} ({i['cpu_capability']}, {bf16}), {i['threads']} threads"
    if i.get("gpu"):
        s += f"; GPU {i['gpu']}"
    return s + f"; torch {i['torch']}"
