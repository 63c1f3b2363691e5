"""Sharding work across the ranks of a torch.distributed launch (torchrun and friends).

    torchrun --nproc_per_node 4 my_script.py                     # one machine, 4 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \
             --rdzv_endpoint host0:29500 --rdzv_id job1 my_script.py  # two machines

`setup()` joins the launch's process group (nccl when the rank has a GPU, gloo otherwise; an
already initialized group is used as is) or, without a launch, is a single process.
`run_sharded(items, compute_fn, write_fn, chunk)` splits the items into chunks of `chunk`
consecutive items; chunk c runs on rank c % world_size (strided, so every rank gets work early
and chunks finish roughly in order). After each round of world_size chunks, rank 0 gathers the
results and calls write_fn for them in chunk order, so one output is written, by rank 0 only,
with rows in the order of a single-process run, and rows are on disk as soon as their round
ends. If compute_fn raises on any rank, every rank learns it in the same round: rank 0 first
writes the chunks that precede the failed one, then all ranks raise `ShardError` naming the
failed rank, its items and its error (the process exits non-zero; rows written stay).

Results travel through a gloo group (CPU objects) even when the default group is nccl.
"""
from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist


class ShardError(RuntimeError):
    """A rank failed (or was lost) during `run_sharded`. Attributes: rank (None: lost contact),
    items (the failed chunk's), chunk (its index), error (the exception's one-line
    "Type: message", without the traceback)."""

    def __init__(self, message: str, rank: int | None = None, items=None,
                 chunk: int | None = None, error: str | None = None):
        super().__init__(message)
        self.rank, self.items, self.chunk, self.error = rank, items, chunk, error


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: Any = None          # group for object collectives (gloo); None = the default group
    owns_group: bool = False   # setup() initialized the default group (teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True inside a multi-process torch.distributed launch (torchrun's environment)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def setup(backend: str | None = None, device=None, timeout: timedelta = timedelta(minutes=30)
          ) -> Context:
    """Join the process group of the current launch, or return a single-process context.

    device: the rank's device; default cuda:LOCAL_RANK when CUDA is available, else the CPU.
    backend: default nccl for CUDA devices, gloo otherwise.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized():
        owns = False
    elif dist.is_available() and launched():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=timeout)
        owns = True
    else:
        return Context(device=device)
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo",
                                                                   timeout=timeout)
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, group, owns)


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence, rank: int, world_size: int, mode: str = "strided") -> list:
    """This rank's part of `items`: 'strided' (items rank, rank + W, ...) or 'contiguous'
    (one consecutive range; sizes differ by at most one)."""
    if mode == "strided":
        return list(items[rank::world_size])
    if mode == "contiguous":
        n = len(items)
        lo, hi = rank * n // world_size, (rank + 1) * n // world_size
        return list(items[lo:hi])
    raise ValueError(f"mode must be 'strided' or 'contiguous', got {mode!r}")


def run_sharded(items: Sequence, compute_fn: Callable[[list], Any],
                write_fn: Callable[[int, list, Any], None] | None = None, chunk: int = 1,
                ctx: Context | None = None) -> int:
    """Compute chunks of `items` across ranks; rank 0 writes them in order.

    compute_fn(chunk_items) -> result (picklable; move tensors to the CPU) runs on the rank that
    owns the chunk. write_fn(chunk_index, chunk_items, result) runs on rank 0 only, in chunk
    order. Chunk boundaries depend on `chunk` alone, not on the number of ranks, so a
    deterministic compute_fn gives the same output as a single-process run.
    Returns the number of chunks written (on rank 0; the number computed elsewhere).
    Raises ShardError on every rank when any rank's compute_fn (or rank 0's write_fn) raised.
    """
    own = ctx is None
    ctx = setup() if own else ctx
    try:
        return _run(list(items), compute_fn, write_fn, int(chunk), ctx)
    finally:
        if own:
            teardown(ctx)


def _run(items, compute_fn, write_fn, chunk, ctx: Context) -> int:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    W, R = ctx.world_size, ctx.rank
    done = 0
    for t in range(math.ceil(len(chunks) / W)):
        c = t * W + R
        if c < len(chunks):
            try:
                mine = ("ok", c, compute_fn(chunks[c]))
            except Exception as e:  # reported to rank 0, raised everywhere below
                mine = ("error", c, (f"{type(e).__name__}: {e}", traceback.format_exc()))
        else:
            mine = ("idle", c, None)
        gathered = [mine] if W == 1 else _gather(mine, ctx, t)
        failure = None
        if R == 0:
            for status, ci, payload in gathered:  # in chunk order: rank r holds t * W + r
                if status == "idle":
                    continue
                if status == "error":
                    rank = ci % W
                    first, last = chunks[ci][0], chunks[ci][-1]
                    failure = (f"rank {rank} of {W} failed on chunk {ci} (items {first!r} .. "
                               f"{last!r}); the {done} chunks before it were written. "
                               f"Its error: {payload[0]}\n{payload[1]}", rank, chunks[ci], ci,
                               payload[0])
                    break
                if write_fn is not None:
                    try:
                        write_fn(ci, chunks[ci], payload)
                    except Exception as e:
                        failure = (f"rank 0 failed writing chunk {ci}: {type(e).__name__}: {e}"
                                   f"\n{traceback.format_exc()}", 0, chunks[ci], ci,
                                   f"{type(e).__name__}: {e}")
                        break
                done += 1
        elif mine[0] == "ok":
            done += 1
        if W > 1:
            box = [failure]
            try:
                dist.broadcast_object_list(box, src=0, group=ctx.group)
            except Exception as e:
                raise ShardError(f"rank {R}: lost contact with rank 0 after round {t} "
                                 f"({type(e).__name__}: {e})", None) from e
            failure = box[0]
        if failure is not None:
            raise ShardError(failure[0] if R == 0 else f"rank {R} stops: {failure[0]}",
                             *failure[1:])
    return done


def _gather(mine, ctx: Context, t: int):
    out = [None] * ctx.world_size if ctx.rank == 0 else None
    try:
        dist.gather_object(mine, out, dst=0, group=ctx.group)
    except Exception as e:  # a rank died without reporting (killed, out of memory, ...)
        raise ShardError(f"rank {ctx.rank}: lost contact with another rank in round {t} "
                         f"(a rank died without reporting; see the launcher's log for which): "
                         f"{type(e).__name__}: {e}") from e
    return out


# --- an example on top: a pairwise matrix computed across ranks --------------------------------

def format_row(i: int, values, fmt: str = "{:.9g}") -> str:
    """One CSV line of a distance matrix: the row index, then the values (9 significant
    digits round-trip float32)."""
    return ",".join([str(i)] + [fmt.format(v) for v in values.tolist()]) + "\n"


def distributed_pairwise(x, y=None, csv_path=None, model=None, net="alex", version="0.1",
                         batch_size=32, block=None, normalize=False, ctx: Context | None = None,
                         max_memory="2GiB", spill_dir=None, return_matrix=True):
    """`lpips_fast.pairwise` with row blocks sharded across the ranks of a launch.

    Every rank embeds the column images once (M backbone passes per rank) and computes the
    Gram products of its row blocks (1 / world_size of them); rank 0 assembles the N x M matrix
    and, with csv_path, writes it as CSV ("row,0,1,...", then one line per image of x), each row
    block as soon as its round ends. Returns the matrix on rank 0 (None on the other ranks,
    and when return_matrix=False). Without a launch it is a single process: the same file,
    byte for byte, and the same values as `pairwise` (given equal thread settings).
    """
    from .pairwise import PairwisePlan
    own = ctx is None
    ctx = setup() if own else ctx
    try:
        # Built on every rank before any collective: input errors (sizes, model) are raised
        # identically everywhere. Embeddings are computed lazily, inside compute_fn, so their
        # errors are reported through run_sharded.
        plan = PairwisePlan(x, y, model, net, version, batch_size, block, normalize,
                            None if model is not None else ctx.device, max_memory, spill_dir)
        n_rows, block, n_blocks = plan.n, plan.block, plan.n_row_blocks

        def compute(blocks):
            return [plan.rows(i).to("cpu", plan.out_dtype) for i in blocks]

        out = {"matrix": None, "file": None}
        if ctx.is_main and csv_path is not None:
            out["file"] = open(csv_path, "w", newline="")

        def write(_c, blocks, rows_list):
            for i, rows in zip(blocks, rows_list):
                if out["matrix"] is None and return_matrix:
                    out["matrix"] = torch.empty(n_rows, rows.shape[1], dtype=rows.dtype)
                r0 = i * block
                if return_matrix:
                    out["matrix"][r0:r0 + rows.shape[0]] = rows
                f = out["file"]
                if f is not None:
                    if r0 == 0:
                        f.write(",".join(["row"] + [str(j) for j in range(rows.shape[1])])
                                + "\n")
                    f.writelines(format_row(r0 + k, r) for k, r in enumerate(rows))
                    f.flush()

        try:
            run_sharded(range(n_blocks), compute, write, chunk=1, ctx=ctx)
        finally:
            if out["file"] is not None:
                out["file"].close()
            plan.close()
        return out["matrix"] if ctx.is_main else None
    finally:
        if own:
            teardown(ctx)
