// Autograd of the fused backbone layer ops conv_bias_relu and conv_bias_relu_pool (conv.h,
// conv_pool.h), registered for the Autograd dispatch key: a training step's per-layer
// forward and backward run without Python (the fake kernels and the autocast-aware wrapper
// stay in lpips_fast/_conv_ops.py).
//
// Forward: the op's kernels below autograd; saved: x, weight, the output `out` (the ReLU
// mask and the pool's window argmax are read from it), stride, padding, pool parameters.
// Backward: only the gradients the backward call needs (needs_input_grad: the input needs a
// gradient AND this backward reaches it, e.g. torch.autograd.grad(out, x) leaves a
// requires-grad weight alone), by
// - conv_bias_relu_backward / conv_bias_relu_pool_backward (one mask [+ pool] pass, one
//   convolution_backward) when no graph is recorded, or
// - eager's own differentiable formulas when the backward is recorded (create_graph=True):
//   threshold_backward, max_pool2d_with_indices[_backward], convolution_backward, so
//   second-order gradients are eager's.
// Not supported (the backbone takes its eager modules there, lpips_fast/backbones.py):
// torch.func transforms (a C++ autograd Function raises under them) and forward-mode AD
// (its jvp raises).
//
// Compiled into the extension (namespace lpips_fast) and included by the emulator's
// emu/emu.cpp after the .cu files, whose launch.h defines LF_OPS_NAMESPACE lpips_fast_emu.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/max_pool2d_with_indices.h>
#include <ATen/ops/max_pool2d_with_indices_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "conv.h"

#ifndef LF_OPS_NAMESPACE
#define LF_OPS_NAMESPACE lpips_fast
#endif
#define LF_STR2(x) #x
#define LF_STR(x) LF_STR2(x)
#define LF_OP_NAME(name) LF_STR(LF_OPS_NAMESPACE) "::" name

namespace lpips_fast {
namespace {  // (the extension and the emulator may be loaded together: no shared symbols)

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          at::IntArrayRef, at::IntArrayRef);
using BwdSig = ConvGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                         std::array<bool, 3>);
using PoolFwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, at::IntArrayRef, bool);
using PoolBwdSig = ConvGrads(const std::optional<at::Tensor>&, const at::Tensor&,
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                             at::IntArrayRef, bool, std::array<bool, 3>);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The convolution's parameters, and the pool's for conv_bias_relu_pool.
void save_params(AutogradContext* ctx, at::IntArrayRef stride, at::IntArrayRef padding) {
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
}

struct PoolParams {
  std::vector<int64_t> kernel, stride;
  bool ceil_mode;
};

// grad (undefined: none reached the tap) + the max-pool's input gradient, by eager's
// differentiable ops (a recorded backward).
at::Tensor pool_backward_eager(const at::Tensor& grad, const at::Tensor& grad_pooled,
                               const at::Tensor& out, const PoolParams& p) {
  const at::Tensor idx = std::get<1>(at::max_pool2d_with_indices(
      out.detach(), p.kernel, p.stride, /*padding=*/{0, 0}, /*dilation=*/{1, 1}, p.ceil_mode));
  at::Tensor g = at::max_pool2d_with_indices_backward(
      grad_pooled, out, p.kernel, p.stride, /*padding=*/{0, 0}, /*dilation=*/{1, 1},
      p.ceil_mode, idx);
  return grad.defined() ? at::add(grad, g) : g;
}

