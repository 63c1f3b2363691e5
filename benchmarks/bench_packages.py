"""LPIPS packages side by side on the CPU: official lpips 0.1.4, lpips_fast, torchmetrics,
piq and pyiqa in one process, with the same weights (lpips_fast's, loaded into each package
and compared value by value) and the same image content.

    PYTHONPATH=. python benchmarks/bench_packages.py [--pairs DIR] [--reps 10]

Every input is made as u in [0, 1] on a grid where x = 2u - 1 is exact in float32 (random
inputs: multiples of 2^-16; images: k / 255); packages that take [-1, 1] get x, those that take
[0, 1] get u (see Adapter.takes), so after their own 2u - 1 they see the official input bits.
No package downloads anything: torch.hub's download functions raise while they are built.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata as md
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import lpips_fast  # noqa: E402
from common import commit, device_name, interleaved_times  # noqa: E402

PAIRS = Path(os.environ.get("LPIPS_FAST_REAL_PAIRS", ROOT.parent / "shared/data/real_pairs"))
# (N, size, forward+backward wrt the first image): the brief's alex cases; vgg for piq.
SPEED = {"alex": [(8, 64, True), (1, 512, False)], "vgg": [(2, 128, True), (1, 128, False)]}


@dataclass
class Adapter:
    name: str
    zero_one: bool      # takes u in [0, 1] (else x in [-1, 1])
    takes: str          # what it is given, how it was built offline
    score: Callable     # (a, b) -> per-pair distances, shape (N,)
    loss: Callable      # (a, b) -> scalar training loss (mean over pairs)
    tensors: dict       # official state_dict key -> the package's tensor


@contextlib.contextmanager
def patched(obj, attr, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


def no_download(*args, **kwargs):
    raise RuntimeError(f"download attempted: {args[:1]}")


def tv_no_weights(name):  # a torchvision constructor that ignores weights= / pretrained=
    build = getattr(torchvision.models, name)
    return lambda *args, **kwargs: build(weights=None)


def official(net, state, layout=torch.contiguous_format):
    import lpips
    m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    m.load_state_dict(state)
    m.to(memory_format=layout)  # channels_last only for the gradient note (lpips_fast's layout)

    def run(a, b):
        return m(a.contiguous(memory_format=layout), b.contiguous(memory_format=layout))
    name = "lpips (official)" + (", channels_last" if layout == torch.channels_last else "")
    return Adapter(name, False, "x in [-1,1]; LPIPS(pnet_rand=True) + load_state_dict",
                   lambda a, b: run(a, b).flatten(), lambda a, b: run(a, b).mean(),
                   m.state_dict())


def fast(net, state):
    m = lpips_fast.LPIPS(net=net, verbose=False).eval()
    m.load_state_dict(state)
    impl = "fused" if lpips_fast._ops.available() else "reference"
    return Adapter(f"lpips_fast ({impl})", False, "x in [-1,1]; LPIPS() (cache weights)",
                   lambda a, b: m(a, b).flatten(), lambda a, b: m(a, b).mean(), m.state_dict())


def tmetrics(net, state):
    from torchmetrics.functional.image import lpips as tm
    from torchmetrics.image import LearnedPerceptualImagePatchSimilarity
    get = tm._get_tv_model_features
    with patched(tm, "_get_tv_model_features", lambda name, pretrained=False: get(name, False)):
        m = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none")
    m.net.load_state_dict({k: v for k, v in state.items() if not k.startswith("scaling")})

    def score(a, b):  # the Metric's forward (update + this batch's value), state reset
        m.reset()
        return m(a, b).reshape(-1)
    buffers = {f"scaling_layer.{k}": v for k, v in m.net.scaling_layer.named_buffers()}
    return Adapter("torchmetrics", False, "x in [-1,1] (normalize=False); torchvision "
                   "features built with weights=None, then load_state_dict", score,
                   lambda a, b: score(a, b).mean(), dict(m.net.state_dict(), **buffers))


def piq_(net, state):
    if net != "vgg":
        raise NotImplementedError("piq.LPIPS has a VGG16 backbone only")
    import piq
    import piq.perceptual
    lin = [state[f"lin{i}.model.1.weight"].clone() for i in range(5)]
    with patched(piq.perceptual, "vgg16", tv_no_weights("vgg16")), \
            patched(torch.hub, "load_state_dict_from_url", lambda *a, **k: lin):
        m = piq.LPIPS(reduction="none")
    short = {k.split(".", 2)[2]: k for k in state if k.startswith("net.")}  # 'net.slice1.0.x'
    m.model.load_state_dict({s: state[k] for s, k in short.items()})
    tensors = {k: m.model.state_dict()[s] for s, k in short.items()}
    tensors.update({f"lin{i}.model.1.weight": w for i, w in enumerate(m.weights)})
    return Adapter("piq", True, "u in [0,1]: it standardizes (u - ImageNet mean) / std, the "
                   "official scaling layer's map with other constants; vgg16 with weights=None"
                   ", lin weights handed to its hub call", m, lambda a, b: m(a, b).mean(),
                   tensors)


def pyiqa_(net, state):
    import pyiqa
    name = {"alex": "lpips", "vgg": "lpips-vgg"}[net]
    with patched(torchvision.models, "alexnet", tv_no_weights("alexnet")), \
            patched(torchvision.models, "vgg16", tv_no_weights("vgg16")):
        m = pyiqa.create_metric(name, device="cpu", pretrained=False)
        loss_m = pyiqa.create_metric(name, device="cpu", pretrained=False, as_loss=True)
    assert m.lower_better and loss_m.lower_better, "pyiqa's lpips would be a similarity"
    for x in (m, loss_m):
        x.net.load_state_dict(state)
    return Adapter("pyiqa", True, f"u in [0,1] (net computes 2u-1); create_metric('{name}', "
                   "pretrained=False), as_loss=True for the loss; lower_better, so a distance"
                   " as upstream", lambda a, b: m(a, b).flatten(), loss_m,
                   loss_m.net.state_dict())


def build(net):
    """The packages that run for `net`, each checked to hold lpips_fast's weights, and notes."""
    ref = lpips_fast.LPIPS(net=net, verbose=False).state_dict()  # real weights, official keys
    adapters, notes = [], []
    with patched(torch.hub, "load_state_dict_from_url", no_download), \
            patched(torch.hub, "download_url_to_file", no_download):
        for make in (official, fast, tmetrics, piq_, pyiqa_):
            try:
                a = make(net, ref)
            except Exception as e:  # noqa: BLE001 - reported; the others still run
                notes.append(f"{make.__name__.strip('_')}, {net}: not run ({e})")
                continue
            same = [k for k in ref if not k.startswith("lins.") and k in a.tensors]
            bad = [k for k in same if not torch.equal(a.tensors[k], ref[k])]
            lost = [k for k in ref if not k.startswith(("lins.", "scaling")) and k not in same]
            if bad or lost:
                raise SystemExit(f"{a.name}: weights differ {bad}, missing {lost}")
            notes.append(f"{a.name}, {net}: {len(same)} weight tensors equal to lpips_fast's"
                         f" (torch.equal); given {a.takes}")
            adapters.append(a)
    return adapters, notes, ref


