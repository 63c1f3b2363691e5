#!/usr/bin/env python3
"""Operators (and on CUDA kernels) per LPIPS training step, eager vs fused backbone.

The step: alex (random weights), N pairs of 64x64 images, forward and backward with the
gradient of in0 (the model's frozen parameters take none), as the training-loss benchmark
runs it. Counted:
- ops: every ATen or lpips_fast operator call the dispatcher sees (a TorchDispatchMode),
  less views and bare allocations, which launch nothing. Each counted op launches at least
  one kernel on a GPU; some launch more (eager's CUDA convolution with a bias is cuDNN's
  conv plus a bias add; the fused op is the conv plus its epilogue), which only the kernel
  count shows.
- kernels (CUDA only): the kernel launches torch.profiler records on the device.

    python benchmarks/count_ops.py                  # CPU
    python benchmarks/count_ops.py --device cuda --n 32
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lpips_fast  # noqa: E402

NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
             "detach", "alias", "lift_fresh", "_unsafe_view", "view", "_reshape_alias",
             "as_strided", "t", "expand", "slice", "select", "unsqueeze", "squeeze", "permute"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name  # e.g. aten::convolution, lpips_fast::conv_bias_relu
        if not (getattr(func, "is_view", False) or name.split("::")[-1] in NO_KERNEL):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def make_step(impl, net, n, size, device):
    torch.manual_seed(0)
    model = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False).to(device)
    model.backbone_impl = impl
    g = torch.Generator().manual_seed(0)
    x0, x1 = (torch.rand(n, 3, size, size, generator=g).to(device) * 2 - 1 for _ in range(2))

    def step():
        x = x0.clone().requires_grad_(True)
        model(x, x1).sum().backward()
    return step


def count(impl, net, n, size, device):
    step = make_step(impl, net, n, size, device)
    step()  # warm-up: one-time work (weight casts, lazy inits) is not part of a step
    with OpCounter() as c:
        step()
    kernels = None
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        kernels = sum(1 for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA)
    return c.ops, kernels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--net", default="alex")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--detail", action="store_true", help="list the ops of each impl")
    args = p.parse_args(argv)
    rows = {impl: count(impl, args.net, args.n, args.size, args.device)
            for impl in ("eager", "fused")}
    print(f"{args.net} N={args.n} {args.size}x{args.size} fwd+bwd (grad of in0) on {args.device}")
    print("| backbone | ops | kernels (CUDA) |\n|---|---|---|")
    for impl, (ops, kernels) in rows.items():
        print(f"| {impl} | {sum(ops.values())} | {'-' if kernels is None else kernels} |")
    if args.detail:
        for impl, (ops, _) in rows.items():
            print(f"\n{impl}:")
            for name, k in sorted(ops.items()):
                print(f"  {k:4d} {name}")


if __name__ == "__main__":
    main()
