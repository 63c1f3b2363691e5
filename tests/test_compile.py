"""torch.compile(model, fullgraph=True): the whole LPIPS module traces with no graph break.

fullgraph=True makes any graph break an error, so these tests fail if an op, the streaming
generator or the head selection stops being traceable. aot_eager checks tracing, fake
kernels and autograd registration quickly; one inductor run checks real code generation.
Compiled and eager results run the same kernels, so they agree to float32 rounding of
reordered backbone ops (1e-6 relative); 1e-5 leaves a margin.
"""
import pytest
import torch

import lpips_fast
from helpers import IMPLS, randomize_lins


def setup(impl, spatial=False, seed=0):
    torch.manual_seed(seed)
    model = randomize_lins(lpips_fast.LPIPS(pnet_rand=True, verbose=False, impl=impl,
                                            spatial=spatial))
    gen = torch.Generator().manual_seed(seed)
    x0, x1 = (torch.rand(2, 3, 64, 72, generator=gen) * 2 - 1 for _ in range(2))
    return model, x0, x1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("spatial", [False, True])
def test_fullgraph_forward_and_backward(impl, spatial):
    torch._dynamo.reset()
    model, x0, x1 = setup(impl, spatial)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x0, x1), model(x0, x1), rtol=1e-5, atol=1e-7)
    grads = []
    for fn in (compiled, model):
        x = x0.clone().requires_grad_(True)
        fn(x, x1).sum().backward()
        grads.append(x.grad)
    # Element-wise relative error is meaningless for near-zero gradient entries (the spatial
    # map's upsampling backward sums in another order when decomposed): compare to the scale.
    err, scale = (grads[0] - grads[1]).abs().max(), grads[1].abs().max()
    assert scale > 0 and err <= 1e-5 * scale, (err, scale)


@pytest.mark.slow
def test_inductor_fused():
    """Real code generation around the head op (fused when built) with inductor."""
    torch._dynamo.reset()
    model, x0, x1 = setup("auto")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x0, x1), model(x0, x1), rtol=1e-5, atol=1e-7)
