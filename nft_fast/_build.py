"""What was built: the pybind11 extension (C++ CPU / CUDA kernels), the CUDA emulator module
(a test tool, built only with NFT_FAST_BUILD_CUDA_EMU=1: the CUDA kernels compiled for the CPU,
csrc/testing/cuda_emu/) and Triton availability."""
from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Optional


_EXT: Dict[str, tuple] = {}  # a plain memo (not lru_cache): torch.compile traces through it


def _load_ext() -> tuple:
    if "m" not in _EXT:
        try:
            _EXT["m"] = (importlib.import_module("nft_fast._C"), None)
        except ImportError as e:  # not built (no compiler, NFT_FAST_NO_EXT=1) or broken build
            _EXT["m"] = (None, str(e))
    return _EXT["m"]


def ext() -> Any:
    mod, err = _load_ext()
    if mod is None:
        raise RuntimeError(f"nft_fast C++ extension is not available: {err}")
    return mod


def cpp_compiled() -> bool:
    return _load_ext()[0] is not None


def cuda_compiled() -> bool:
    mod = _load_ext()[0]
    return mod is not None and bool(mod.has_cuda())


_EMU: Dict[str, tuple] = {}  # a plain memo (not lru_cache): torch.compile traces through it

EMU_BUILD_HINT = ("a test tool, built only on request: NFT_FAST_BUILD_CUDA_EMU=1 pip install "
                  "--no-build-isolation -e . in a source checkout")


def _load_emu() -> tuple:
    if "m" not in _EMU:
        try:
            _EMU["m"] = (importlib.import_module("nft_fast._cuda_emu"), None)
        except ModuleNotFoundError as e:
            if e.name != "nft_fast._cuda_emu":  # broken build (a dependency missing)
                _EMU["m"] = (None, str(e))
            else:  # not built: the default
                _EMU["m"] = (None, f"nft_fast._cuda_emu is not built ({EMU_BUILD_HINT})")
        except ImportError as e:  # broken build
            _EMU["m"] = (None, str(e))
    return _EMU["m"]


def cuda_emu_built() -> bool:
    return _load_emu()[0] is not None


def cuda_emu_requested() -> bool:
    return os.environ.get("NFT_FAST_CUDA_EMU", "0") not in ("", "0")


def cuda_emu_enabled() -> bool:
    """The CUDA kernels run on CPU tensors through the emulator: NFT_FAST_CUDA_EMU is set (not
    "0") and nft_fast._cuda_emu (built with NFT_FAST_BUILD_CUDA_EMU=1) imports. Like
    TRITON_INTERPRET for triton."""
    return cuda_emu_requested() and cuda_emu_built()


def cuda_ext(device: Any = None) -> Any:
    """The module whose launchers run the CUDA kernels: nft_fast._C (built with CUDA, a device is
    visible) or, under emulation, nft_fast._cuda_emu. With ``device`` (a torch.device), the module
    for tensors there: CPU tensors only ever go to the emulator, CUDA tensors only to _C."""
    import torch

    dev_type = getattr(device, "type", device)
    real = cuda_compiled() and torch.cuda.is_available()
    if dev_type != "cpu" and real:
        return ext()
    if dev_type != "cuda" and cuda_emu_enabled():
        return _load_emu()[0]
    if dev_type == "cpu":
        raise RuntimeError("the CUDA kernels run on CPU tensors only under the emulator: "
                           + _emu_reason())
    raise RuntimeError(f"no module can run the CUDA kernels: {why_unavailable('cuda')}")


def _emu_reason() -> str:
    if not cuda_emu_requested():
        hint = "" if cuda_emu_built() else f"; {_load_emu()[1]}"
        return f"set NFT_FAST_CUDA_EMU=1 to run them on the CPU emulator{hint}"
    return f"NFT_FAST_CUDA_EMU is set but the emulator module cannot be loaded: {_load_emu()[1]}"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON: Dict[str, Optional[str]] = {}  # a plain memo (not lru_cache): torch.compile traces through it


def _triton_version() -> Optional[str]:
    if "v" not in _TRITON:
        try:
            import triton

            _TRITON["v"] = triton.__version__
        except Exception:
            _TRITON["v"] = None
    return _TRITON["v"]


def triton_usable() -> bool:
    import torch

    return _triton_version() is not None and (torch.cuda.is_available() or triton_interpret())


def why_unavailable(name: str) -> str:

    if name == "cpp":
        return f"the C++ extension was not built ({_load_ext()[1]}); reinstall with a C++ compiler and without NFT_FAST_NO_EXT"
    if name == "cuda":
        if not cuda_compiled():
            return f"the extension was built without CUDA (nvcc was not found at install time); {_emu_reason()}"
        return f"no CUDA device is visible; {_emu_reason()}"
    if name == "triton":
        if _triton_version() is None:
            return "triton is not installed"
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run kernels on the CPU)"
    return "unknown backend"


def build_info() -> Dict[str, Any]:
    """What this installation can run: compiled extension parts, Triton, torch and devices."""
    import torch

    mod = _load_ext()[0]
    return {
        "cpp_compiled": mod is not None,
        "cuda_compiled": cuda_compiled(),
        "cuda_archs": list(mod.cuda_archs()) if mod is not None else [],
        "cuda_emu_built": cuda_emu_built(),
        "cuda_emu_enabled": cuda_emu_enabled(),
        "cuda_emu_error": _load_emu()[1],
        "openmp": bool(mod.has_openmp()) if mod is not None else False,
        "triton": _triton_version() is not None,
        "triton_version": _triton_version(),
        "triton_interpret": triton_interpret(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "ext_error": _load_ext()[1],
    }
