#!/usr/bin/env python3
"""Fused LPIPS head vs the pure-PyTorch reference head, per layer shape of alex and vgg.

Input sizes 64x64 (batch 8, training-size) and 512x512 (batch 1, scoring). Per layer:
forward (value only) and forward+backward (gradients of f0), medians of repeats after
warm-up (CUDA events on GPU). On GPU also the achieved read bandwidth of the fused forward
(bytes of f0 + f1 / time) against a device-to-device copy of the same bytes (copy bandwidth =
bytes read + written / time). One extra row per net runs all five layers in one op
(head_all) against the five reference heads.

    lpips-fast bench kernels               # CPU, and CUDA when present
    lpips-fast bench kernels --device cuda --out benchmarks/results/h100.md
    lpips-fast bench kernels --memcheck-case --device cuda   # tiny case for compute-sanitizer
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from .. import _ops
from .. import reference as R
from .common import device_name, median_seconds

PROG = "lpips-fast bench kernels"  # the name in --help (benchmarks/ runs the same code)

ALEX_C = [64, 192, 384, 256, 256]
VGG_C = [64, 128, 256, 512, 512]


def alex_shapes(s):
    h1 = (s + 4 - 11) // 4 + 1          # conv 11x11 stride 4 pad 2
    h2 = (h1 - 3) // 2 + 1              # maxpool 3 stride 2 (conv2 keeps the size)
    h3 = (h2 - 3) // 2 + 1              # maxpool 3 stride 2 (conv3-5 keep the size)
    return list(zip(ALEX_C, [h1, h2, h3, h3, h3]))


def vgg_shapes(s):
    return list(zip(VGG_C, [s, s // 2, s // 4, s // 8, s // 16]))


def bench(fn, device, min_time=0.2, max_reps=50, warmup=2):
    """Median seconds of fn() over repeats (see common.median_seconds)."""
    return median_seconds(fn, device, warmup=warmup, min_time=min_time, max_reps=max_reps)


def make(n, c, h, w, device, dtype, channels_last, gen):
    x = torch.randn(n, c, h, w, generator=gen).relu().to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def fmt_ms(t):
    return f"{t * 1e3:.3f}"


def run(device, sizes, nets, dtype, channels_last, quick):
    gen = torch.Generator().manual_seed(0)
    rows = []
    for net in nets:
        for s in sizes:
            n = 8 if s <= 128 else 1
            shapes = alex_shapes(s) if net == "alex" else vgg_shapes(s)
            f0s, f1s, ws = [], [], []
            for li, (c, h) in enumerate(shapes):
                f0 = make(n, c, h, h, device, dtype, channels_last, gen)
                f1 = make(n, c, h, h, device, dtype, channels_last, gen)
                w = torch.rand(1, c, 1, 1, generator=gen).to(device)
                f0s.append(f0)
                f1s.append(f1)
                ws.append(w)
                kw = dict(min_time=0.05 if quick else 0.2, max_reps=5 if quick else 50)
                t_fused = bench(lambda: _ops.head(f0, f1, w), device, **kw)
                t_ref = bench(lambda: R.head(f0, f1, w), device, **kw)
                g0 = f0.detach().requires_grad_()
                g0r = f0.detach().requires_grad_()

                def fb_fused():
                    v, _ = _ops.head(g0, f1, w)
                    torch.autograd.grad(v.sum(), [g0])

                def fb_ref():
                    v, _ = R.head(g0r, f1, w)
                    torch.autograd.grad(v.sum(), [g0r])

                t_fb = bench(fb_fused, device, **kw)
                t_fb_ref = bench(fb_ref, device, **kw)
                row = dict(case=f"{net} {s}x{s} N={n} L{li + 1}", shape=f"{c}x{h}x{h}",
                           fused=t_fused, ref=t_ref, fb=t_fb, fb_ref=t_fb_ref)
                if device == "cuda":
                    nbytes = 2 * f0.numel() * f0.element_size()
                    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
                    dst = torch.empty_like(src)
                    t_copy = bench(lambda: dst.copy_(src), device, **kw)
                    row["bw"] = nbytes / t_fused / 1e9
                    row["copy_bw"] = 2 * nbytes / t_copy / 1e9
                rows.append(row)
            kw = dict(min_time=0.05 if quick else 0.2, max_reps=5 if quick else 50)
            t_all = bench(lambda: _ops.head_all(f0s, f1s, ws), device, **kw)
            t_all_ref = bench(lambda: [R.head(a, b, c) for a, b, c in zip(f0s, f1s, ws)],
                              device, **kw)
            g0s = [f.detach().requires_grad_() for f in f0s]
            g0rs = [f.detach().requires_grad_() for f in f0s]

            def fb_all():
                v, _ = _ops.head_all(g0s, f1s, ws)
                torch.autograd.grad(v.sum(), g0s)

            def fb_all_ref():
                v = sum(R.head(a, b, c)[0].sum() for a, b, c in zip(g0rs, f1s, ws))
                torch.autograd.grad(v, g0rs)

            rows.append(dict(case=f"{net} {s}x{s} N={n} all 5 (head_all)", shape="",
                             fused=t_all, ref=t_all_ref, fb=bench(fb_all, device, **kw),
                             fb_ref=bench(fb_all_ref, device, **kw)))
    return rows


def table(rows, device):
    cols = ["case", "layer CxHxW", "fused fwd ms", "ref fwd ms", "fwd speedup",
            "fused fwd+bwd ms", "ref fwd+bwd ms", "fwd+bwd speedup"]
    if device == "cuda":
        cols += ["fused read GB/s", "copy GB/s", "% of copy"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["case"], r["shape"], fmt_ms(r["fused"]), fmt_ms(r["ref"]),
                 f"{r['ref'] / r['fused']:.2f}x", fmt_ms(r["fb"]), fmt_ms(r["fb_ref"]),
                 f"{r['fb_ref'] / r['fb']:.2f}x"]
        if device == "cuda":
            if "bw" in r:
                cells += [f"{r['bw']:.0f}", f"{r['copy_bw']:.0f}",
                          f"{100 * r['bw'] / r['copy_bw']:.0f}%"]
            else:
                cells += ["", "", ""]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def memcheck_case(device):
    """A tiny forward + backward of every kernel path, for compute-sanitizer memcheck."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for cl in (False, True):
            for (n, c, h) in [(2, 37, 5), (1, 600, 3), (3, 8, 1)]:
                f0 = make(n, c, h, h + 1, device, dtype, cl, gen).requires_grad_()
                f1 = make(1, c, h, h + 1, device, dtype, cl, gen).requires_grad_()
                w = torch.rand(1, c, 1, 1, generator=gen).to(device).requires_grad_()
                v, d = _ops.head(f0, f1, w, return_map=True)
                torch.autograd.grad(v.sum() + d.sum(), [f0, f1, w])
    f0s = [make(2, c, h, h, device, torch.float32, False, gen).requires_grad_()
           for c, h in [(64, 15), (192, 7), (384, 3), (256, 3), (256, 3)]]
    f1s = [make(2, f.shape[1], f.shape[2], f.shape[3], device, torch.float32, True, gen)
           for f in f0s]
    ws = [torch.rand(1, f.shape[1], 1, 1, generator=gen).to(device) for f in f0s]
    values, maps = _ops.head_all(f0s, f1s, ws, return_map=True)
    torch.autograd.grad(values.sum() + sum(m.sum() for m in maps), f0s)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"memcheck case ran on {device}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, and CUDA when available")
    p.add_argument("--sizes", default="64,512")
    p.add_argument("--nets", default="alex,vgg")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the CPU runs")
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--memcheck-case", action="store_true",
                   help="run only a tiny forward+backward of every kernel path")
    a = p.parse_args(argv)
    if not _ops.available():
        sys.exit(f"lpips_fast extension not available: {_ops.load_error}")
    devices = ["cpu", "cuda"] if a.device == "auto" else [a.device]
    if a.device == "auto" and not torch.cuda.is_available():
        devices = ["cpu"]
    if a.memcheck_case:
        for d in devices:
            memcheck_case(d)
        # Under compute-sanitizer memcheck (torch 2.11, H100) the interpreter's teardown died
        # with "terminate called without an active exception" after the kernels had run clean
        # (0 errors): skip the teardown so the exit code is the sanitizer's verdict.
        sys.stdout.flush()
        os._exit(0)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    sizes = [int(s) for s in a.sizes.split(",")]
    nets = a.nets.split(",")
    parts = []
    for d in devices:
        rows = run(d, sizes, nets, dtype, a.channels_last, a.quick)
        threads = f", {torch.get_num_threads()} threads" if d == "cpu" else ""
        head = (f"### LPIPS head: fused vs reference, {device_name(d)} ({d}{threads}), "
                f"torch {torch.__version__}, {a.dtype}, "
                f"{'channels_last' if a.channels_last else 'NCHW'}, medians\n")
        parts.append(head + "\n" + table(rows, d) + "\n")
    text = "\n".join(parts)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
