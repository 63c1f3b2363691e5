#!/usr/bin/env python3
"""Per conv layer of alex and vgg: eager conv + bias + ReLU against the fused op
(lpips_fast._conv_ops: bias-free conv + one epilogue; backward: one mask pass + one
convolution_backward), forward and forward+backward (input gradient only, frozen weights).
A conv followed by a max-pool (the pool that starts the next slice) runs with it in every
variant, and a third variant, "fused+pool", computes the pool in the conv's epilogue
(conv_bias_relu_pool; backward: one pass for pool, mask and the tap's gradient); the
backward then gets a gradient at both outputs, as in LPIPS (the tap feeds the head).

With --head: instead, the slice-ending convs that no max-pool follows (alex relu3-5, vgg
relu5_3 at the large forward-only cases, where the model streams), forward only: the
"fused" backbone's epilogue then the head on the tap (3 x the tap's bytes: epilogue reads
y and writes the tap, the head reads the tap) against conv_bias_relu_head, whose head reads y
and writes the tap itself (2 x; lpips_fast._conv_head, backbone impl "fused-head"), and the
bias-free convolution alone, so that the table shows the part after the convolution.

Each layer runs at the shapes the benchmark cases give it (a pair in one pass: batch 2N).
The variants run round by round in a shuffled order (common.interleaved_times, so clock and
thermal drift hit all alike); medians of the rounds, CUDA events on a GPU. On the CPU it runs tiny cases
only to check that it works: CPU timings say nothing about the GPU's epilogue passes.

    python benchmarks/bench_backbone.py                      # CPU, tiny
    python benchmarks/bench_backbone.py --device cuda --out results/backbone.md
    python benchmarks/bench_backbone.py --overhead           # per-call cost at a tiny layer
    python benchmarks/bench_backbone.py --device cuda --head --out results/backbone-head.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lpips_fast import _conv_head, _conv_ops, _ops  # noqa: E402
from lpips_fast.backbones import NETS  # noqa: E402
from common import device_name, interleaved_times, publish, spread, warm_gpu  # noqa: E402
from lpips_fast.bench.limits import device_limits  # noqa: E402

# (net, N pairs, size, backward): bench.py's GPU cases for alex and vgg (squeeze's 1x1/3x3
# fire convs are covered by the model-level count), tiny ones on the CPU.
GPU_CASES = [("alex", 32, 64, True), ("alex", 1, 1024, False), ("vgg", 16, 256, True),
             ("vgg", 1, 2048, False)]
CPU_CASES = [("alex", 2, 64, True), ("vgg", 1, 32, True)]
# --head: (net, N pairs, size): the forward-only cases whose model streams (head per layer)
GPU_HEAD_CASES = [("alex", 1, 1024), ("vgg", 1, 2048)]
CPU_HEAD_CASES = [("alex", 1, 64), ("vgg", 1, 32)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def conv_layers(net, size):
    """(index, cin, cout, kernel, stride, padding, input size, pool) of every conv of `net`;
    pool: (kernel, stride, ceil_mode) of the max-pool after its ReLU, else None."""
    specs, _, _, _ = NETS[net]
    out, s = [], size
    for i, (kind, *a) in enumerate(specs):
        if kind == "conv":
            cin, cout, k, st, p = a
            after = specs[i + 2] if i + 2 < len(specs) else ("none",)
            pool = tuple(after[1:]) if after[0] == "pool" else None
            out.append((i, cin, cout, k, st, p, s, pool))
            s = (s + 2 * p - k) // st + 1
        elif kind == "pool":
            k, st, ceil = a
            s = (s - k + (st - 1 if ceil else 0)) // st + 1
    return out


def head_layers(net, size):
    """The convs of conv_layers(net, size) whose ReLU ends a slice (an LPIPS tap) that no
    max-pool follows: where the "fused-head" impl takes the head from the epilogue."""
    ends = {stop - 1 for _, stop in NETS[net][1]}
    return [layer for layer in conv_layers(net, size) if layer[0] + 1 in ends and layer[7] is None]


def make_layer(layer, batch, dtype, device, channels_last):
    """(x, weight, bias) of one conv layer: randn input, unit-variance weights."""
    _, cin, cout, k, _, _, s, _ = layer
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, cin, s, s, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(device, dtype)
    b = (torch.randn(cout, generator=g) * 0.1).to(device, dtype)
    return x, w.contiguous(memory_format=fmt), b


def bench_head_layer(layer, batch, dtype, device, channels_last, reps):
    """Median seconds {variant: s} of one tap's conv + epilogue + LPIPS head, forward: the
    bias-free conv alone, "epilogue+head" (conv_bias_relu, then the head op on the tap's
    halves) and "prologue" (conv_bias_relu_head), interleaved round by round."""
    _, _, cout, _, st, p, _, _ = layer
    x, w, b = make_layer(layer, batch, dtype, device, channels_last)
    lw = torch.rand(1, cout, 1, 1, generator=torch.Generator().manual_seed(1)).to(device)
    n = batch // 2

    def conv():
        torch.ops.aten.convolution(x, w, None, (st, st), (p, p), (1, 1), False, (0, 0), 1)

    def epilogue_head():
        tap = _conv_ops.conv_bias_relu(x, w, b, (st, st), (p, p))
        _ops.head(tap[:n], tap[n:], lw)

    def prologue():
        _conv_head.conv_bias_relu_head(x, w, b, (st, st), (p, p), lw, False)

    runs = {"conv": conv, "epilogue+head": epilogue_head, "prologue": prologue}
    with torch.no_grad():
        times = interleaved_times(runs, device, warmup=1, rounds=reps)
    return {key: statistics.median(t) for key, t in times.items()}


def head_table(cases, dtype_name, device, channels_last, reps):
    """The --head table's lines (see the top)."""
    dtype = DTYPES[dtype_name]
    hbm = (device_limits(device_name(device)) or {}).get("hbm") if device.type == "cuda" else None
    lines = [f"# the LPIPS head of a tap no pool follows: epilogue + head vs the head's "
             f"prologue, {device_name(device)}, {dtype_name}, "
             f"{'channels_last' if channels_last else 'NCHW'}, forward, medians of {reps} (ms; "
             "after conv: the variant less the bias-free conv alone; E: the tap's bytes)", "",
             "| case | layer | tap | E (MB) | bytes: epilogue+head / prologue | E at HBM: the saving (ms) "
             "| conv | epilogue+head | prologue | after conv: epilogue+head | prologue | x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for net, n, size in cases:
        for layer in head_layers(net, size):
            t = bench_head_layer(layer, 2 * n, dtype, device, channels_last, reps)
            _, _, cout, k, st, p, s, _ = layer
            h = (s + 2 * p - k) // st + 1
            e = 2 * n * cout * h * h * torch.finfo(dtype).bits // 8
            after = {v: t[v] - t["conv"] for v in ("epilogue+head", "prologue")}
            ratio = after["epilogue+head"] / after["prologue"] if after["prologue"] > 0 else None
            cells = [f"{net} {n}x{size}", f"features.{layer[0]}", f"{2 * n}x{cout}x{h}x{h}",
                     f"{e / 1e6:.3g}", "3E / 2E", f"{e / (hbm * 1e12) * 1e3:.3f}" if hbm else "-",
                     *(_ms(t[v]) for v in ("conv", "epilogue+head", "prologue")),
                     *(_ms(after[v]) for v in ("epilogue+head", "prologue")),
                     f"{ratio:.2f}" if ratio is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


def bench_layer(layer, batch, dtype, device, channels_last, backward, reps):
    """Median seconds {(impl, 'fwd'|'fwdbwd'): s} for one conv layer."""
    # the project's one timing loop: warm-up (cuDNN's algorithm choice, the allocator), then
    # rounds running every variant once in a shuffled order
    times = interleaved_times(layer_runs(layer, batch, dtype, device, channels_last, backward),
                              device, warmup=1, rounds=reps)
    return {key: statistics.median(t) for key, t in times.items()}


def layer_runs(layer, batch, dtype, device, channels_last, backward):
    """{(impl, 'fwd'|'fwdbwd'): fn} for one conv layer: fwd without a graph; fwdbwd the input
    gradient only (frozen weights)."""
    _, _, _, _, st, p, _, pool = layer
    x, w, b = make_layer(layer, batch, dtype, device, channels_last)
    impls = {
        "eager": lambda x: (F.relu(F.conv2d(x, w, b, st, p), inplace=True),),
        "fused": lambda x: (_conv_ops.conv_bias_relu(x, w, b, (st, st), (p, p)),),
    }
    if pool is not None:  # the tap and the next slice's pooled input
        def pooled(f):
            return lambda x: (lambda out: (out, F.max_pool2d(out, pool[0], pool[1],
                                                             ceil_mode=pool[2])))(f(x)[0])
        impls = {impl: pooled(f) for impl, f in impls.items()}
        impls["fused+pool"] = lambda x: _conv_ops.conv_bias_relu_pool(
            x, w, b, (st, st), (p, p), (pool[0],) * 2, (pool[1],) * 2, pool[2])
    xg = x.detach().requires_grad_(True)
    runs = {}
    for impl, f in impls.items():
        def fwd(f=f):
            with torch.no_grad():
                f(x)
        runs[(impl, "fwd")] = fwd
        if backward:
            def fb(f=f):
                outs = f(xg)
                torch.autograd.grad(outs, xg, [torch.ones_like(o) for o in outs])
            runs[(impl, "fwdbwd")] = fb
    return runs


# --overhead: a layer so small that the per-call cost of dispatch and autograd dominates
# (x 1x3x8x8, 3 -> 8 channels, 3x3 conv, then a 2x2 max-pool), timed per call
OVERHEAD_LAYER = (0, 3, 8, 3, 1, 1, 8, (2, 2, False))


def overhead(device, rounds, calls=20):
    """The per-call time of each variant at OVERHEAD_LAYER (microseconds: median, quartiles;
    each round times `calls` calls of every variant, variants interleaved round by round)."""
    runs = layer_runs(OVERHEAD_LAYER, 1, torch.float32, device, False, True)
    batched = {key: (lambda f=f: [f() for _ in range(calls)]) for key, f in runs.items()}
    times = interleaved_times(batched, device, warmup=2, rounds=rounds, max_rounds=rounds)
    lines = [f"# per-call overhead, conv 1x3x8x8 -> 8 channels k3 + 2x2 pool, {device_name(device)}"
             f", fp32, {rounds} rounds of {calls} calls (us per call: median [q1, q3])", "",
             "| variant | fwd (no grad) | fwd+bwd (grad of x) |", "|---|---|---|"]
    for impl in dict.fromkeys(impl for impl, _ in runs):
        cells = []
        for kind in ("fwd", "fwdbwd"):
            sp = spread([t / calls for t in times[(impl, kind)]])
            cells.append(f"{sp['ms'] * 1e3:.1f} [{sp['q1_ms'] * 1e3:.1f}, {sp['q3_ms'] * 1e3:.1f}]")
        lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--nchw", action="store_true", help="NCHW (default: channels_last, as LPIPS)")
    p.add_argument("--reps", type=int, default=None, help="default: 15 on CUDA, 3 on CPU")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--overhead", action="store_true",
                   help="only the per-call overhead at a tiny layer (OVERHEAD_LAYER)")
    p.add_argument("--head", action="store_true",
                   help="only the head-from-the-epilogue table (see the top)")
    args = p.parse_args(argv)
    if not _ops.available():
        sys.exit(f"lpips_fast extension not available: {_ops.load_error}")
    device = torch.device(args.device)
    if args.overhead:
        publish(overhead(device, args.reps or 30), args.out)
        return
    gpu = device.type == "cuda"
    reps = args.reps or (15 if gpu else 3)
    if gpu:
        torch.backends.cudnn.benchmark = False  # the model's default: heuristics pick
        warm_gpu(device)
    if args.head:
        lines = head_table(GPU_HEAD_CASES if gpu else CPU_HEAD_CASES, args.dtype, device,
                           not args.nchw, reps)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    lines = [f"# conv + bias + ReLU [+ max-pool]: eager vs fused vs fused+pool, "
             f"{device_name(device)}, {args.dtype}, {'NCHW' if args.nchw else 'channels_last'}, "
             f"medians of {reps} (ms; x: eager's time over the variant's)", "",
             "| case | layer | x shape | k/s/p, pool | eager fwd | fused fwd | x | fused+pool fwd "
             "| x | eager fwd+bwd | fused fwd+bwd | x | fused+pool fwd+bwd | x |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for net, n, size, backward in (GPU_CASES if gpu else CPU_CASES):
        total = {}
        for layer in conv_layers(net, size):
            t = bench_layer(layer, 2 * n, DTYPES[args.dtype], device, not args.nchw, backward, reps)
            for (impl, kind), v in t.items():
                total[(impl, kind)] = total.get((impl, kind), 0.0) + v
                if impl == "fused":  # the fused backbone: fused+pool where a pool follows
                    v = t.get(("fused+pool", kind), v)
                    total[("fused+pool", kind)] = total.get(("fused+pool", kind), 0.0) + v
            ksp = f"{layer[3]}/{layer[4]}/{layer[5]}"
            if layer[7] is not None:
                ksp += ", {}/{}{}".format(*layer[7][:2], " ceil" if layer[7][2] else "")
            lines.append(_row(f"{net} {n}x{size}", f"features.{layer[0]}",
                              f"{2 * n}x{layer[1]}x{layer[6]}x{layer[6]}", ksp, t))
            print(lines[-1], flush=True)
        lines.append(_row(f"{net} {n}x{size}", "**all convs**", "", "(fused+pool: the "
                          "fused backbone)", total))
        print(lines[-1], flush=True)
    lines += ["", *first_conv_padding(DTYPES[args.dtype], device, not args.nchw, reps, gpu)]
    print("\n".join(lines[-6:]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


def first_conv_padding(dtype, device, channels_last, reps, gpu):
    """The 3-channel first conv against the same conv on 8 channels, 5 of them zero (exactly
    the same sums: each added product is +0). Tensor cores take channels in multiples of 8, so
    cuDNN may pick a slower kernel for 3; the padded input would be written by the scaling
    layer, which copies the images anyway, so padding costs nothing here. Forward only, and
    forward + input gradient (a training step's loss on generated images)."""
    rows = ["| case | first conv | 3 channels fwd | 8 channels fwd | x | 3 channels fwd+bwd "
            "| 8 channels fwd+bwd | x |", "|---|---|---|---|---|---|---|---|"]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for net, n, size, _ in (GPU_CASES if gpu else CPU_CASES):
        _, cin, cout, k, st, p, s, _ = conv_layers(net, size)[0]
        g = torch.Generator().manual_seed(0)
        x3 = torch.randn(2 * n, cin, s, s, generator=g)
        w3 = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        b = (torch.randn(cout, generator=g) * 0.1).to(device, dtype)
        runs = {}
        for c in (3, 8):
            x = F.pad(x3, (0, 0, 0, 0, 0, c - cin)).to(device, dtype).contiguous(memory_format=fmt)
            w = F.pad(w3, (0, 0, 0, 0, 0, c - cin)).to(device, dtype).contiguous(memory_format=fmt)
            xg = x.detach().requires_grad_(True)

            def fwd(x=x, w=w):
                with torch.no_grad():
                    F.conv2d(x, w, b, st, p)

            def fb(xg=xg, w=w):
                out = F.conv2d(xg, w, b, st, p)
                torch.autograd.grad(out, xg, torch.ones_like(out))
            runs[(c, "fwd")], runs[(c, "fwdbwd")] = fwd, fb
        t = {key: statistics.median(v)
             for key, v in interleaved_times(runs, device, warmup=1, rounds=reps).items()}
        cells = []
        for kind in ("fwd", "fwdbwd"):
            cells += [_ms(t[(3, kind)]), _ms(t[(8, kind)]), f"{t[(3, kind)] / t[(8, kind)]:.2f}"]
        rows.append("| " + " | ".join([f"{net} {n}x{size}", f"{cin}->{cout} k{k}/s{st}"] + cells)
                    + " |")
    return rows


def _row(case, layer, shape, ksp, t):
    """A table row: eager's time, then each fused variant's with eager's over it (x)."""
    def cells(kind):
        out = [_ms(t.get(("eager", kind)))]
        for impl in ("fused", "fused+pool"):
            v = t.get((impl, kind))
            out += [_ms(v), f"{t[('eager', kind)] / v:.2f}" if v else "-"]
        return out
    return "| " + " | ".join([case, layer, shape, ksp] + cells("fwd") + cells("fwdbwd")) + " |"


def _ms(v):
    return f"{v * 1e3:.3f}" if v is not None else "-"


if __name__ == "__main__":
    main()
