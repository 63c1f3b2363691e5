"""`lpips_fast.LPIPSMetric`: accumulation over batches, errors, devices, and two gloo ranks."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lpips_fast
from helpers import IMPLS, free_port, official_like, randomize_lins


def random_model(impl="reference", **kwargs):
    torch.manual_seed(0)
    return randomize_lins(lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, impl=impl,
                                           **kwargs))


def batches(sizes, seed=1, hw=64):
    """Pairs of random images in [-1, 1], one (img0, img1) per batch size; a size written as
    (n, 1) is n images against one (broadcast)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        n0, n1 = s if isinstance(s, tuple) else (s, s)
        out.append((torch.rand(n0, 3, hw, hw, generator=gen) * 2 - 1,
                    torch.rand(n1, 3, hw, hw, generator=gen) * 2 - 1))
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_reductions_over_uneven_batches_match_the_official_package(impl):
    model = random_model(impl)
    data = batches([3, 1, (4, 1), 2])
    theirs = official_like(model)
    with torch.no_grad():  # the official module on every pair at once (broadcasts expanded)
        expect = torch.cat([theirs(a, b.expand_as(a)).flatten() for a, b in data]).double()
    metrics = {r: lpips_fast.LPIPSMetric(model, reduction=r) for r in ("mean", "sum", "none")}
    for a, b in data:
        for m in metrics.values():
            m.update(a, b)
    got = {r: m.compute() for r, m in metrics.items()}
    assert all(v.dtype == torch.float64 for v in got.values())
    # float32 LPIPS against float32 LPIPS: the project's 1e-5 relative parity bound per pair,
    # and so for their sum and mean (all terms are positive).
    torch.testing.assert_close(got["none"], expect, rtol=1e-5, atol=1e-7)
    assert got["none"].shape == (10,)
    assert got["sum"].item() == pytest.approx(expect.sum().item(), rel=1e-5)
    assert got["mean"].item() == pytest.approx(expect.mean().item(), rel=1e-5)

    for m in metrics.values():  # reset: a fresh start, not an addition
        m.reset()
        m.update(*data[1])
    assert metrics["none"].compute().tolist() == [got["none"][3].item()]


def test_accumulation_is_float64():
    """The running sum is float64: equal to the exact sum of the float32 per-pair values (the
    same deterministic forward calls) to a few float64 ulps, which a float32 accumulator
    (~1e-7 relative) would miss."""
    model = random_model()
    data = batches([5, 2, 7, 1], seed=2)
    metric = lpips_fast.LPIPSMetric(model, reduction="sum")
    values = []
    for a, b in data:
        assert metric(a, b).item() == pytest.approx(math.fsum(
            model(a, b).flatten().tolist()), rel=1e-14)  # forward(): this batch's value
        with torch.no_grad():
            values += model(a, b).flatten().tolist()
    exact = math.fsum(values)
    assert metric.compute().item() == pytest.approx(exact, rel=1e-14, abs=0)
    mean = lpips_fast.LPIPSMetric(model)
    for a, b in data:
        mean.update(a, b)
    assert mean.compute().item() == pytest.approx(exact / len(values), rel=1e-14, abs=0)


def test_errors_are_clear():
    model = random_model()
    metric = lpips_fast.LPIPSMetric(model)
    with pytest.raises(RuntimeError, match=r"compute\(\) before any update"):
        metric.compute()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with pytest.raises(ValueError, match=r"img0 must be N x 3 x H x W \(RGB\) or N x 1 x H x W "
                                         r"\(grey\), got shape \(2, 4, 64, 64\)"):
        metric.update(torch.rand(2, 4, 64, 64), x)
    with pytest.raises(ValueError, match="img0 and img1 differ in size"):
        metric.update(x, torch.rand(2, 3, 64, 72))
    with pytest.raises(ValueError, match=r"batch sizes of img0 \(2\) and img1 \(3\)"):
        metric(x, torch.rand(3, 3, 64, 64))  # forward too, not only update
    with pytest.raises(RuntimeError, match="before any update"):  # failed updates add nothing
        metric.compute()
    metric.update(x, x.flip(0))
    metric.reset()
    with pytest.raises(RuntimeError, match="since construction or the last reset"):
        metric.compute()
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\)"):
        lpips_fast.LPIPSMetric(model, reduction="avg")
    with pytest.raises(ValueError, match="either a model or LPIPS arguments"):
        lpips_fast.LPIPSMetric(model, net="vgg")
    with pytest.raises(TypeError, match="must be an lpips_fast.LPIPS"):
        lpips_fast.LPIPSMetric(torch.nn.Identity())
    with pytest.raises(ValueError, match="spatial=False"):
        lpips_fast.LPIPSMetric(random_model(spatial=True))


