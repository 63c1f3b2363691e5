// Host-side checks, layout analysis and output allocation shared by the CPU and CUDA
// implementations of the lpips_fast ops. Device-specific files only add the work
// decomposition and the kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <array>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "head.h"

namespace lpips_fast {

using at::Tensor;
using OptTensorList = c10::List<std::optional<at::Tensor>>;

// Outputs are filled with NaN before the kernels run when LPIPS_FAST_DEBUG_NAN_FILL=1,
// so that an element a kernel forgets to write shows up in the tests.
inline bool debug_nan_fill() {
  const char* v = std::getenv("LPIPS_FAST_DEBUG_NAN_FILL");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

inline Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
  if (debug_nan_fill() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Strides (sN, sC, sP) with pixel p = y*w + x at offset p*sP. False when the two spatial
// dimensions cannot be merged into one stride (then the caller makes the tensor contiguous).
inline bool pixel_strides(const Tensor& t, int64_t& sN, int64_t& sC, int64_t& sP) {
  const int64_t h = t.size(2), w = t.size(3);
  sN = t.size(0) == 1 ? 0 : t.stride(0);
  sC = t.size(1) == 1 ? 0 : t.stride(1);
  if (h * w == 1) {
    sP = 1;
  } else if (h == 1) {
    sP = t.stride(3);
  } else if (w == 1) {
    sP = t.stride(2);
  } else if (t.stride(2) == w * t.stride(3)) {
    sP = t.stride(3);
  } else {
    return false;
  }
  return true;
}

struct FeatView {
  Tensor t;  // the tensor the kernel reads (the input itself unless it had to be copied)
  int64_t sN = 0, sC = 0, sP = 0;
};

inline FeatView feat_view(const Tensor& t) {
  FeatView v;
  v.t = t;
  if (!pixel_strides(t, v.sN, v.sC, v.sP)) {
    // contiguous() returns an empty tensor as it is (any empty tensor counts as contiguous),
    // strides and all; an empty slice of a larger map kept its unmergeable strides and
    // failed the assert below. A fresh empty tensor has the standard strides.
    v.t = t.numel() == 0 ? at::empty(t.sizes(), t.options()) : t.contiguous();
    TORCH_INTERNAL_ASSERT(pixel_strides(v.t, v.sN, v.sC, v.sP));
  }
  return v;
}

// A gradient output with the layout autograd expects (empty_like, as the fake kernel does)
// and a buffer with pixel strides the kernel writes into (the same tensor unless the
// layout is exotic; then the caller copies `buf` into `out` after the kernel).
struct GradOut {
  Tensor out, buf;
  int64_t sN = 0, sC = 0, sP = 0;
};

inline GradOut grad_output(const Tensor& like, bool wanted) {
  GradOut g;
  if (!wanted) {
    g.out = g.buf = at::empty({0}, like.options());
    return g;
  }
  g.out = at::empty_like(like);
  if (debug_nan_fill()) g.out.fill_(std::numeric_limits<double>::quiet_NaN());
  g.buf = g.out;
  if (!pixel_strides(g.buf, g.sN, g.sC, g.sP)) {
    g.buf = new_output(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
    TORCH_INTERNAL_ASSERT(pixel_strides(g.buf, g.sN, g.sC, g.sP));
  }
  if (like.size(0) == 1) g.sN = 0;
  return g;
}

inline void check_layer(const Tensor& f0, const Tensor& f1, const std::optional<Tensor>& w,
                        size_t l) {
  const std::string at_layer = " (layer " + std::to_string(l) + ")";
  TORCH_CHECK(f0.dim() == 4 && f1.dim() == 4,
              "lpips_fast: features must be 4-D N x C x h x w, got f0 with ", f0.dim(),
              " and f1 with ", f1.dim(), " dimensions", at_layer);
  TORCH_CHECK(f0.device() == f1.device(), "lpips_fast: f0 is on ", f0.device(),
              " but f1 is on ", f1.device(), at_layer);
  TORCH_CHECK(f0.scalar_type() == f1.scalar_type(), "lpips_fast: dtype mismatch, f0 is ",
              f0.scalar_type(), " and f1 is ", f1.scalar_type(), at_layer);
  TORCH_CHECK(at::isFloatingType(f0.scalar_type()),
              "lpips_fast: features must be floating point, got ", f0.scalar_type(), at_layer);
  TORCH_CHECK(f0.size(1) == f1.size(1) && f0.size(2) == f1.size(2) && f0.size(3) == f1.size(3),
              "lpips_fast: shape mismatch, f0 is ", f0.sizes(), " and f1 is ", f1.sizes(),
              at_layer);
  TORCH_CHECK(f0.size(0) == f1.size(0),
              "lpips_fast: batch mismatch, f0 has ", f0.size(0), " and f1 has ", f1.size(0),
              " samples (broadcast a batch of 1 with expand before calling the op)", at_layer);
  TORCH_CHECK(f0.size(1) >= 1 && f0.size(2) >= 1 && f0.size(3) >= 1,
              "lpips_fast: features must have C, h, w >= 1, got ", f0.sizes(), at_layer);
  if (w.has_value()) {
    TORCH_CHECK(w->device() == f0.device(), "lpips_fast: weight is on ", w->device(),
                " but the features are on ", f0.device(), at_layer);
    TORCH_CHECK(w->numel() == f0.size(1), "lpips_fast: weight has ", w->numel(),
                " elements but the features have C = ", f0.size(1), " channels", at_layer);
    TORCH_CHECK(at::isFloatingType(w->scalar_type()),
                "lpips_fast: weight must be floating point, got ", w->scalar_type(), at_layer);
  }
}

// Per-layer weights of the multi-layer ops: an empty tensor stands for "no weights".
inline std::vector<std::optional<Tensor>> weights_vec(at::TensorList l) {
  std::vector<std::optional<Tensor>> v;
  v.reserve(l.size());
  for (const auto& x : l) v.push_back(x.numel() == 0 ? std::nullopt : std::optional<Tensor>(x));
  return v;
}

inline std::vector<std::optional<Tensor>> to_vec(const OptTensorList& l) {
  std::vector<std::optional<Tensor>> v;
  v.reserve(l.size());
  for (const auto& x : l) v.push_back(x);
  return v;
}

// Everything the forward kernels need, validated, with outputs allocated.
struct FwdPlan {
  std::vector<FeatView> v0, v1;
  std::vector<Tensor> w;  // acc dtype, contiguous, C elements; undefined for no weights
  Tensor values;          // L x N, acc dtype
  std::vector<Tensor> dmaps, r0s, r1s;
  at::ScalarType dtype, acc;
  // The head's prologue (head.h; set by conv_head.h for its one layer, else empty): the
  // bias (C elements, the features' dtype) and the taps the kernels write (v0's / v1's
  // sizes and strides).
  struct Prologue {
    Tensor bias, out0, out1;
  };
  std::vector<Prologue> prologue;

  bool has_prologue(size_t l) const { return l < prologue.size() && prologue[l].bias.defined(); }
};

inline FwdPlan plan_forward(at::TensorList f0s, at::TensorList f1s,
                            const std::vector<std::optional<Tensor>>& ws, bool return_map) {
  const size_t L = f0s.size();
  TORCH_CHECK(L >= 1, "lpips_fast: no layers given");
  TORCH_CHECK(f1s.size() == L && ws.size() == L, "lpips_fast: got ", L, " f0 layers, ",
              f1s.size(), " f1 layers and ", ws.size(), " weights");
  FwdPlan plan;
  plan.dtype = f0s[0].scalar_type();
  plan.acc = acc_type(plan.dtype);
  const int64_t N = f0s[0].dim() > 0 ? f0s[0].size(0) : 0;
  for (size_t l = 0; l < L; ++l) {
    check_layer(f0s[l], f1s[l], ws[l], l);
    TORCH_CHECK(f0s[l].scalar_type() == plan.dtype && f0s[l].device() == f0s[0].device(),
                "lpips_fast: all layers must share dtype and device (layer ", l, ")");
    TORCH_CHECK(f0s[l].size(0) == N, "lpips_fast: all layers must have the same batch size, "
                "layer 0 has ", N, " and layer ", l, " has ", f0s[l].size(0));
  }
  const auto aopts = f0s[0].options().dtype(plan.acc);
  plan.values = new_output({(int64_t)L, N}, aopts);
  for (size_t l = 0; l < L; ++l) {
    plan.v0.push_back(feat_view(f0s[l]));
    plan.v1.push_back(feat_view(f1s[l]));
    plan.w.push_back(ws[l].has_value() ? ws[l]->to(plan.acc).contiguous().view({-1}) : Tensor());
    const int64_t h = f0s[l].size(2), wd = f0s[l].size(3);
    plan.dmaps.push_back(return_map ? new_output({N, 1, h, wd}, aopts) : at::empty({0}, aopts));
    plan.r0s.push_back(new_output({N, h * wd}, aopts));
    plan.r1s.push_back(new_output({N, h * wd}, aopts));
  }
  return plan;
}

struct BwdPlan {
  std::vector<FeatView> v0, v1;
  std::vector<Tensor> w, r0s, r1s, gmaps;  // gmaps: contiguous N x P acc, or undefined
  Tensor gvalues;                          // L x N acc, contiguous
  std::vector<GradOut> g0s, g1s;
  std::vector<Tensor> gws;                 // C elements acc, or empty
  bool want0, want1, wantw;
  at::ScalarType dtype, acc;
};

inline BwdPlan plan_backward(const Tensor& grad_values,
                             const std::vector<std::optional<Tensor>>& gmaps,
                             at::TensorList f0s, at::TensorList f1s,
                             const std::vector<std::optional<Tensor>>& ws, at::TensorList r0s,
                             at::TensorList r1s, std::array<bool, 3> mask) {
  const size_t L = f0s.size();
  TORCH_CHECK(L >= 1 && f1s.size() == L && ws.size() == L && r0s.size() == L &&
                  r1s.size() == L && gmaps.size() == L,
              "lpips_fast backward: inconsistent number of layers");
  BwdPlan plan;
  plan.dtype = f0s[0].scalar_type();
  plan.acc = acc_type(plan.dtype);
  plan.want0 = mask[0];
  plan.want1 = mask[1];
  plan.wantw = mask[2];
  const int64_t N = f0s[0].dim() > 0 ? f0s[0].size(0) : 0;
  TORCH_CHECK(grad_values.numel() == (int64_t)L * N, "lpips_fast backward: grad of the values "
              "has ", grad_values.numel(), " elements, expected ", (int64_t)L * N);
  const auto dev = f0s[0].device();
  TORCH_CHECK(grad_values.device() == dev, "lpips_fast backward: the grad of the values is on ",
              grad_values.device(), " but the features are on ", dev);
  plan.gvalues = grad_values.to(plan.acc).contiguous();
  for (size_t l = 0; l < L; ++l) {
    check_layer(f0s[l], f1s[l], ws[l], l);
    TORCH_CHECK(f0s[l].device() == dev && r0s[l].device() == dev && r1s[l].device() == dev &&
                    (!gmaps[l].has_value() || gmaps[l]->device() == dev),
                "lpips_fast backward: layer ", l, " has its features on ", f0s[l].device(),
                ", saved norms on ", r0s[l].device(), " and ", r1s[l].device(),
                (gmaps[l].has_value() ? ", the map's grad on " + gmaps[l]->device().str() : ""),
                "; all must be on ", dev);
    TORCH_CHECK(f0s[l].scalar_type() == plan.dtype && f0s[l].size(0) == N,
                "lpips_fast backward: all layers must share dtype and batch size");
    const int64_t P = f0s[l].size(2) * f0s[l].size(3);
    TORCH_CHECK(r0s[l].numel() == N * P && r1s[l].numel() == N * P,
                "lpips_fast backward: saved norms have the wrong size (layer ", l, ")");
    plan.v0.push_back(feat_view(f0s[l]));
    plan.v1.push_back(feat_view(f1s[l]));
    plan.w.push_back(ws[l].has_value() ? ws[l]->to(plan.acc).contiguous().view({-1}) : Tensor());
    plan.r0s.push_back(r0s[l].to(plan.acc).contiguous());
    plan.r1s.push_back(r1s[l].to(plan.acc).contiguous());
    if (gmaps[l].has_value() && gmaps[l]->numel() > 0) {
      TORCH_CHECK(gmaps[l]->numel() == N * P, "lpips_fast backward: grad of the map has ",
                  gmaps[l]->numel(), " elements, expected ", N * P, " (layer ", l, ")");
      plan.gmaps.push_back(gmaps[l]->to(plan.acc).contiguous());
    } else {
      plan.gmaps.push_back(Tensor());
    }
    plan.g0s.push_back(grad_output(f0s[l], mask[0]));
    plan.g1s.push_back(grad_output(f1s[l], mask[1]));
    const auto aopts = f0s[l].options().dtype(plan.acc);
    // A batch of 0 sums nothing: its weight gradient is zero, not whatever memory held.
    plan.gws.push_back(!(mask[2] && ws[l].has_value()) ? at::empty({0}, aopts)
                       : N == 0 ? at::zeros({f0s[l].size(1)}, aopts)
                                : new_output({f0s[l].size(1)}, aopts));
  }
  return plan;
}

// Copy gradients written into a contiguous stand-in back into the autograd-layout output.
inline void finish_backward(BwdPlan& plan) {
  for (auto* gs : {&plan.g0s, &plan.g1s})
    for (auto& g : *gs)
      if (g.out.numel() > 0 && !g.buf.is_same(g.out)) g.out.copy_(g.buf);
}

// The part of a layer's descriptor that forward and backward share: inputs and shapes.
template <typename T, typename A, typename Plan>
LayerDesc<T, A> input_desc(const Plan& plan, size_t l) {
  LayerDesc<T, A> d{};
  const auto& v0 = plan.v0[l];
  const auto& v1 = plan.v1[l];
  d.f0 = v0.t.template const_data_ptr<T>();
  d.f1 = v1.t.template const_data_ptr<T>();
  d.w = plan.w[l].defined() ? plan.w[l].template const_data_ptr<A>() : nullptr;
  d.sN0 = v0.sN; d.sC0 = v0.sC; d.sP0 = v0.sP;
  d.sN1 = v1.sN; d.sC1 = v1.sC; d.sP1 = v1.sP;
  d.N = v0.t.size(0);
  d.C = v0.t.size(1);
  d.P = v0.t.size(2) * v0.t.size(3);
  d.chfast = (d.C > 1 && d.sC0 == 1 && d.sC1 == 1) ? 1 : 0;
  return d;
}

template <typename T, typename A>
LayerDesc<T, A> base_desc(const FwdPlan& plan, size_t l) {
  auto d = input_desc<T, A>(plan, l);
  d.r0 = plan.r0s[l].mutable_data_ptr<A>();
  d.r1 = plan.r1s[l].mutable_data_ptr<A>();
  d.dmap = plan.dmaps[l].numel() > 0 ? plan.dmaps[l].mutable_data_ptr<A>() : nullptr;
  if (plan.has_prologue(l)) {
    const auto& pro = plan.prologue[l];
    d.bias = pro.bias.template const_data_ptr<T>();
    d.o0 = pro.out0.template mutable_data_ptr<T>();
    d.o1 = pro.out1.template mutable_data_ptr<T>();
  }
  return d;
}

template <typename T, typename A>
LayerDesc<T, A> base_desc(BwdPlan& plan, size_t l) {
  auto d = input_desc<T, A>(plan, l);
  d.r0 = const_cast<A*>(plan.r0s[l].const_data_ptr<A>());
  d.r1 = const_cast<A*>(plan.r1s[l].const_data_ptr<A>());
  d.gvalue = plan.gvalues.const_data_ptr<A>() + l * d.N;
  d.gmap = plan.gmaps[l].defined() ? plan.gmaps[l].const_data_ptr<A>() : nullptr;
  auto& g0 = plan.g0s[l];
  auto& g1 = plan.g1s[l];
  d.g0 = plan.want0 ? g0.buf.mutable_data_ptr<T>() : nullptr;
  d.g1 = plan.want1 ? g1.buf.mutable_data_ptr<T>() : nullptr;
  d.gsN0 = g0.sN; d.gsC0 = g0.sC; d.gsP0 = g0.sP;
  d.gsN1 = g1.sN; d.gsC1 = g1.sC; d.gsP1 = g1.sP;
  return d;
}

}  // namespace lpips_fast

namespace lpips_fast {

// The op entry points, shared by the CPU and CUDA registrations; `run` launches the kernels.
using FwdRunner = void (*)(FwdPlan&);
using BwdRunner = void (*)(BwdPlan&);

template <FwdRunner run>
std::tuple<Tensor, Tensor, Tensor, Tensor> op_head_forward(const Tensor& f0, const Tensor& f1,
                                                           const std::optional<Tensor>& w,
                                                           bool return_map) {
  std::vector<Tensor> a{f0}, b{f1};
  FwdPlan plan = plan_forward(a, b, {w}, return_map);
  run(plan);
  return {plan.values.view({-1}), plan.dmaps[0], plan.r0s[0], plan.r1s[0]};
}

template <FwdRunner run>
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>
op_head_all_forward(at::TensorList f0s, at::TensorList f1s, at::TensorList ws,
                    bool return_map) {
  FwdPlan plan = plan_forward(f0s, f1s, weights_vec(ws), return_map);
  run(plan);
  return {plan.values, plan.dmaps, plan.r0s, plan.r1s};
}

template <BwdRunner run>
std::tuple<Tensor, Tensor, Tensor> op_head_backward(
    const Tensor& grad_value, const std::optional<Tensor>& grad_map, const Tensor& f0,
    const Tensor& f1, const std::optional<Tensor>& w, const Tensor& r0, const Tensor& r1,
    std::array<bool, 3> mask) {
  std::vector<Tensor> a{f0}, b{f1}, ra{r0}, rb{r1};
  BwdPlan plan = plan_backward(grad_value, {grad_map}, a, b, {w}, ra, rb, mask);
  run(plan);
  finish_backward(plan);
  return {plan.g0s[0].out, plan.g1s[0].out, plan.gws[0]};
}

template <BwdRunner run>
std::tuple<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>> op_head_all_backward(
    const Tensor& grad_values, const OptTensorList& grad_maps, at::TensorList f0s,
    at::TensorList f1s, at::TensorList ws, at::TensorList r0s, at::TensorList r1s,
    std::array<bool, 3> mask) {
  BwdPlan plan = plan_backward(grad_values, to_vec(grad_maps), f0s, f1s, weights_vec(ws), r0s,
                               r1s, mask);
  run(plan);
  finish_backward(plan);
  std::vector<Tensor> g0, g1;
  for (auto& g : plan.g0s) g0.push_back(g.out);
  for (auto& g : plan.g1s) g1.push_back(g.out);
  return {g0, g1, plan.gws};
}

}  // namespace lpips_fast
