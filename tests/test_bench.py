"""benchmarks/bench.py, its timing helper, its work counts and benchmarks/profile_kernels.py,
on the CPU with the tiniest cases (no timing is asserted: only what the numbers are made of)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import common  # noqa: E402
import limits  # noqa: E402
import profile_kernels  # noqa: E402

import lpips_fast  # noqa: E402
from lpips_fast import _ops  # noqa: E402
from lpips_fast.backbones import NETS  # noqa: E402

needs_ext = pytest.mark.skipif(not _ops.available(), reason="extension not built")
PEAKS = "tf32=1,bf16=2,fp16=2,fp32=0.5,hbm=0.01"  # TFLOP/s, TB/s: made-up, any device's


def _listing(folder: Path):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_rounds_run_every_function_once_in_shuffled_orders():
    log = []
    fns = {k: (lambda k=k: log.append(k)) for k in "abcd"}
    times = common.interleaved_times(fns, "cpu", warmup=2, rounds=12, min_time=0.0)
    assert log[:8] == ["a", "a", "b", "b", "c", "c", "d", "d"]  # warm-up first, in order
    rounds = [log[8 + 4 * r: 12 + 4 * r] for r in range(12)]
    assert len(log) == 8 + 4 * 12 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order
    assert all(len(t) == 12 and min(t) >= 0 for t in times.values())


def test_spread_is_median_quartiles_and_extremes():
    s = common.spread([0.004, 0.001, 0.003, 0.002, 0.010])
    assert (s["min_ms"], s["q1_ms"], s["ms"], s["q3_ms"], s["max_ms"]) == pytest.approx(
        (1, 2, 3, 4, 10))


def test_default_out_is_outside_the_shipped_results():
    args = bench.parse_args(["--device", "cpu"])
    assert args.out == Path("bench-results") and not args.out.is_absolute()


@pytest.mark.parametrize("bad, message", [
    ("tf32=1,bf16=2", "missing"), ("tf32=x,bf16=2,fp16=2,fp32=1,hbm=1", "number"),
    ("tf32=0,bf16=2,fp16=2,fp32=1,hbm=1", "positive"), ("gpu=3", "keys")])
def test_bad_limits_name_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        limits.parse_limits(bad)


def test_device_table_knows_the_h200_and_not_the_cpu():
    assert limits.device_limits("NVIDIA H200")["hbm"] == 4.8
    assert limits.device_limits("NVIDIA H100 80GB HBM3")["hbm"] == 3.35
    assert limits.device_limits("Intel(R) Xeon(R) Processor") is None


@needs_ext
def test_bench_main_writes_its_tables_only_to_out(tmp_path, monkeypatch):
    # Compiling every model takes minutes on this machine: torch.compile is replaced by the
    # identity, which keeps the compiled rows' plumbing (names, ratios, interleaving) under
    # test; what compiling does is tests/test_compile.py's job.
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    monkeypatch.chdir(tmp_path)  # a default --out would land here, not in the repository
    shipped = ROOT / "benchmarks" / "results"
    before = _listing(shipped)
    out = tmp_path / "out"
    bench.main(["--device", "cpu", "--quick", "--cases", "alex:1:64:fwd", "--warmup", "1",
                "--repeats", "3", "--min-time", "0", "--precisions", "bf16",
                "--limits", PEAKS, "--out", str(out)])
    assert _listing(shipped) == before
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    result = json.loads(next(out.glob("*.json")).read_text())
    meta, (case,) = result["meta"], result["cases"]
    for key in ("torch", "torchvision", "lpips", "lpips_fast", "commit", "cuda", "cudnn", "date"):
        assert meta[key], key
    rows = case["rows"]
    assert list(rows) == ["official", "official+compile", "lpips_fast",
                          "lpips_fast fused-backbone", "lpips_fast bf16", "lpips_fast+compile"]
    flops, fp32_bytes = limits.case_work("alex", 1, 64, False)
    assert case["gflop"] == flops / 1e9
    for name, row in rows.items():
        assert row["rounds"] == rows["official"]["rounds"] >= 3  # round by round, all alike
        assert row["min_ms"] <= row["q1_ms"] <= row["ms"] <= row["q3_ms"] <= row["max_ms"]
        # the limit, recomputed from the peaks given: FLOPs at the precision's tensor-core
        # rate (TF32 for fp32), bytes at the HBM rate, the larger of the two
        rate = 2e12 if name.endswith("bf16") else 1e12
        assert row["limit_ms"] == pytest.approx(1e3 * max(flops / rate, row["min_bytes"] / 1e10))
        assert row["pct_of_limit"] == pytest.approx(100 * row["limit_ms"] / row["ms"])
        assert row["vs_official"] == pytest.approx(rows["official"]["ms"] / row["ms"])
    assert rows["lpips_fast"]["min_bytes"] == fp32_bytes > rows["lpips_fast bf16"]["min_bytes"]
    text = next(out.glob("*.md")).read_text()
    assert "% of limit" in text and f"torch {torch.__version__}" in text


@pytest.mark.parametrize("net, size", [("alex", 64), ("vgg", 32), ("squeeze", 48)])
def test_flop_count_matches_torchs_flop_counter(net, size):
    """limits.case_work's count against FlopCounterMode on the real model, forward and a
    training step (gradient w.r.t. in0): the convolutions are the only ops it counts."""
    model = lpips_fast.LPIPS(net=net, pnet_rand=True, verbose=False)
    gen = torch.Generator().manual_seed(0)
    x0, x1 = (torch.rand(2, 3, size, size, generator=gen) * 2 - 1 for _ in range(2))
    with FlopCounterMode(display=False) as fwd, torch.no_grad():
        model(x0, x1)
    x = x0.clone().requires_grad_()
    with FlopCounterMode(display=False) as train:
        model(x, x1).sum().backward()
    assert fwd.get_total_flops() == limits.case_work(net, 2, size, False)[0]
    assert train.get_total_flops() == limits.case_work(net, 2, size, True)[0]


def test_padded_conv_is_the_same_function():
    """Zero channels add exact zeros; only the summation order may differ, so the outputs
    agree within twice the worst-case float32 error of a sum of K + 1 terms (K = 3 * 11 * 11
    products and the bias): 2 * gamma_{K+1} * sum |terms|."""
    gen = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 16, 11, stride=4, padding=2)
    x = torch.randn(2, 3, 37, 41, generator=gen)
    for channels_last in (False, True):
        if channels_last:
            conv = conv.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        padded = profile_kernels.PaddedConv(conv, 8)
        assert padded.conv.weight[:, 3:].abs().sum() == 0
        with torch.no_grad():
            a, b = conv(x), padded(x)
            terms = F.conv2d(x.double().abs(), conv.weight.double().abs(),
                             conv.bias.double().abs(), stride=4, padding=2)
        k = 3 * 11 * 11 + 1
        u = torch.finfo(torch.float32).eps / 2
        assert ((a - b).abs().double() <= 2 * k * u / (1 - k * u) * terms).all()


@needs_ext
def test_padded_first_conv_leaves_lpips_unchanged():
    """The whole model in float64 with the first conv padded to 8 channels: 5 layers of sums
    of at most 3456 terms bound the difference by ~5 * 3456 * 1.1e-16 = 2e-12 relative,
    far below 1e-9; a misplaced weight or nonzero padding changes values at O(1)."""
    model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False).double().eval()
    padded = profile_kernels.pad_first_conv(copy.deepcopy(model))
    assert padded.net.slice1[0].conv.in_channels == 8
    gen = torch.Generator().manual_seed(4)
    x0, x1 = (torch.rand(3, 3, 64, 64, generator=gen, dtype=torch.float64) * 2 - 1
              for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(padded(x0, x1), model(x0, x1), rtol=1e-9, atol=0)


@needs_ext
def test_profile_kernels_runs_on_the_cpu(tmp_path):
    out = tmp_path / "profile.md"
    report = profile_kernels.main(["--device", "cpu", "--net", "alex", "--size", "64",
                                   "--iters", "2", "--repeats", "1", "--warmup", "1",
                                   "--out", str(out)])
    counted = 2 * limits.conv_flops("alex", 64) / 1e9
    _, cin, cout, k, stride, pad = NETS["alex"][0][0]
    side = (64 + 2 * pad - k) // stride + 1
    extra = 2 * 2 * (8 - cin) * k * k * cout * side * side / 1e9  # pad8's zero channels, 2 images
    for precision in ("fp32", "bf16"):
        base, pad8 = (report["profiles"][f"{precision} {v}"] for v in ("base", "pad8"))
        assert base["conv"]["gflop"] == pytest.approx(counted, rel=1e-12)
        assert pad8["conv"]["gflop"] == pytest.approx(counted + extra, rel=1e-12)
        for prof in (base, pad8):
            shares = [r["share"] for r in prof["kernels"]]
            assert sum(shares) == pytest.approx(1) and shares == sorted(shares, reverse=True)
            assert sum(r["gflop"] for r in prof["kernels"]) == pytest.approx(
                prof["conv"]["gflop"])  # every conv's FLOPs went to one of its units
    text = out.read_text()
    assert "| op | calls | ms | % of total | GFLOP | TFLOP/s | % of peak |" in text


@needs_ext
def test_backbone_overhead_reports_the_time_per_call(monkeypatch):
    """bench_backbone.py --overhead: each variant (eager, fused, fused+pool; fwd, fwd+bwd)
    runs `calls` calls per timed round, and the table gives a round's time over `calls`."""
    import bench_backbone
    calls_per_round, given = {}, {}

    def rounds_of(fns, device, warmup, rounds, max_rounds):
        for i, (key, fn) in enumerate(fns.items()):
            calls_per_round[key] = len(fn())  # (a round: the list of its calls' outputs)
            given[key] = (i + 1) * 1e-5 * calls_per_round[key]  # (i + 1) * 10 us per call
        return {key: [t] * rounds for key, t in given.items()}
    monkeypatch.setattr(bench_backbone, "interleaved_times", rounds_of)
    table = bench_backbone.overhead("cpu", rounds=3, calls=4)
    assert set(calls_per_round.values()) == {4} and len(calls_per_round) == 6
    rows = {line.split(" | ")[0][2:]: line for line in table if line.startswith("| ") and
            "variant" not in line}
    assert list(rows) == ["eager", "fused", "fused+pool"]
    for impl, line in rows.items():
        for kind in ("fwd", "fwdbwd"):
            per_call = given[(impl, kind)] / 4 * 1e6
            assert f"{per_call:.1f} [{per_call:.1f}, {per_call:.1f}]" in line