def test_builds_its_model_from_lpips_arguments_and_stays_in_eval_mode():
    torch.manual_seed(0)
    metric = lpips_fast.LPIPSMetric(net="squeeze", version="0.0", pnet_rand=True,
                                    normalize=True, reduction="none")
    assert metric.model.pnet_type == "squeeze" and metric.model.version == "0.0"
    model = metric.model
    a, b = batches([3], seed=3)[0]
    a, b = (a + 1) / 2, (b + 1) / 2  # [0, 1] images, as normalize=True says
    metric.train()  # a parent's train() must not turn the lin layers' dropout on
    assert not model.training
    metric.update(a, b)
    metric.update(a, b)
    with torch.no_grad():
        expect = model(a, b, normalize=True).flatten().double()
    assert torch.equal(metric.compute(), torch.cat([expect, expect]))


def test_state_stays_float64_through_dtype_moves():
    metric = lpips_fast.LPIPSMetric(random_model())
    a, b = batches([2], seed=4)[0]
    metric.update(a, b)
    first = metric.compute()
    metric.double()  # the model goes float64; the accumulated float64 state is kept as is
    assert metric.model.lin0.weight.dtype == torch.float64
    metric.update(a.double(), b.double())
    with torch.no_grad():
        second = metric.model(a.double(), b.double()).mean()
    # float64 model against float32 model: the same pairs within float32 rounding
    assert second.item() == pytest.approx(first.item(), rel=1e-5)
    assert metric.compute().item() == pytest.approx((first.item() + second.item()) / 2,
                                                    rel=1e-14)
    metric.half()
    assert metric.compute().dtype == torch.float64
    assert metric.model.lin0.weight.dtype == torch.float16
    assert "_sum" not in metric.state_dict() and set(metric.state_dict()) == {
        "model." + k for k in metric.model.state_dict()}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_moves_with_the_model_to_cuda():
    model = random_model("auto")
    data = batches([3, 2], seed=5)
    cpu = lpips_fast.LPIPSMetric(model, reduction="none")
    for a, b in data:
        cpu.update(a, b)
    on_cpu = cpu.compute()
    cpu.cuda()  # the state moves with the model; updates continue there
    assert cpu.compute().device.type == "cuda"
    cuda = lpips_fast.LPIPSMetric(random_model("auto").cuda(), reduction="none")  # its model's
    for a, b in data:
        cuda.update(a.cuda(), b.cuda())
    got = cuda.compute()
    assert got.device.type == "cuda"
    # cuDNN against CPU convolutions, float32: 1e-5 relative per pair
    torch.testing.assert_close(got.cpu(), on_cpu, rtol=1e-5, atol=1e-7)
    cuda.cpu().update(*data[0])
    assert cuda.compute().device.type == "cpu" and cuda.compute().shape == (8,)


def test_torchmetrics_adapter_equals_the_metric():
    pytest.importorskip("torchmetrics")
    from lpips_fast.torchmetrics_adapter import LearnedPerceptualImagePatchSimilarity as TM
    model = random_model()
    data = batches([3, (2, 1), 4], seed=6)
    ours = {r: lpips_fast.LPIPSMetric(model, reduction=r) for r in ("mean", "sum", "none")}
    theirs = {r: TM(model=model, reduction=r) for r in ("mean", "sum", "none")}
    batch = theirs["mean"](*data[0])  # torchmetrics' forward: this batch's value, and update
    with torch.no_grad():
        assert batch.item() == pytest.approx(model(*data[0]).double().mean().item(), rel=1e-14)
    for i, (a, b) in enumerate(data):
        for r in ours:
            ours[r].update(a, b)
            if i or r != "mean":
                theirs[r].update(a, b)
    # the same float32 values added in the same order in float64: equal
    for r in ours:
        assert torch.equal(theirs[r].compute(), ours[r].compute())
    assert theirs["none"].compute().shape == (9,)
    assert theirs["mean"].compute().dtype == torch.float64
    theirs["sum"].reset()
    with pytest.raises(RuntimeError, match="before any update"), \
            pytest.warns(UserWarning, match="called before the ``update``"):  # torchmetrics'
        theirs["sum"].compute()
    theirs["sum"].train()
    assert not model.training
    with pytest.raises(ValueError, match="reduction must be one of"):
        TM(model=model, reduction="max")
    assert TM(model=model, reduction=None).reduction == "none"
    with pytest.raises(ValueError, match="img1 and img2 differ in size"):  # torchmetrics' names
        theirs["sum"].update(data[0][0], torch.rand(3, 3, 64, 72))


