#!/usr/bin/env python3
"""Per-kernel profile of one LPIPS forward: where vgg 2048's time goes (issue 19, item 3).

For each precision (fp32, bf16; channels_last, no grad) and variant:
  base   lpips_fast as shipped;
  pad8   the 3-channel first convolution given 5 zero input channels (its input too): the same
         sums, but a channel count cuDNN's tensor-core kernels take (multiples of 8 for 16-bit
         types, of 4 for TF32) instead of 3;
the times of all (precision, variant) pairs, interleaved round by round (common.interleaved_times,
CUDA events), then one torch.profiler run each: the top kernels by device time, their share of
the total, and for the convolutions' main kernels the FLOPs torch.profiler counts for the conv
op (as executed: pad8's first conv counts its zero channels) over the kernel's time, against the
device's dense tensor-core peak (benchmarks/limits.py).

--cudnn-benchmark sets torch.backends.cudnn.benchmark=True for the whole process. It cannot be
an interleaved variant: PyTorch's cuDNN plan cache is keyed by the convolution's shapes, dtypes,
deterministic and allow_tf32, not by the benchmark flag, and is consulted first, so whichever
mode meets a shape first fixes its plan for the rest of the process. Compare two runs instead.

On a CPU (a smoke run with tiny sizes) the "kernels" are the aten ops, timed by self CPU time.

    python benchmarks/profile_kernels.py --out /tmp/profile.md                 # vgg 2048, CUDA
    python benchmarks/profile_kernels.py --cudnn-benchmark --out /tmp/profile-bench.md
    python benchmarks/profile_kernels.py --device cpu --size 32 --iters 1      # smoke run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import lpips_fast  # noqa: E402
import limits  # noqa: E402
from common import (environment, environment_line, interleaved_times, spread, sync,  # noqa: E402
                    warm_gpu)

VARIANTS = ("base", "pad8")


class PaddedConv(nn.Module):
    """A convolution whose input gets zero channels up to `channels`, with zero weights for
    them: every output is the same sum plus terms that are exactly 0."""

    def __init__(self, conv: nn.Conv2d, channels: int):
        super().__init__()
        if conv.groups != 1 or channels < conv.in_channels:
            raise ValueError(f"cannot pad a conv of {conv.in_channels} input channels "
                             f"(groups={conv.groups}) to {channels}")
        w = conv.weight
        self.conv = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride,
                              conv.padding, conv.dilation, bias=conv.bias is not None,
                              device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :conv.in_channels] = w
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            self.conv.to(memory_format=torch.channels_last)
        self.conv.requires_grad_(w.requires_grad)

    def forward(self, x):
        n, c, h, w = x.shape
        fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
               and not x.is_contiguous() else torch.contiguous_format)
        padded = torch.empty((n, self.conv.in_channels, h, w), dtype=x.dtype, device=x.device,
                             memory_format=fmt)
        padded[:, :c] = x
        padded[:, c:] = 0  # each element written once
        return self.conv(padded)


def pad_first_conv(model: nn.Module, channels: int = 8) -> nn.Module:
    """Replace the model's first 3-channel convolution by a PaddedConv (in place)."""
    name = next((n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
    if name is None:
        raise ValueError("the model has no convolution with 3 input channels")
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, PaddedConv(model.get_submodule(name), channels))
    return model


def build(net, precision, variant, state, device):
    m = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False, precision=precision,
                         channels_last=True)
    m.load_state_dict(state)
    m = m.to(device).eval()
    return pad_first_conv(m) if variant == "pad8" else m


def forward_step(model, x0, x1):
    def step():
        with torch.no_grad():
            return model(x0, x1)
    return step


def profiled_events(step, device, iters: int):
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True, with_flops=True) as prof:
        for _ in range(iters):
            step()
        sync(device)
    return prof.events()


def _subtree(event):
    yield event
    for child in event.cpu_children:
        yield from _subtree(child)


