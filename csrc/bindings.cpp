// pybind11 module nft_fast._C. Tensors cross as raw device pointers (and the CUDA stream as
// an integer) so the module does not link libtorch: it builds in seconds and does not
// depend on the torch ABI of the machine it runs on. Python validates shapes/dtypes.
#include <cstdint>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "mask_update.h"

namespace py = pybind11;

template <typename T>
static T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "nft_fast C++/CUDA kernels";
  mod.def("has_cuda", []() {
#ifdef NFT_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  mod.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
  mod.def("cuda_archs", []() {
    std::vector<std::string> out;
#ifdef NFT_FAST_CUDA_ARCHS
    out.push_back(NFT_FAST_CUDA_ARCHS);
#endif
    return out;
  });
  mod.def(
      "mask_update_f32",
      [](std::uintptr_t m, std::uintptr_t g, std::uintptr_t buf, std::uintptr_t floor, int64_t n, float lr,
         float momentum, float reg_scale) {
        py::gil_scoped_release nogil;
        nft_fast::mask_update_f32_cpu(ptr<float>(m), ptr<const float>(g), ptr<float>(buf), ptr<const float>(floor), n,
                                      lr, momentum, reg_scale);
      },
      py::arg("mask"), py::arg("grad"), py::arg("buf"), py::arg("floor"), py::arg("n"), py::arg("lr"),
      py::arg("momentum"), py::arg("reg_scale"));
#ifdef NFT_FAST_WITH_CUDA
  mod.def(
      "mask_update_cuda_f32",
      [](std::uintptr_t m, std::uintptr_t g, std::uintptr_t buf, std::uintptr_t floor, int64_t n, float lr,
         float momentum, float reg_scale, std::uintptr_t stream) {
        nft_fast::mask_update_f32_cuda(ptr<float>(m), ptr<const float>(g), ptr<float>(buf), ptr<const float>(floor), n,
                                       lr, momentum, reg_scale, stream);
      },
      py::arg("mask"), py::arg("grad"), py::arg("buf"), py::arg("floor"), py::arg("n"), py::arg("lr"),
      py::arg("momentum"), py::arg("reg_scale"), py::arg("stream"));
#endif
}
