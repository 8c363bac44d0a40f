"""The AdamW rule (the adamw arm and every hybrid's fallback) against torch.optim.AdamW."""
import pytest
import torch

from torchstep.optim import AdamW


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_rule_matches_torch_adamw_to_the_last_bits(wd):
    # same operations in the same order; only √(1−β2ᵗ) is math.sqrt here and `** 0.5` in torch, which can
    # differ in the last bit — so equal to ~1e-15 relative in float64, not bitwise
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in [(7, 5), (5,)]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = AdamW(ours, lr=1e-2, weight_decay=wd)
    b = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=wd, foreach=False)
    for _ in range(60):
        for p, q in zip(ours, theirs):
            gr = torch.randn(p.shape, generator=g, dtype=torch.float64)
            p.grad, q.grad = gr.clone(), gr.clone()
        a.step(), b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"], rtol=0, atol=0)
