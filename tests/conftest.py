import os
import sys

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter when there is no GPU (CI). The
# variable must be set before triton is first imported. Likewise the CUDA kernels (backend
# "cuda") run on CPU tensors under the emulator module nft_fast._cuda_emu.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# CPU tensors given to the cuda backend run on the emulator, CUDA tensors on the GPU (cuda_ext
# picks the module by device): with a GPU, tests on CPU tensors still check the kernels' logic.
os.environ.setdefault("NFT_FAST_CUDA_EMU", "1")

# tests/tools/test_asan.py reruns the kernel tests in a process preloaded with ASan, on
# AddressSanitizer builds of the extension modules: load those files in place of the installed ones.
for _name, _var in (("_C", "NFT_TEST_C_SO"), ("_cuda_emu", "NFT_TEST_CUDA_EMU_SO")):
    if os.environ.get(_var):
        import importlib.util

        import nft_fast

        _spec = importlib.util.spec_from_file_location(f"nft_fast.{_name}", os.environ[_var])
        _mod = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_mod)
        sys.modules[f"nft_fast.{_name}"] = _mod
        setattr(nft_fast, _name, _mod)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    import nft_fast

    yield
    nft_fast.set_backend("auto")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and stall badly on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
