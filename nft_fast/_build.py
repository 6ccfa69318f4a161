"""What was built: the pybind11 extension (C++ CPU / CUDA kernels) and Triton availability."""
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
    import torch

    if name == "cpp":
        return f"the C++ extension was not built ({_load_ext()[1]}); reinstall with a C++ compiler and without NFT_FAST_NO_EXT"
    if name == "cuda":
        if not cuda_compiled():
            return "the extension was built without CUDA (nvcc was not found at install time)"
        return "no CUDA device is visible"
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
        "openmp": bool(mod.has_openmp()) if mod is not None else False,
        "triton": _triton_version() is not None,
        "triton_version": _triton_version(),
        "triton_interpret": triton_interpret(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "ext_error": _load_ext()[1],
    }
