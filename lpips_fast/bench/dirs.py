"""Scoring a data set end to end: pairs per second from image files to a CSV.

Each case (net, size, format, pair count) generates its pairs once (seeded smooth random
fields with edges and noise, the second image a blurred copy, JPEG quality 90 or PNG), then
times whole processes, the start-up included, as a user meets them: `lpips-fast dirs A B -o
out.csv` with its default options (and any --variant), a plain loop with the official `lpips`
(Pillow, lpips.im2tensor, one pair per call, a CSV row each: plain_loops.py), and the same loop
with torchmetrics and pyiqa where installed (a note says which are not). The processes take
turns round by round in a freshly shuffled order (seeded), so a noisy neighbour spreads over
all of them; reported: the median seconds with min-max, pairs/s from the median, the ratio to
the official loop, and the largest difference of each CSV's values to lpips-fast's.

Then, in this process, the split of one pair's time in lpips-fast dirs' own steps: decode
(Pillow), convert (into the batch tensor), transfer (to the device), forward (a batch of
--batch-size pairs, per pair) and write (the CSV row), and the official loop's.

    lpips-fast bench dirs                                  # the default cases, 3 rounds
    lpips-fast bench dirs --cases alex:512x384:jpg:96 --rounds 5
    lpips-fast bench dirs --variant workers0="--workers 0" --variant w1="--workers 1"
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lpips_fast

from ..cli_args import _auto_or_positive
from .common import environment, environment_line

PROG = "lpips-fast bench dirs"
LOOPS = Path(__file__).with_name("plain_loops.py")
OURS, OFFICIAL = "lpips-fast dirs", "official loop"
OTHERS = {"torchmetrics": "torchmetrics loop", "pyiqa": "pyiqa loop"}
CPU_CASES = ["alex:512x384:jpg:48", "alex:512x384:png:24", "vgg:512x384:jpg:12",
             "alex:1920x1080:jpg:6"]
GPU_CASES = ["alex:512x384:jpg:1000", "alex:512x384:png:500", "vgg:512x384:jpg:500",
             "alex:1920x1080:jpg:200"]


def parse_case(text: str):
    """'alex:512x384:jpg:48' -> (net, (H, W), format, pairs)."""
    try:
        net, size, fmt, n = text.split(":")
        w, h = (int(v) for v in size.split("x"))
        n = int(n)
        if fmt not in ("jpg", "png") or min(w, h, n) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a case is NET:WxH:jpg|png:PAIRS, e.g. alex:512x384:jpg:48, got {text!r}") from None
    lpips_fast.backbones.canonical(net)
    return net, (h, w), fmt, n


def _field(rng, h, w):
    """A smooth random field with detail at three scales and mild noise, uint8 H x W x 3: a
    JPEG of it costs about what a photo of that size costs to decode."""
    from PIL import Image
    acc = np.zeros((h, w, 3), np.float32)
    for s in (4, 16, 64):
        small = (rng.random((s, max(2, s * w // h), 3)) * 255).astype(np.uint8)
        acc += np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC),
                          np.float32) / s ** 0.5
    acc = acc / acc.max() * 235 + rng.normal(0, 4, acc.shape)
    return np.clip(acc, 0, 255).astype(np.uint8)


def generate(root: Path, n: int, size, fmt: str, seed: int = 0) -> tuple[Path, Path]:
    """n pairs of H x W images in root/A and root/B (same names), reference and blurred."""
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(seed)
    a, b = root / "A", root / "B"
    if b.is_dir() and len(os.listdir(b)) == n:  # made by an earlier case
        return a, b
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(exist_ok=True)
    opts = {"quality": 90} if fmt == "jpg" else {}
    for i in range(n):
        img = Image.fromarray(_field(rng, *size))
        img.save(a / f"{i:05d}.{fmt}", **opts)
        img.filter(ImageFilter.GaussianBlur(1 + i % 3)).save(b / f"{i:05d}.{fmt}", **opts)
    return a, b


def installed(package: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def commands(net, a, b, work: Path, device, variants: dict, notes: list) -> dict:
    """{name: (argv, csv path)} of the processes of one case."""
    env_py = [sys.executable]
    out = {}
    dev = [] if device is None else ["--device", device]
    for name, extra in {OURS: [], **variants}.items():
        csv_path = work / f"{len(out)}.csv"
        out[name] = ([*env_py, "-m", "lpips_fast", "dirs", str(a), str(b), "-o", str(csv_path),
                      "--net", net, "-q", "--summary", "-", *dev, *extra], csv_path)
    state = work / f"{net}.state.pt"
    if not state.exists():  # lpips_fast's weights, for the other packages' modules
        torch.save(lpips_fast.LPIPS(net=net, verbose=False).state_dict(), state)
    loops = {"official": OFFICIAL, **OTHERS}
    for kind, name in loops.items():
        package = "lpips" if kind == "official" else kind
        if not installed(package):
            note = f"{name}: not timed, {package} is not installed"
            if note not in notes:
                notes.append(note)
            continue
        csv_path = work / f"{len(out)}.csv"
        out[name] = ([*env_py, str(LOOPS), kind, net, str(state), str(a), str(b),
                      str(csv_path), device or _default_device()], csv_path)
    return out


def run_env() -> dict:
    """The processes import this lpips_fast (a checkout's, a wheel's), whatever the cwd."""
    root = str(Path(lpips_fast.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def timed_rounds(cmds: dict, rounds: int, seed: int = 0) -> dict:
    """{name: [seconds per round]}; each round runs every command once, shuffled order."""
    env = run_env()
    times: dict = {name: [] for name in cmds}
    order, rng = list(cmds), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            argv, _ = cmds[name]
            t0 = time.perf_counter()
            done = subprocess.run(argv, env=env, capture_output=True, text=True)
            times[name].append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed ({done.returncode}): "
                                   f"{shlex.join(argv)}\n{done.stderr[-2000:]}")
    return times


def read_values(path: Path) -> dict:
    with open(path, newline="") as f:
        return {row[0]: float(row[-1]) for row in list(csv.reader(f))[1:]}


def split(net, a: Path, b: Path, device, batch_size: int | str, reps: int = 3) -> dict:
    """Milliseconds of one pair's steps, in this process (medians of `reps`), for lpips-fast
    dirs' steps (its forward on a batch of `batch_size` pairs, "auto" as dirs chooses it) and
    the official loop's (when installed); "pairs": lpips-fast's batch."""
    from lpips_fast.folders import auto_pairs, score_batch
    from lpips_fast.io import image_size, pil_into, upright
    from PIL import Image
    device = torch.device(device)
    names = sorted(os.listdir(a))
    if batch_size == "auto":
        batch_size = auto_pairs(net, image_size(a / names[0]), device.type)
    names = names[:batch_size]
    n = len(names)
    paths = [p / name for name in names for p in (a, b)]
    model = lpips_fast.LPIPS(net=net, verbose=False).to(device)

    def decode():
        imgs = []
        for p in paths:
            with Image.open(p) as img:
                img.load()
                imgs.append(upright(img))
        return imgs
    imgs = decode()
    h, w = imgs[0].size[1], imgs[0].size[0]
    x = torch.empty(2 * n, 3, h, w).contiguous(memory_format=torch.channels_last)

    def convert():
        for k, img in enumerate(imgs):
            pil_into(img, x[(k % 2) * n + k // 2].permute(1, 2, 0).numpy())

    def transfer():
        y = x.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return y

    def forward():
        score_batch(model, device, (list(range(n)), x[:n], x[n:], [], []))

    def write():
        with tempfile.TemporaryFile("w") as f:
            for k in range(n):
                f.write(f"{names[k]},{0.123456789 + k:.8g}\n")
    steps = {"decode": decode, "convert": convert, "transfer": transfer, "forward": forward,
             "write": write}
    out = {OURS: {"pairs": n, **{k: _median_ms(f, reps) / n for k, f in steps.items()}}}
    if installed("lpips"):
        out[OFFICIAL] = _official_split(net, model.state_dict(), imgs, n, reps)
    return out


def _official_split(net, state, imgs, n, reps) -> dict:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lpips
        m = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    m.load_state_dict(state)
    arrays = [np.asarray(img.convert("RGB")) for img in imgs]
    xs = [lpips.im2tensor(arr) for arr in arrays]

    def convert():
        for arr in arrays:
            lpips.im2tensor(arr)

    def forward():
        with torch.no_grad():
            for k in range(n):
                m(xs[2 * k], xs[2 * k + 1]).item()
    return {"convert": _median_ms(convert, reps) / n, "forward": _median_ms(forward, reps) / n}


def _median_ms(fn, reps) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def case_rows(case, args, work: Path, notes: list) -> tuple[list, dict]:
    net, size, fmt, n = case
    a, b = generate(work / f"{fmt}-{size[1]}x{size[0]}-{n}", n, size, fmt)
    cmds = commands(net, a, b, work, args.device, dict(args.variant), notes)
    times = timed_rounds(cmds, args.rounds, args.seed)
    ours = read_values(cmds[OURS][1])
    base = statistics.median(times[OFFICIAL]) if OFFICIAL in times else None
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        vals = read_values(cmds[name][1])
        diff = max(abs(vals[k] - ours[k]) for k in ours) if set(vals) == set(ours) else None
        rows.append({"process": name, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                     "pairs_per_s": n / med, "vs_official": base / med if base else None,
                     "max_diff": diff})
    return rows, split(net, a, b, args.device or _default_device(), args.batch_size)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def markdown(results, notes, env, args) -> str:
    lines = [f"# lpips-fast dirs end to end ({env['device']})", "",
             environment_line(env), "",
             f"Whole processes, {args.rounds} interleaved rounds (median, min-max); command: "
             f"`{PROG} {' '.join(args.argv)}`".rstrip() + ".", "",
             "| case | process | median s (min-max) | pairs/s | vs official loop | "
             "max diff to lpips-fast |", "|---|---|---|---|---|---|"]
    for label, rows, _ in results:
        for r in rows:
            vs = f"{r['vs_official']:.2f}x" if r["vs_official"] else "—"
            diff = "—" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
            lines.append(f"| {label} | {r['process']} | {r['median_s']:.2f} ({r['min_s']:.2f}-"
                         f"{r['max_s']:.2f}) | {r['pairs_per_s']:.1f} | {vs} | {diff} |")
    lines += ["", "One pair's time in this process, ms per pair (forward: lpips-fast dirs on a "
              f"batch of `--batch-size {args.batch_size}` pairs, the loop one pair per call):",
              "", "| case | process | pairs per forward | decode | convert | transfer | forward "
              "| write |", "|---|---|---|---|---|---|---|---|"]
    for label, _, parts in results:
        for name, p in parts.items():
            cells = [str(p.get("pairs", 1))] + [
                f"{p[k]:.2f}" if k in p else "—"
                for k in ("decode", "convert", "transfer", "forward", "write")]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def decode_check(pairs, device, work: Path, quality: int = 90, net: str = "alex") -> list:
    """torchvision's decode_jpeg on `device` against Pillow's, on (reference, distorted) image
    files each saved as a JPEG of `quality`: per pair, the largest difference of one decoded
    value in 8-bit levels, the pair's LPIPS from Pillow's decode and how far torchvision's
    moves it. What --decoder torchvision changes on real images (nvJPEG on a GPU)."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    from lpips_fast.batches import to_unit_range
    from lpips_fast.io import read_image
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model = lpips_fast.LPIPS(net=net, verbose=False).to(device)
    rows = []
    for k, pair in enumerate(pairs):
        pil, tv = [], []
        for j, path in enumerate(pair):
            jpg = work / f"{k}-{j}.jpg"
            with Image.open(path) as img:
                img.convert("RGB").save(jpg, quality=quality)
            pil.append(torch.from_numpy(read_image(jpg)[0]).permute(2, 0, 1)[None].to(device))
            data = torch.frombuffer(bytearray(jpg.read_bytes()), dtype=torch.uint8)
            u8 = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            tv.append(to_unit_range(u8, torch.empty(u8.shape, device=device))[None])
        levels = max(float((a - b).abs().max()) * 127.5 for a, b in zip(pil, tv))
        with torch.inference_mode():
            d_pil, d_tv = float(model(*pil)), float(model(*tv))
        rows.append({"pair": Path(pair[0]).name, "size": tuple(pil[0].shape[2:]),
                     "max_levels": round(levels), "lpips": d_pil,
                     "lpips_diff": abs(d_tv - d_pil)})
    return rows


