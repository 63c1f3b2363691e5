// Operator schemas of the lpips_fast ops, shared by the real library (lpips_fast.cpp, namespace
// lpips_fast) and the CPU emulation of the CUDA kernels (emu/emu.cpp, namespace lpips_fast_emu).
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
#pragma once

#include <torch/library.h>

namespace lpips_fast {

inline void define_schemas(torch::Library& m) {
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

}  // namespace lpips_fast
