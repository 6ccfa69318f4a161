// pybind11 module nft_fast._C. Tensors cross as raw device pointers (and the CUDA stream as
// an integer) so the module does not link libtorch: it builds in seconds and does not
// depend on the torch ABI of the machine it runs on. Python validates shapes/dtypes.
#include <cstdint>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "mask_update.h"
#include "masked_bn.h"

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
  // Masked BatchNorm, fp32 CPU (csrc/masked_bn.h); a pointer of 0 is an absent optional tensor.
  mod.def(
      "masked_bn_fwd_f32",
      [](std::uintptr_t x, std::uintptr_t res, std::uintptr_t w, std::uintptr_t m, std::uintptr_t b, std::uintptr_t y,
         std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t uvar, int64_t N, int64_t C, int64_t S, bool rows_c,
         bool training, float eps, bool relu) {
        py::gil_scoped_release nogil;
        nft_fast::masked_bn_fwd_f32_cpu(ptr<const float>(x), ptr<const float>(res), ptr<const float>(w),
                                        ptr<const float>(m), ptr<const float>(b), ptr<float>(y), ptr<float>(mean),
                                        ptr<float>(rstd), ptr<float>(uvar), N, C, S, rows_c, training, eps, relu);
      },
      py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("mask"), py::arg("bias"), py::arg("y"),
      py::arg("mean"), py::arg("rstd"), py::arg("uvar"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("rows_c"),
      py::arg("training"), py::arg("eps"), py::arg("relu"));
  mod.def(
      "masked_bn_bwd_f32",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t y, std::uintptr_t w, std::uintptr_t m,
         std::uintptr_t mean, std::uintptr_t rstd, std::uintptr_t dx, std::uintptr_t dres, std::uintptr_t dw,
         std::uintptr_t db, std::uintptr_t dm, int64_t N, int64_t C, int64_t S, bool rows_c, bool training,
         bool relu) {
        py::gil_scoped_release nogil;
        nft_fast::masked_bn_bwd_f32_cpu(ptr<const float>(dy), ptr<const float>(x), ptr<const float>(y),
                                        ptr<const float>(w), ptr<const float>(m), ptr<const float>(mean),
                                        ptr<const float>(rstd), ptr<float>(dx), ptr<float>(dres), ptr<float>(dw),
                                        ptr<float>(db), ptr<float>(dm), N, C, S, rows_c, training, relu);
      },
      py::arg("dy"), py::arg("x"), py::arg("y"), py::arg("weight"), py::arg("mask"), py::arg("mean"),
      py::arg("rstd"), py::arg("dx"), py::arg("dres"), py::arg("dweight"), py::arg("dbias"), py::arg("dmask"),
      py::arg("N"), py::arg("C"), py::arg("S"), py::arg("rows_c"), py::arg("training"), py::arg("relu"));
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
