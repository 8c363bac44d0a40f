"""``ops.materialise``: the identity in eager; under torch.compile the coefficient is computed once, before
the loop that consumes it, instead of inside it (Inductor's C++, CPU)."""
import torch
from torch._inductor.utils import run_and_get_code

from torchstep.ops.materialise import materialise


def test_identity_in_eager():
    t = torch.randn(3)
    assert materialise(t) is t


def _scaled(x, y, use):
    norm = x.square().sum().sqrt() + 1e-8      # a per-tensor coefficient from a reduction
    return y / (materialise(norm) if use else norm)


def _compiled(x, y, use):
    torch._dynamo.reset()
    out, (code,) = run_and_get_code(torch.compile(lambda a, b: _scaled(a, b, use), fullgraph=True), x, y)
    kernel = code[code.index('extern "C"'):]
    # where the scalar sqrt sits relative to the loop over y's elements
    return out, kernel.index("std::sqrt") < kernel.index("x0<static_cast<int64_t>(4096L)")


def test_coefficient_leaves_the_update_loop():
    x, y = torch.randn(64), torch.randn(4096)
    (on, before_loop), (off, inlined_before) = _compiled(x, y, True), _compiled(x, y, False)
    assert before_loop              # computed once, then read as a number by the loop
    assert not inlined_before       # without it: recomputed inside the loop, for every vector of y
    assert torch.equal(on, off)     # the values do not change
    torch.testing.assert_close(on, _scaled(x, y, False))   # (eager sums in another order: rounding only)