def load_u(path):  # 1 x 3 x H x W, values k / 255
    from PIL import Image
    rgb = np.asarray(Image.open(path).convert("RGB")).copy()
    return torch.from_numpy(rgb).permute(2, 0, 1)[None] / 255.0


def real_pairs(root: Path):
    pairs = [(root / "lpips_examples/ex_ref.png", root / f"lpips_examples/ex_p{i}.png")
             for i in (0, 1)]
    pairs += [(p, root / "tid2013/dist" / p.name) for p in sorted(root.glob("tid2013/ref/*"))]
    return [(load_u(a), load_u(b)) for a, b in pairs if a.is_file() and b.is_file()]


def random_u(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2**16 + 1, (n, 3, size, size), generator=g) / 2.0**16
            for _ in range(2)]


def inputs(a, u0, u1):
    return (u0, u1) if a.zero_one else (2 * u0 - 1, 2 * u1 - 1)


def values(adapters, pairs):
    """(max abs, max relative) difference of each package's distances to the first's."""
    with torch.no_grad():
        got = {a.name: torch.cat([a.score(*inputs(a, *p)).double() for p in pairs])
               for a in adapters}
    ref = got[adapters[0].name]
    return {k: ((v - ref).abs().max().item(), ((v - ref).abs() / ref).max().item())
            for k, v in got.items()}


def gradients(adapters, u0, u1):
    """Max abs difference of d(mean loss)/dx (the first image, in [-1, 1] units) to the
    first package's, relative to the largest entry of that gradient."""
    got = {}
    for a in adapters:
        x0, x1 = inputs(a, u0, u1)
        x0 = x0.clone().requires_grad_(True)
        a.loss(x0, x1).backward()
        got[a.name] = x0.grad.double() / (2 if a.zero_one else 1)  # dL/dx = dL/du / 2
    ref = got[adapters[0].name]
    return {k: (v - ref).abs().max().item() / ref.abs().max().item() for k, v in got.items()}