# --- two gloo ranks against one process ---------------------------------------------------------

WORKER = textwrap.dedent("""
    import sys
    import torch
    import lpips_fast
    from lpips_fast import distributed

    out = sys.argv[1]
    ctx = distributed.setup()
    torch.manual_seed(0)
    model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False)
    gen = torch.Generator().manual_seed(1)
    sizes = [3, 2, 4, 2]  # rank 0: the first two batches (5 pairs), rank 1: the rest (6)
    data = [(torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1,
             torch.rand(n, 3, 64, 64, generator=gen) * 2 - 1) for n in sizes]
    mine = data if ctx.world_size == 1 else data[2 * ctx.rank:2 * ctx.rank + 2]
    metrics = {r: lpips_fast.LPIPSMetric(model, reduction=r) for r in ("mean", "sum", "none")}
    lone = lpips_fast.LPIPSMetric(model, reduction="none")  # only rank 0 updates it
    for a, b in mine:
        for m in metrics.values():
            m.update(a, b)
    for a, b in data[:2] if ctx.rank == 0 else []:
        lone.update(a, b)
    result = {r: m.compute() for r, m in metrics.items()}
    result["lone"] = lone.compute()
    if ctx.world_size > 1:  # ranks of other reductions: every rank raises (no hang)
        mixed = lpips_fast.LPIPSMetric(model, reduction="none" if ctx.rank == 0 else "mean")
        mixed.update(*data[0])
        try:
            mixed.compute()
        except ValueError as e:
            result["mixed"] = str(e)
    result["local_count"] = int(metrics["sum"]._count)  # compute() leaves the local state
    torch.save(result, f"{out}.{ctx.rank}.pt")
    distributed.teardown(ctx)
""")


def run_worker(tmp_path, nproc, out):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")]))
    launch = [] if nproc == 1 else [
        "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    done = subprocess.run([sys.executable, *launch, str(script), str(out)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_over_the_union(tmp_path):
    run_worker(tmp_path, 1, tmp_path / "one")
    run_worker(tmp_path, 2, tmp_path / "two")
    one = torch.load(tmp_path / "one.0.pt")
    ranks = [torch.load(tmp_path / f"two.{r}.pt") for r in (0, 1)]
    assert one["none"].shape == (11,) and one["local_count"] == 11
    assert [r["local_count"] for r in ranks] == [5, 6]
    for two in ranks:  # every rank gets the whole result
        # The same batches give bit-identical per-pair values in both runs (one thread per
        # process), so 'none' is exact; sum and mean differ only by float64 summation order.
        assert torch.equal(two["none"], one["none"])  # 11 values: none dropped or doubled
        assert two["sum"].item() == pytest.approx(one["sum"].item(), rel=1e-13, abs=0)
        assert two["mean"].item() == pytest.approx(one["mean"].item(), rel=1e-13, abs=0)
        # A rank that updated nothing contributes nothing (gathered lengths 5 and 0).
        assert torch.equal(two["lone"], one["none"][:5])
        assert two["mixed"] == ("LPIPSMetric.compute(): the 2 ranks were built with other "
                                "reductions (1 'mean', 1 'none'): every rank must use the same")


def test_a_shared_model_switched_to_spatial_later_is_refused_not_miscounted():
    """A model given to the metric and later switched to spatial=True (its attribute, e.g. to
    draw a map with the same model) made update() add every map pixel as a pair: a wrong
    sum, count and mean without an error."""
    model = random_model()
    metric = lpips_fast.LPIPSMetric(model, reduction="sum")
    x0, x1 = batches([2], seed=4)[0]
    metric.update(x0, x1)
    model.spatial = True
    with pytest.raises(ValueError, match="spatial=False"):
        metric.update(x0, x1)
    with pytest.raises(ValueError, match="spatial=False"):
        metric(x0, x1)
    model.spatial = False
    assert int(metric._count) == 2  # the refused updates added nothing