def units(events, cuda: bool):
    """(name, microseconds, owner op id) of each timed unit: the device's kernels, copies and
    memsets, each with the id of the CPU op that launched it (0: none found), or on a CPU each
    op's self time."""
    cpu_ops = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    if not cuda:
        return [(e.name, e.self_cpu_time_total, e.id) for e in cpu_ops
                if e.self_cpu_time_total > 0]
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    if device and hasattr(device[0], "linked_correlation_id"):
        # every device event, also one whose launch no CPU op claims (it still took time)
        return [(e.name, e.time_range.elapsed_us(), e.linked_correlation_id) for e in device]
    return [(k.name, k.duration, e.id) for e in cpu_ops for k in e.kernels]  # older torch


def kernel_table(events, cuda: bool, iters: int):
    """Rows {name, calls, us, flops} per unit name, and the conv ops' totals. A conv op's
    FLOPs (torch.profiler's count for aten::conv2d) go to its main kernel."""
    found = units(events, cuda)
    by_owner = {}
    for i, (_, _, owner) in enumerate(found):
        by_owner.setdefault(owner, []).append(i)
    flops_of = [0] * len(found)
    names = {e.id: e.name for e in events}
    conv = {"flops": 0, "us": 0.0, "ops": 0}
    for e in events:
        if e.name != "aten::conv2d" or not e.flops or any(
                a.name == "aten::conv2d" for a in _ancestors(e)):
            continue
        mine = [i for d in _subtree(e) for i in by_owner.get(d.id, [])]
        conv["flops"] += e.flops
        conv["ops"] += 1
        conv["us"] += sum(found[i][1] for i in mine)
        # the main kernel: the longest one the convolution itself launched (not autocast's
        # casts or the bias add, which other ops under conv2d launch)
        main_ones = [i for i in mine if "convolution" in names[found[i][2]]] or mine
        if main_ones:
            flops_of[max(main_ones, key=lambda i: found[i][1])] += e.flops
    rows = {}
    for (name, us, _), flops in zip(found, flops_of):
        r = rows.setdefault(name, {"name": name, "calls": 0, "us": 0.0, "flops": 0})
        r["calls"] += 1
        r["us"] += us
        r["flops"] += flops
    total = sum(r["us"] for r in rows.values())
    ranked = sorted(rows.values(), key=lambda r: -r["us"])
    for r in ranked:
        r.update(calls=r["calls"] / iters, ms=r["us"] / iters / 1e3,
                 share=r["us"] / total if total else 0.0, gflop=r["flops"] / iters / 1e9)
    conv.update(ms=conv["us"] / iters / 1e3, gflop=conv["flops"] / iters / 1e9,
                share=conv["us"] / total if total else 0.0)
    return ranked, conv, total / iters / 1e3


def _ancestors(event):
    p = event.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def _name(text: str, width: int = 110) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


