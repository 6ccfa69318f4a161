// pybind11 bindings of the CUDA host launchers (csrc/cuda/bind_cuda.cpp): called by both
// nft_fast._C (real CUDA build) and nft_fast._cuda_emu (the same launchers on the CPU emulator).
#pragma once
#include <pybind11/pybind11.h>

namespace nft_fast {
void bind_cuda(pybind11::module_& m);
}  // namespace nft_fast