def _event(id, name, device="cpu", us=0.0, owner=0, flops=None, parent=None):
    from types import SimpleNamespace
    from torch.autograd import DeviceType
    e = SimpleNamespace(id=id, name=name, is_async=False, flops=flops, cpu_children=[],
                        cpu_parent=parent, kernels=[], linked_correlation_id=owner,
                        device_type=DeviceType.CUDA if device == "cuda" else DeviceType.CPU,
                        time_range=SimpleNamespace(elapsed_us=lambda: us),
                        self_cpu_time_total=0.0)
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def test_kernel_table_gives_a_convs_flops_to_its_own_kernel():
    """The CUDA path without a GPU: device events owned by the ops that launched them. The
    bias add under conv2d takes longer than the conv kernel here, and must not get the FLOPs;
    a copy that no op claims still counts in the total."""
    conv = _event(1, "aten::conv2d", flops=6e9)
    cudnn = _event(2, "aten::cudnn_convolution", parent=conv)
    add = _event(3, "aten::add_", parent=conv)
    events = [conv, cudnn, add,
              _event(10, "sm90_xmma_fprop_implicit_gemm", "cuda", 1000.0, owner=2),
              _event(11, "vectorized_elementwise_kernel<add>", "cuda", 1500.0, owner=3),
              _event(12, "Memcpy DtoD", "cuda", 500.0, owner=0)]
    ranked, totals, total_ms = profile_kernels.kernel_table(events, cuda=True, iters=2)
    assert total_ms == pytest.approx(1.5)  # 3000 us over 2 iterations
    assert [r["name"] for r in ranked] == ["vectorized_elementwise_kernel<add>",
                                           "sm90_xmma_fprop_implicit_gemm", "Memcpy DtoD"]
    fprop = ranked[1]
    assert fprop["gflop"] == pytest.approx(3.0) and fprop["ms"] == pytest.approx(0.5)
    assert ranked[0]["gflop"] == 0 and ranked[2]["share"] == pytest.approx(1 / 6)
    assert totals["ms"] == pytest.approx(1.25) and totals["gflop"] == pytest.approx(3.0)