// The backward of both ops: gradients for (x, weight, bias) from those of out and (pool op
// only) pooled; `n_args`: the op's argument count (one result per argument, the non-tensor
// ones undefined).
variable_list conv_backward(AutogradContext* ctx, const at::Tensor& grad,
                            const at::Tensor& grad_pooled, const PoolParams* pool,
                            size_t n_args) {
  variable_list result(n_args);
  const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                 ctx->needs_input_grad(2)};
  if (!(mask[0] || mask[1] || mask[2]) || (!grad.defined() && !grad_pooled.defined()))
    return result;
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &w = saved[1], &out = saved[2];
  const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
  const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
  ConvGrads grads;
  if (at::GradMode::is_enabled()) {  // create_graph: eager's differentiable formulas
    const at::Tensor g = grad_pooled.defined()
                             ? pool_backward_eager(grad, grad_pooled, out, *pool)
                             : grad;
    grads = conv_grads(at::threshold_backward(g, out, 0), x, w, stride, padding, mask);
  } else if (!grad_pooled.defined()) {
    static const auto bwd = find_op<BwdSig>(LF_OP_NAME("conv_bias_relu_backward"));
    grads = bwd.call(grad, out, x, w, stride, padding, mask);
  } else {
    static const auto pool_bwd = find_op<PoolBwdSig>(LF_OP_NAME("conv_bias_relu_pool_backward"));
    const std::optional<at::Tensor> g = grad.defined() ? std::optional<at::Tensor>(grad)
                                                       : std::nullopt;
    grads = pool_bwd.call(g, grad_pooled, out, x, w, stride, padding, pool->kernel,
                          pool->stride, pool->ceil_mode, mask);
  }
  if (mask[0]) result[0] = std::get<0>(grads);
  if (mask[1]) result[1] = std::get<1>(grads);
  if (mask[2]) result[2] = std::get<2>(grads);
  return result;
}

struct ConvBiasRelu : public torch::autograd::Function<ConvBiasRelu> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding) {
    static const auto op = find_op<FwdSig>(LF_OP_NAME("conv_bias_relu"));
    at::Tensor out;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = op.call(x, w, bias, stride, padding);
    }
    ctx->save_for_backward({x, w, out});
    save_params(ctx, stride, padding);
    ctx->set_materialize_grads(false);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return conv_backward(ctx, grads[0], at::Tensor(), nullptr, 5);
  }
};

struct ConvBiasReluPool : public torch::autograd::Function<ConvBiasReluPool> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef pool_kernel,
                               at::IntArrayRef pool_stride, bool ceil_mode) {
    static const auto op = find_op<PoolFwdSig>(LF_OP_NAME("conv_bias_relu_pool"));
    std::tuple<at::Tensor, at::Tensor> outs;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      outs = op.call(x, w, bias, stride, padding, pool_kernel, pool_stride, ceil_mode);
    }
    ctx->save_for_backward({x, w, std::get<0>(outs)});
    save_params(ctx, stride, padding);
    ctx->saved_data["pool_kernel"] = pool_kernel.vec();
    ctx->saved_data["pool_stride"] = pool_stride.vec();
    ctx->saved_data["ceil_mode"] = ceil_mode;
    // a gradient that reaches only one of (out, pooled) leaves the other undefined
    ctx->set_materialize_grads(false);
    return {std::get<0>(outs), std::get<1>(outs)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const PoolParams pool{ctx->saved_data["pool_kernel"].toIntVector(),
                          ctx->saved_data["pool_stride"].toIntVector(),
                          ctx->saved_data["ceil_mode"].toBool()};
    return conv_backward(ctx, grads[0], grads[1], &pool, 8);
  }
};

at::Tensor conv_bias_relu_autograd(const at::Tensor& x, const at::Tensor& w,
                                   const at::Tensor& bias, at::IntArrayRef stride,
                                   at::IntArrayRef padding) {
  return ConvBiasRelu::apply(x, w, bias, stride, padding)[0];
}

std::tuple<at::Tensor, at::Tensor> conv_bias_relu_pool_autograd(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_kernel, at::IntArrayRef pool_stride,
    bool ceil_mode) {
  const variable_list outs =
      ConvBiasReluPool::apply(x, w, bias, stride, padding, pool_kernel, pool_stride, ceil_mode);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(LF_OPS_NAMESPACE, Autograd, m) {
  m.impl("conv_bias_relu", &conv_bias_relu_autograd);
  m.impl("conv_bias_relu_pool", &conv_bias_relu_pool_autograd);
}

}  // namespace lpips_fast
