"""Opt-in CUDA-graph replay of a fixed-shape LPIPS call, for training loops.

At training sizes (e.g. alex, 32 images of 64x64) one LPIPS forward + backward is dozens of
small kernels, and the CPU time to launch them is a large part of the step. A CUDA graph
records the launches once and replays them with one call:

    loss_fn = lpips_fast.LPIPS(net="alex").cuda()
    graphed = lpips_fast.cuda_graphed(loss_fn, fake_example, real_example)
    for ...:
        loss = graphed(fake, real).mean()   # same shapes, dtypes and requires_grad as the examples
        loss.backward()

Forward and backward are captured (torch.cuda.make_graphed_callables) when an example input
requires grad; otherwise only the forward is, under no_grad. Rules of CUDA graphs apply: the
shapes, dtypes, device and requires_grad flags are fixed (a mismatch raises), the returned
tensor is overwritten by the next call (clone it to keep it), and the model must not change
between calls (its weights are read in place, so in-place updates are seen).
"""
from __future__ import annotations

import torch
from torch import nn


class _Call(nn.Module):
    """model(in0, in1, normalize=...) as a module with tensor-only arguments."""

    def __init__(self, model: nn.Module, normalize: bool):
        super().__init__()
        self.model, self.normalize = model, normalize

    def forward(self, in0, in1):
        return self.model(in0, in1, normalize=self.normalize)


def _signature(x: torch.Tensor):
    return tuple(x.shape), x.dtype, x.device, x.requires_grad


def cuda_graphed(model: nn.Module, in0: torch.Tensor, in1: torch.Tensor, normalize: bool = False,
                 warmup: int = 3):
    """A callable f(in0, in1) that replays CUDA graphs of model(in0, in1) for inputs shaped like
    the examples (which are also run `warmup` times on a side stream before capture)."""
    for name, x in (("in0", in0), ("in1", in1)):
        if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
            raise ValueError(f"cuda_graphed: {name} must be a CUDA tensor, got "
                             f"{getattr(x, 'device', type(x).__name__)}")
    if getattr(model, "_dropout_active", lambda: False)():  # lpips_fast.LPIPS's own rule
        raise ValueError("cuda_graphed: the model is in train mode with dropout on trainable lin "
                         "layers; a graph would replay one dropout mask. Call model.eval().")
    call = _Call(model, normalize)
    expected = (_signature(in0), _signature(in1))
    if in0.requires_grad or in1.requires_grad:
        run = torch.cuda.make_graphed_callables(call, (in0, in1), num_warmup_iters=warmup)
    else:
        run = _forward_graph(call, in0, in1, warmup)

    def graphed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        got = (_signature(a), _signature(b))
        if got != expected:
            raise ValueError(f"cuda_graphed: inputs {got} differ from the captured "
                             f"(shape, dtype, device, requires_grad) {expected}")
        return run(a, b)

    return graphed


def _forward_graph(call: nn.Module, in0: torch.Tensor, in1: torch.Tensor, warmup: int):
    """Capture call(in0, in1) under no_grad; replays copy the inputs into the static buffers."""
    static0, static1 = in0.clone(), in1.clone()
    stream = torch.cuda.Stream(device=in0.device)
    stream.wait_stream(torch.cuda.current_stream(in0.device))
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(warmup):  # cuDNN/cuBLAS handles and workspaces exist before capture
            call(static0, static1)
    torch.cuda.current_stream(in0.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = call(static0, static1)

    def run(a, b):
        static0.copy_(a)
        static1.copy_(b)
        graph.replay()
        return out

    return run