@pytest.mark.parametrize("case, message", [("vgg:1:x:fwd", "NET:N:SIZE"),
                                           ("vgg:0:64:fwd", "NET:N:SIZE"),
                                           ("vgg:1:64:back", "NET:N:SIZE"),
                                           ("vgx:1:64:fwd", "net must be one of")])
def test_a_bad_case_is_a_one_line_error(case, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--cases", case])
    assert message in capsys.readouterr().err


# --- benchmarks/bench_dirs.py (lpips-fast bench dirs) ---------------------------------------------

def test_bench_dirs_times_whole_processes_and_compares_their_values(tmp_path):
    import bench_dirs
    results = bench_dirs.main(["--cases", "alex:96x64:jpg:3", "--rounds", "1", "--batch-size",
                               "2", "--variant", "w0=--workers 0", "--work", str(tmp_path),
                               "--out", str(tmp_path / "t.md")])
    (label, rows, parts), = results
    names = [r["process"] for r in rows]
    assert names[:3] == [bench_dirs.OURS, "w0", bench_dirs.OFFICIAL]
    assert ("torchmetrics loop" in names) == bench_dirs.installed("torchmetrics")
    for r in rows:  # each wrote all 3 rows, the same values to the CSV's rounding (1e-6)
        assert r["median_s"] > 0 and r["pairs_per_s"] == pytest.approx(3 / r["median_s"])
        assert r["max_diff"] is not None and r["max_diff"] <= 2e-6, r
    official = next(r for r in rows if r["process"] == bench_dirs.OFFICIAL)
    assert official["vs_official"] == 1 and official["max_diff"] > 0  # a real comparison
    ours = parts[bench_dirs.OURS]
    assert set(ours) == {"pairs", "decode", "convert", "transfer", "forward", "write"}
    assert ours["pairs"] == 2 and all(v >= 0 for v in ours.values())  # --batch-size 2
    text = (tmp_path / "t.md").read_text()
    assert "| alex 96x64 JPG, 3 pairs | w0 |" in text
    assert f"| alex 96x64 JPG, 3 pairs | {bench_dirs.OURS} | 2 |" in text
    assert ("pyiqa loop: not timed" in text) != bench_dirs.installed("pyiqa")


def test_bench_dirs_split_takes_dirs_auto_batch(tmp_path, monkeypatch):
    from lpips_fast import folders
    from lpips_fast.bench.dirs import OURS, generate, split
    from lpips_fast.tiling import bytes_per_pixel
    a, b = generate(tmp_path, 3, (64, 96), "png")  # (h, w)
    # a budget of 2.5 pairs of these images: auto takes 2 of the 3 pairs
    monkeypatch.setitem(folders.BATCH_BYTES, "cpu", 2.5 * 1.5 * bytes_per_pixel("alex", 4, 2)
                        * 64 * 96)
    assert split("alex", a, b, "cpu", "auto", reps=1)[OURS]["pairs"] == 2


def test_bench_dirs_case_errors_name_the_form():
    import bench_dirs
    for bad in ("alex:96x64:gif:3", "alex:96:jpg:3", "alex:96x64:jpg:0", "alex:96x64:jpg"):
        with pytest.raises(SystemExit):
            bench_dirs.parse_args(["--cases", bad])
    assert bench_dirs.parse_case("vgg:1920x1080:png:5") == ("vgg", (1080, 1920), "png", 5)


@needs_ext
def test_bench_backbone_head_table(tmp_path):
    """bench_backbone.py --head on the CPU: a row per tap no pool follows (alex relu3-5,
    vgg relu5_3), the tap's bytes E from its shape, the three variants timed."""
    import bench_backbone
    assert [layer[0] for layer in bench_backbone.head_layers("alex", 64)] == [6, 8, 10]
    assert [layer[0] for layer in bench_backbone.head_layers("vgg", 32)] == [28]
    out = tmp_path / "head.md"
    bench_backbone.main(["--device", "cpu", "--head", "--reps", "1", "--out", str(out)])
    rows = [r.split(" | ") for r in out.read_text().splitlines() if r.startswith("| alex")
            or r.startswith("| vgg")]
    assert [r[1] for r in rows] == ["features.6", "features.8", "features.10", "features.28"]
    # alex 64: relu3-5 at 3x3 (384, 256, 256 channels), vgg 32: relu5_3 at 2x2, float32
    assert [r[2] for r in rows] == ["2x384x3x3", "2x256x3x3", "2x256x3x3", "2x512x2x2"]
    assert [float(r[3]) for r in rows] == pytest.approx(  # (3 digits printed)
        [2 * c * hw * 4 / 1e6 for c, hw in ((384, 9), (256, 9), (256, 9), (512, 4))], rel=2e-3)
    assert all(float(r[k]) > 0 for r in rows for k in (6, 7, 8))