def render_kernels(title, ranked, conv, total_ms, peak, top, counted_gflop, cuda: bool):
    rate = f", {conv['gflop'] / conv['ms']:.3g} TFLOP/s over their time" if conv["ms"] else ""
    lines = [f"### {title}", "",
             f"{total_ms:.3f} ms of {'kernel' if cuda else 'CPU op'} time per forward; the "
             f"convolution ops (with their bias adds and layout copies): {conv['ms']:.3f} ms = "
             f"{100 * conv['share']:.1f}%, {conv['gflop']:.4g} GFLOP per forward as profiled "
             f"(counted from the layer shapes: {counted_gflop:.4g}){rate}.", "",
             f"| {'kernel' if cuda else 'op'} | calls | ms | % of total | GFLOP | TFLOP/s | "
             "% of peak |", "|---|---|---|---|---|---|---|"]
    for r in ranked[:top]:
        rate = r["gflop"] / r["ms"] if r["gflop"] and r["ms"] else None
        lines.append(f"| {_name(r['name'])} | {r['calls']:.0f} | {r['ms']:.3f} | "
                     f"{100 * r['share']:.1f}% | " +
                     (f"{r['gflop']:.4g} | {rate:.3g} | " if rate else "| | ") +
                     (f"{100 * rate * 1e12 / peak:.1f}% |" if rate and peak else "|"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--net", default="vgg", choices=sorted(lpips_fast.backbones.NETS))
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--n", type=int, default=1, help="images per input")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                   choices=["fp32", "bf16", "fp16"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark=True for the whole run")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="least number of timed rounds")
    p.add_argument("--iters", type=int, default=3, help="forwards per profile")
    p.add_argument("--top", type=int, default=12, help="kernels per table")
    p.add_argument("--limits", dest="peaks", type=limits.limits_arg, default=None,
                   help=limits.LIMITS_HELP)
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    a = p.parse_args(argv)
    if min(a.size, a.n, a.iters, a.top) < 1 or min(a.warmup, a.repeats) < 0:
        p.error("--size, --n, --iters, --top must be >= 1, --warmup, --repeats >= 0")
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    env = environment(device)
    peaks = a.peaks or (limits.device_limits(env["device"]) if device.type == "cuda" else None)

    torch.manual_seed(0)
    state = lpips_fast.LPIPS(net=a.net, pnet_rand=True, verbose=False).state_dict()
    gen = torch.Generator().manual_seed(1)
    x0, x1 = [(torch.rand(a.n, 3, a.size, a.size, generator=gen) * 2 - 1).to(device)
              for _ in range(2)]
    steps = {(pr, v): forward_step(build(a.net, pr, v, state, device), x0, x1)
             for pr in a.precisions for v in a.variants}
    warm_gpu(device)
    times = interleaved_times({f"{pr} {v}": s for (pr, v), s in steps.items()}, device,
                              warmup=a.warmup, rounds=a.repeats, min_time=0.0)
    what = (f"{a.net}, N={a.n}, {a.size}x{a.size}, fwd, channels_last, "
            f"cudnn.benchmark={a.cudnn_benchmark}")
    parts = [f"## Kernel profile: {what}", "", environment_line(env), "",
             f"Times: {a.warmup} warm-up calls each, then at least {a.repeats} rounds, each "
             "running every variant once in a shuffled order; % of limit as in bench.py "
             "(benchmarks/limits.py); " + (
                 "peaks used: " + ", ".join(f"{k} {v:g}" for k, v in peaks.items()) +
                 " (TFLOP/s, HBM TB/s)" if peaks else "no peak numbers for this device") +
             ".", "",
             "| variant | median ms | IQR ms | vs base | % of limit |", "|---|---|---|---|---|"]
    stats = {k: spread(v) for k, v in times.items()}
    counted = 2 * a.n * limits.conv_flops(a.net, a.size)
    for (pr, v) in steps:
        s, base = stats[f"{pr} {v}"], stats.get(f"{pr} base")
        flops, nbytes = limits.case_work(a.net, a.n, a.size, False, pr)
        lim = limits.limit_seconds(flops, nbytes, peaks, pr)
        parts.append(f"| {pr} {v} | {s['ms']:.3f} | {s['q1_ms']:.3f}-{s['q3_ms']:.3f} | " +
                     (f"{base['ms'] / s['ms']:.3f}x" if base else "-") + " | " +
                     (f"{100 * lim * 1e3 / s['ms']:.3g}%" if lim else "n/a") + " |")
    parts.append("")
    report = {"env": env, "times": stats, "profiles": {}}
    for (pr, v), step in steps.items():
        ranked, conv, total_ms = kernel_table(profiled_events(step, device, a.iters),
                                              device.type == "cuda", a.iters)
        peak = limits.peak_flops(peaks, pr) if peaks else None
        report["profiles"][f"{pr} {v}"] = {"kernels": ranked, "conv": conv,
                                           "total_ms": total_ms, "counted_gflop": counted / 1e9}
        cuda = device.type == "cuda"
        parts.append(render_kernels(f"{pr}, {v}: top {'kernels' if cuda else 'ops'} per forward",
                                    ranked, conv, total_ms, peak, a.top, counted / 1e9, cuda))
    text = "\n".join(parts)
    print(text, flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
    return report


if __name__ == "__main__":
    main()