def cpu_seconds():
    """(busy seconds of all CPUs, this process's CPU seconds), from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def others_share(start, wall):
    """Share of all CPUs that other processes kept busy since `start` (cpu_seconds())."""
    (busy0, own0), (busy1, own1) = start, cpu_seconds()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * os.cpu_count())


def wait_quiet(limit, timeout):
    """Wait up to `timeout` s until other processes use under `limit` of the CPUs (2 s)."""
    end = time.time() + timeout
    while True:
        start, t0 = cpu_seconds(), time.perf_counter()
        time.sleep(2)
        share = others_share(start, time.perf_counter() - t0)
        if share < limit or time.time() > end:
            return share


def speed(adapters, n, size, backward, reps):
    """Median seconds per package: 2 warm-ups each, then `reps` rounds of one timed call per
    package in a shuffled order (common.interleaved_times), so that load from other processes
    falls on all of them alike."""
    u0, u1 = random_u(n, size, seed=1)
    steps = {}
    for a in adapters:
        x0, x1 = inputs(a, u0, u1)
        if backward:  # the training loss: the gradient wrt the first image
            x0 = x0.clone().requires_grad_(True)
            steps[a.name] = lambda a=a, x0=x0, x1=x1: a.loss(x0, x1).backward()
        else:
            steps[a.name] = lambda a=a, x0=x0, x1=x1: a.score(x0, x1)
    with torch.set_grad_enabled(backward):
        times = interleaved_times(steps, "cpu", warmup=2, rounds=reps, min_time=0.0,
                                  max_rounds=reps)
    return {k: median(v) for k, v in times.items()}


def table(head, rows):
    return [f"| {' | '.join(head)} |", "|---" * len(head) + "|"] + \
        [f"| {' | '.join(r)} |" for r in rows]


def run_net(net, pairs, args, notes):
    """The markdown sections of one net: values and gradients, then speed."""
    adapters, n, ref = build(net)
    notes += n
    sets = {"random N=8 64x64": [random_u(8, 64, 0)], "random 1x256x256": [random_u(1, 256, 2)]}
    if pairs:
        sets = {f"{len(pairs)} real pairs": pairs, **sets}
    vals = {k: values(adapters, v) for k, v in sets.items()}
    grad = gradients(adapters, *sets["random N=8 64x64"][0])
    layout = gradients([adapters[0], official(net, ref, torch.channels_last)],
                       *sets["random N=8 64x64"][0])
    notes.append(f"{net}: the official module itself, run channels_last (lpips_fast's backbone "
                 f"layout), moves its gradient by {max(layout.values()):.1e} (same measure)")
    out = [f"\n## {net}: values (max abs / max rel)\n"] + table(
        ["package", *vals, "gradient, random N=8 64x64"],
        [[a.name] + [f"{v[a.name][0]:.1e} / {v[a.name][1]:.1e}" for v in vals.values()]
         + [f"{grad[a.name]:.1e}"] for a in adapters])
    cases, shares = {}, []
    for n, size, backward in SPEED[net]:
        before = wait_quiet(args.quiet, args.wait)
        start, t0 = cpu_seconds(), time.perf_counter()
        cases[f"N={n}, {size}x{size}, {'fwd+bwd' if backward else 'fwd (no grad)'}"] = \
            speed(adapters, n, size, backward, args.reps)
        shares.append(f"{before:.0%} / {others_share(start, time.perf_counter() - t0):.0%}")
    base = adapters[0].name
    return out + [f"\n## {net}: speed, ms (ratio to official)\n"] + table(
        ["package", *cases],
        [[a.name] + [f"{t[a.name] * 1e3:.1f} ({t[base] / t[a.name]:.2f}x)"
                     for t in cases.values()] for a in adapters]
        + [["CPU share of other processes, before / during", *shares]])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=Path, default=PAIRS, help="real pairs folder (real_pairs)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per package (>= 10)")
    p.add_argument("--quiet", type=float, default=0.1, help="before each speed case, wait "
                   "until other processes use less than this share of the CPUs ...")
    p.add_argument("--wait", type=float, default=300, help="... for at most this many s")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/packages-cpu.md")
    args = p.parse_args()
    vers = ", ".join(f"{k} {md.version(k)}" for k in
                     ("torch", "torchvision", "lpips", "torchmetrics", "piq", "pyiqa"))
    command = " ".join(["PYTHONPATH=. python benchmarks/bench_packages.py", *sys.argv[1:]])
    out = [f"# LPIPS packages side by side, CPU: {device_name('cpu')}\n",
           f"{torch.get_num_threads()} threads (torch.get_num_threads), {vers}, lpips_fast at "
           f"{commit()}, {datetime.date.today()}, fp32. Command: `{command}`\n",
           "Values: max abs / max relative difference of the per-pair distances to the "
           "official package (same weights, same image content); gradient: max abs difference"
           " of d(mean loss)/d(first image) over the largest official entry. Speed: medians of"
           f" {args.reps} timed calls per package (time.perf_counter) after 2 warm-ups, the "
           "packages taking turns call by call; ratio = official time / package time (> 1: "
           "faster than the official package)."]
    pairs = real_pairs(args.pairs) if args.pairs.is_dir() else []
    notes = [] if pairs else [f"real pairs absent under {args.pairs}: skipped"]
    for net in ("alex", "vgg"):
        section = run_net(net, pairs, args, notes)
        print("\n".join(section), flush=True)
        out += section
    notes += ["piq.LPIPS is VGG16 only (its constructor hard-codes vgg16 and its lin weights),"
              " so it is absent from the alex tables.",
              "torchmetrics and pyiqa copy the official code (same ops plus input range checks;"
              " torchmetrics puts eps=1e-8 inside the sqrt, the official code 1e-10 outside): "
              "their spread around 1.00x shows the timing noise.",
              "Read timings only where other processes' CPU share was low: on a shared machine,"
              " busy neighbours slow every package several-fold, the many-op official code "
              "(and its copies) more than lpips_fast."]
    out += ["\n## Notes\n"] + [f"- {n}" for n in notes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(out) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