def decode_check_text(rows, device, quality) -> str:
    lines = [f"torchvision's decode_jpeg on {device} against Pillow's, the same JPEG files "
             f"(quality {quality}):", "",
             "| pair | H x W | max difference, 8-bit levels | LPIPS (Pillow) | LPIPS change |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['pair']} | {r['size'][0]} x {r['size'][1]} | {r['max_levels']} | "
              f"{r['lpips']:.6f} | {r['lpips_diff']:.1e} |" for r in rows]
    return "\n".join(lines) + "\n"


def _variant(text: str):
    name, sep, opts = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"a variant is NAME=\"OPTIONS\", got {text!r}")
    return name, shlex.split(opts)


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=parse_case, nargs="+", metavar="NET:WxH:FMT:PAIRS",
                   help=f"default on the CPU: {' '.join(CPU_CASES)}; on a GPU: "
                        f"{' '.join(GPU_CASES)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--device", help="lpips-fast dirs' --device (default: its own, auto)")
    p.add_argument("--variant", type=_variant, action="append", default=[],
                   metavar='NAME="OPTIONS"',
                   help="also time lpips-fast dirs with these options, e.g. "
                        'w0="--workers 0" (repeatable)')
    p.add_argument("--batch-size", type=_auto_or_positive, default="auto",
                   help="the forward's batch in the in-process split (default auto, as "
                        "dirs' default: lpips_fast.folders.auto_pairs)")
    p.add_argument("--seed", type=int, default=0, help="the rounds' order")
    p.add_argument("--work", type=Path, help="folder for the images and CSVs (default: a "
                                              "temporary one, removed)")
    p.add_argument("--out", type=Path, help="also write the table to this .md file")
    p.add_argument("--decode-check", nargs=2, type=Path, metavar=("DIR0", "DIR1"),
                   help="instead of timing: save the files of DIR0 and DIR1 paired by name as "
                        "JPEGs and compare torchvision's decode on --device with Pillow's "
                        "(what --decoder torchvision changes)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of --decode-check")
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.cases is None:
        args.cases = [parse_case(c) for c in
                      (GPU_CASES if _default_device() == "cuda" else CPU_CASES)]
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.decode_check:
        return _decode_check_main(args)
    env = environment(args.device or _default_device())
    notes: list = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        results = []
        for case in args.cases:
            net, (h, w), fmt, n = case
            label = f"{net} {w}x{h} {fmt.upper()}, {n} pairs"
            print(f"timing {label} ...", file=sys.stderr, flush=True)
            rows, parts = case_rows(case, args, work, notes)
            results.append((label, rows, parts))
            for r in rows:  # as it goes: a long run cut short still said what it measured
                print(f"  {r['process']}: {r['median_s']:.2f} s ({r['min_s']:.2f}-"
                      f"{r['max_s']:.2f}), {r['pairs_per_s']:.1f} pairs/s", file=sys.stderr,
                      flush=True)
    text = markdown(results, notes, env, args)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return results


def _decode_check_main(args):
    d0, d1 = args.decode_check
    names = sorted(set(os.listdir(d0)) & set(os.listdir(d1)))
    if not names:
        raise SystemExit(f"error: no file names in common between {d0} and {d1}")
    device = args.device or _default_device()
    with tempfile.TemporaryDirectory() as tmp:
        rows = decode_check([(d0 / n, d1 / n) for n in names], device, Path(tmp), args.quality)
    text = decode_check_text(rows, device, args.quality)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    main()
