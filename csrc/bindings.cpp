// Python bindings of lora_kernels._C (built by setup.py; optional at run time).
#include <torch/extension.h>

#include "jacobi_svd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_kernels compiled extension: batched small dense SVD (one-sided Jacobi) for rsvd";
  m.def("jacobi_svd_cpu", &jacobi_svd_cpu, "Batched one-sided Jacobi SVD of (batch, k, k) CPU matrices",
        pybind11::arg("M"), pybind11::arg("max_sweeps") = 30, pybind11::arg("tol") = 1e-12);
#ifdef WITH_CUDA
  m.def("jacobi_svd_cuda", &jacobi_svd_cuda, "Batched one-sided Jacobi SVD of (batch, k, k) CUDA matrices",
        pybind11::arg("M"), pybind11::arg("max_sweeps") = 30, pybind11::arg("tol") = 1e-7);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
