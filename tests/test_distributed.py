"""Sharded runs across processes: two gloo ranks on loopback write the single process's file.

The worker below runs `lpips_fast.distributed.distributed_pairwise` (built on `run_sharded`)
on 10 random 64x64 images with a random-weight alex (fixed seeds), blocks of 3 rows, so rank 0
computes row blocks 0 and 2 and rank 1 blocks 1 and 3. Both runs use one thread per process
(as torchrun sets by default), so every block is the same computation in both.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import free_port
from lpips_fast.distributed import ShardError, run_sharded, shard

WORKER = textwrap.dedent("""
    import sys
    import torch
    import lpips_fast
    from lpips_fast import distributed
    from lpips_fast.pairwise import PairwisePlan, pairwise

    mode, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = lpips_fast.LPIPS(net="alex", pnet_rand=True, verbose=False, impl="reference")
    x = torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    if mode == "fail":  # row block 3 (rank 1's second chunk) raises
        rows = PairwisePlan.rows
        def failing(self, i):
            if i == 3:
                raise ValueError("injected failure in row block 3")
            return rows(self, i)
        PairwisePlan.rows = failing
    ctx = distributed.setup()
    try:
        D = distributed.distributed_pairwise(x, csv_path=out, model=model, block=3,
                                             batch_size=2, ctx=ctx)
        if ctx.is_main:
            torch.save(D, out + ".pt")
        if not ctx.distributed:  # the plain API, same blocks: bit-identical values
            assert torch.equal(D, pairwise(x, model=model, block=3, batch_size=2))
    finally:
        distributed.teardown(ctx)
""")


def run(tmp_path, nproc, mode, out):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="")
    if nproc == 1:
        cmd = [sys.executable, str(script), mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), mode, str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def test_two_gloo_ranks_write_the_single_process_csv(tmp_path):
    one = run(tmp_path, 1, "ok", tmp_path / "one.csv")
    assert one.returncode == 0, one.stderr
    two = run(tmp_path, 2, "ok", tmp_path / "two.csv")
    assert two.returncode == 0, two.stderr
    a, b = (tmp_path / "one.csv").read_bytes(), (tmp_path / "two.csv").read_bytes()
    assert a == b
    lines = a.decode().splitlines()
    assert len(lines) == 11 and lines[0] == "row," + ",".join(map(str, range(10)))
    assert [ln.split(",")[0] for ln in lines[1:]] == [str(i) for i in range(10)]
    D1, D2 = torch.load(str(tmp_path / "one.csv") + ".pt"), torch.load(str(tmp_path / "two.csv") + ".pt")
    assert torch.equal(D1, D2) and D1.shape == (10, 10) and (D1 > 0).sum() == 90

    # A failing rank: the run exits non-zero naming it, and the rows of the chunks before the
    # failure (row blocks 0, 1 and rank 0's block 2 of the same round) are on disk.
    bad = run(tmp_path, 2, "fail", tmp_path / "bad.csv")
    assert bad.returncode != 0
    # rank 0 names the failed rank (rank 1 itself says "rank 1 stops: ...")
    assert "ShardError: rank 1 of 2 failed on chunk 3" in bad.stderr, bad.stderr[-3000:]
    assert "injected failure in row block 3" in bad.stderr
    kept = (tmp_path / "bad.csv").read_bytes().decode().splitlines()
    assert kept == lines[:1 + 9]


def test_run_sharded_single_process_order_and_failure():
    written = []
    n = run_sharded(range(7), lambda items: [i * i for i in items],
                    lambda c, items, res: written.append((c, items, res)), chunk=3)
    assert n == 3 and written == [(0, [0, 1, 2], [0, 1, 4]), (1, [3, 4, 5], [9, 16, 25]),
                                  (2, [6], [36])]
    written.clear()

    def compute(items):
        if 4 in items:
            raise KeyError("no such image")
        return items

    with pytest.raises(ShardError, match=r"rank 0 of 1 failed on chunk 2 \(items 4 .. 5\).*"
                                         r"KeyError: 'no such image'") as info:
        run_sharded(range(8), compute, lambda c, items, res: written.append(c), chunk=2)
    assert written == [0, 1] and info.value.rank == 0 and info.value.items == [4, 5]


def test_shard():
    items = list(range(10))
    assert shard(items, 1, 3) == [1, 4, 7]
    assert shard(items, 0, 3, "contiguous") == [0, 1, 2]
    assert shard(items, 2, 3, "contiguous") == [6, 7, 8, 9]
    assert sorted(sum((shard(items, r, 4, "contiguous") for r in range(4)), [])) == items
    with pytest.raises(ValueError, match="strided"):
        shard(items, 0, 2, "random")
