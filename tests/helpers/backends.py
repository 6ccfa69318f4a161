"""The backends of an op as pytest parameters, each skipped where it cannot run: triton (a GPU, or
the interpreter: TRITON_INTERPRET=1, conftest), cpp (the C++ extension) and cuda (a GPU, or CPU
tensors on the CUDA emulator: NFT_FAST_CUDA_EMU=1, conftest). A backend's name is in the test's
id, so ``-k cuda`` selects the cuda-backend tests (as the race checker's run does)."""
import pytest
import torch

from nft_fast import _build, ops

_SKIP = {
    "triton": lambda: (not ops.backend_available("triton"), "triton cannot run here"),
    "cpp": lambda: (not _build.cpp_compiled(), "C++ extension not built"),
    "cuda": lambda: (not ops.backend_available("cuda"), "no CUDA device and no emulator"),
}


def skip_unless(backend: str) -> pytest.MarkDecorator:
    """Skips a test (or a parameter) of ``backend`` where it cannot run."""
    cond, reason = _SKIP[backend]()
    return pytest.mark.skipif(cond, reason=reason)


def backend_param(backend: str, *values):
    """``pytest.param(backend, *values)``, skipped where ``backend`` cannot run."""
    return pytest.param(backend, *values, marks=skip_unless(backend))


def per_backend(argnames: str, cases: dict):
    """Parametrizes ``backend`` and ``argnames`` with each backend's own cases, ``{backend: [values,
    ...]}`` (a value is a tuple when ``argnames`` names several): one test for backends that were
    checked on different case lists."""
    rows = [backend_param(b, *(v if isinstance(v, tuple) else (v,))) for b, vs in cases.items() for v in vs]
    return pytest.mark.parametrize(f"backend,{argnames}", rows)


def device(backend: str) -> str:
    """Where a backend's tests put their tensors: the GPU for triton and cuda when there is one,
    else the CPU (the interpreter / the emulator)."""
    return "cuda" if backend in ("triton", "cuda") and torch.cuda.is_available() else "cpu"
