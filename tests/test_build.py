"""The extension build path is real: whenever a compiler (and nvcc) exist, the module was built."""
import os
import shutil

import pytest

import nft_fast


def _off(var):
    return os.environ.get(var, "0") not in ("", "0")


@pytest.mark.skipif(_off("NFT_FAST_NO_EXT") or not shutil.which("c++"), reason="extension build disabled / no compiler")
def test_cpp_extension_was_built():
    info = nft_fast.build_info()
    assert info["cpp_compiled"], info["ext_error"]
    assert info["openmp"]


@pytest.mark.skipif(_off("NFT_FAST_NO_EXT") or _off("NFT_FAST_NO_CUDA") or not shutil.which("nvcc"),
                    reason="no nvcc (or CUDA build disabled)")
def test_cuda_kernels_were_compiled_when_nvcc_exists():
    info = nft_fast.build_info()
    assert info["cuda_compiled"], "nvcc is present but the CUDA kernels were not built"
    assert "sm_80" in info["cuda_archs"][0] and "sm_90" in info["cuda_archs"][0]


def test_build_info_keys_and_triton_sources_shipped():
    info = nft_fast.build_info()
    for k in ("cpp_compiled", "cuda_compiled", "triton", "torch"):
        assert k in info
    import importlib

    kernels = importlib.import_module("nft_fast.kernels")  # kernels/ installed inside the package
    assert os.path.basename(os.path.dirname(kernels.__file__)) in ("kernels",)
