// relu(y + b) with PyTorch's rounding, per element: shared by the backbone's epilogues
// (conv.h, conv_pool.h) and the head's prologue (head.h, conv_head.h), so that a tap is the
// same bits whichever kernel writes it.
//
// y + b computed in the op-math type A (float for half/bfloat16, the dtype itself for
// float/double), rounded once to the dtype; ReLU keeps NaN (torch.relu does) and is applied
// after the rounding (rounding is monotone and rounds 0 to 0, so before or after gives the
// same bits).
#pragma once

#include <c10/macros/Macros.h>

namespace lpips_fast {

template <typename T, typename A>
C10_HOST_DEVICE inline T bias_relu(T y, T b) {
  const A v = static_cast<A>(static_cast<A>(y) + static_cast<A>(b));
  const T r = static_cast<T>(v);
  return static_cast<A>(r) < A(0) ? T(0) : r;  // NaN < 0 is false: NaN stays NaN
}

}  // namespace lpips_fast
