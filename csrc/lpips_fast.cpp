// Operator schemas of the lpips_fast extension (kernels: cpu/head_cpu.cpp, cuda/head_cuda.cu;
// fake kernels and autograd: lpips_fast/_ops.py).
//
// head_forward: one layer. value (N), dmap (N x 1 x h x w when return_map, else empty),
//   r0 / r1 (N x h*w per-pixel feature norms, saved for the backward). Accumulator dtype
//   (float32, float64 for float64 inputs) for all outputs.
// head_backward: gradients for f0, f1 (dtype and layout of the inputs) and the weight
//   (C elements, accumulator dtype); output_mask selects which are computed, the others
//   are returned empty.
// head_all_forward / head_all_backward: all layers of one call in one launch; values is
//   L x N. `weights` has one tensor per layer; an EMPTY tensor (numel 0) means "no weights"
//   for that layer (Tensor?[] would be simpler but custom-op autograd does not track the
//   tensors inside an optional list, so their gradients would be lost).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import lpips_fast._C` loads this library (and with it the TORCH_LIBRARY registrations);
// the module itself is empty: the ops live in torch.ops.lpips_fast.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lpips_fast kernels (ops in torch.ops.lpips_fast)", -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lpips_fast, m) {
  m.def(
      "head_forward(Tensor f0, Tensor f1, Tensor? weight, bool return_map) -> "
      "(Tensor value, Tensor dmap, Tensor r0, Tensor r1)");
  m.def(
      "head_backward(Tensor grad_value, Tensor? grad_map, Tensor f0, Tensor f1, Tensor? weight, "
      "Tensor r0, Tensor r1, bool[3] output_mask) -> (Tensor grad_f0, Tensor grad_f1, "
      "Tensor grad_weight)");
  m.def(
      "head_all_forward(Tensor[] f0s, Tensor[] f1s, Tensor[] weights, bool return_map) -> "
      "(Tensor values, Tensor[] dmaps, Tensor[] r0s, Tensor[] r1s)");
  m.def(
      "head_all_backward(Tensor grad_values, Tensor?[] grad_maps, Tensor[] f0s, Tensor[] f1s, "
      "Tensor[] weights, Tensor[] r0s, Tensor[] r1s, bool[3] output_mask) -> "
      "(Tensor[] grad_f0s, Tensor[] grad_f1s, Tensor[] grad_weights)");
}
