"""Property tests for torchstep.objectives surrogates / aggregation (rl_objectives.md §6, tests 5, 6, 7, 10)."""
import math

import pytest
import torch

from helpers import length_mask

from torchstep.objectives.aggregate import AGGREGATION_MODES, aggregate, gtpo_conflict_token_weights
from torchstep.objectives.surrogates import (
    cispo_loss, gspo_loss, gspo_sequence_ratio, k3_kl, ppo_clip_loss, two_sided_clip_loss)

LENGTHS = [2, 7, 3, 6, 1, 5]          # unequal lengths
GROUPS = [0, 0, 1, 1, 2, 2]
SPLITS = [(0, 2), (2, 3), (3, 6)]     # unequal micro-batches (2, 1, 3 sequences)
T = max(LENGTHS)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = length_mask(LENGTHS, T)
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    w = mask * (0.5 + torch.rand(B, T, generator=g, dtype=torch.float64))  # mask × token weights
    return loss, w, mask


def _norm(mode, w, B):
    return {"token-mean": float((w != 0).sum()), "seq-mean-token-mean": B, "seq-mean-token-sum": B,
            "seq-mean-token-sum-norm": B, "luspo": B, "group-mean-token-mean": 3}[mode]


def _kw(mode, sl=slice(None)):
    kw = {}
    if mode == "seq-mean-token-sum-norm":
        kw["max_len"] = T
    if mode == "group-mean-token-mean":
        kw["group_ids"] = torch.tensor(GROUPS)[sl]
    return kw


INVARIANT = sorted(m for m in AGGREGATION_MODES if m != "trl-bnpo")


@pytest.mark.parametrize("mode", INVARIANT)
def test_microbatch_invariance_padded(mode):
    loss, w, _ = _batch()
    B = loss.shape[0]
    Z = _norm(mode, w, B)
    full = aggregate(loss, w, mode, Z, **_kw(mode))
    splits = SPLITS if mode != "group-mean-token-mean" else [(0, 2), (2, 6)]  # whole groups per micro-batch
    parts = [aggregate(loss[a:b], w[a:b], mode, Z, **_kw(mode, slice(a, b))) for a, b in splits]
    assert abs(sum(parts) - full) < 1e-6
    # naive: local normaliser per micro-batch, then ÷ K — differs for unequal micro-batches
    naive = 0.0
    for a, b in splits:
        lw = w[a:b]
        zl = {"token-mean": float((lw != 0).sum()), "group-mean-token-mean": len(set(GROUPS[a:b]))}.get(mode, b - a)
        naive += aggregate(loss[a:b], lw, mode, zl, **_kw(mode, slice(a, b))) / len(splits)
    assert abs(naive - full) > 1e-3


@pytest.mark.parametrize("mode", INVARIANT)
def test_flat_layout_matches_padded(mode):
    loss, w, mask = _batch(1)
    B = loss.shape[0]
    Z = _norm(mode, w, B)
    sel = mask.bool()
    seq_ids = torch.arange(B).unsqueeze(1).expand(B, T)[sel]
    padded = aggregate(loss, w, mode, Z, **_kw(mode))
    kw = _kw(mode)
    if mode in {"seq-mean-token-mean", "seq-mean-token-sum", "group-mean-token-mean", "luspo"}:
        kw.update(seq_ids=seq_ids, num_seqs=B)
    flat = aggregate(loss[sel], w[sel], mode, Z, **kw)
    assert abs(flat - padded) < 1e-9


def test_trl_bnpo_is_local_and_not_invariant():
    loss, w, _ = _batch()
    full = aggregate(loss, w, "trl-bnpo")
    assert torch.allclose(full, (loss * w).sum() / w.sum())
    parts = sum(aggregate(loss[a:b], w[a:b], "trl-bnpo") for a, b in SPLITS)
    assert abs(parts / len(SPLITS) - full) > 1e-3
    with pytest.raises(ValueError):
        aggregate(loss, w, "trl-bnpo", 5)


def test_token_mean_tensor_normalizer_and_formula():
    loss, w, _ = _batch()
    n = (w != 0).sum()
    assert torch.allclose(aggregate(loss, w, "token-mean", n), (loss * w).sum() / n)
    # Dr.GRPO C = B · max_len (TRL) vs C = loss_scale_factor (verl)
    B = loss.shape[0]
    a = aggregate(loss, w, "seq-mean-token-sum-norm", B, max_len=T)
    b = aggregate(loss, w, "seq-mean-token-sum-norm", B * T)
    assert torch.allclose(a, b) and torch.allclose(a, (loss * w).sum() / (B * T))


def _grad_per_token(mode, normalizer, **kw):
    lengths = [2, 6]
    mask = torch.zeros(2, 6, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logp = torch.full((2, 6), -1.0, dtype=torch.float64, requires_grad=True)
    out = ppo_clip_loss(logp, logp.detach(), torch.tensor([1.0, 1.0], dtype=torch.float64))
    aggregate(out.loss, mask, mode, normalizer, **kw).backward()
    return logp.grad, mask.bool()


def test_drgrpo_equal_per_token_gradient_grpo_not():
    g, m = _grad_per_token("seq-mean-token-sum-norm", 2, max_len=6)
    vals = g[m]
    assert torch.equal(vals, torch.full_like(vals, vals[0].item())) and vals[0] != 0
    assert torch.all(g[~m] == 0)
    g2, m2 = _grad_per_token("seq-mean-token-mean", 2)
    assert g2[0, 0].abs() > g2[1, 0].abs()  # short-sequence tokens weigh more under GRPO


def _clip_grad(ratio, adv, eps_low, eps_high):
    logp = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    out = ppo_clip_loss(logp, torch.zeros(1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                        eps_low, eps_high)
    out.loss.sum().backward()
    return logp.grad.item(), out


def test_clip_higher_gating():
    g, out = _clip_grad(1.25, 1.0, 0.2, 0.2)
    assert g == 0.0 and out.clipped_high.item() and not out.clipped_low.item()
    g, out = _clip_grad(1.25, 1.0, 0.2, 0.28)
    assert g != 0.0 and not out.clipped_high.item()
    g, out = _clip_grad(1.3, 1.0, 0.2, 0.28)
    assert g == 0.0 and out.clipped_high.item()
    # negative advantage: lower clip binds, upper never does
    g, out = _clip_grad(0.75, -1.0, 0.2, 0.28)
    assert g == 0.0 and out.clipped_low.item() and not out.clipped_high.item()
    g, out = _clip_grad(1.3, -1.0, 0.2, 0.28)
    assert g != 0.0 and not out.clipped_high.item() and not out.clipped_low.item()
    g, out = _clip_grad(0.75, 1.0, 0.2, 0.28)
    assert g != 0.0 and not out.clipped_low.item()


def test_clip_gating_vectorised_matches_indicators():
    torch.manual_seed(0)
    logp = (0.4 * torch.randn(200, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(200, dtype=torch.float64)
    out = ppo_clip_loss(logp, torch.zeros(200, dtype=torch.float64), adv, 0.2, 0.28)
    out.loss.sum().backward()
    bound = out.clipped_low | out.clipped_high
    assert bound.any() and (~bound).any()
    assert torch.all(logp.grad[bound] == 0) and torch.all(logp.grad[~bound] != 0)
    assert torch.allclose(out.loss, -torch.minimum(out.ratio * adv, out.ratio.clamp(0.8, 1.28) * adv))


def test_two_sided_delta_clip():
    logp = torch.tensor([math.log(5.0), math.log(1.1)], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    out = two_sided_clip_loss(logp, torch.zeros(2, dtype=torch.float64), adv, delta=4.0)
    out.loss.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0
    assert abs(out.loss[0].item() - 4.0) < 1e-12  # −min(δ·A, clip(δ)·A) = δ for A = −1
    assert out.clipped_high.tolist() == [True, False]
    with pytest.raises(ValueError):
        two_sided_clip_loss(logp, logp.detach(), adv, delta=0.5)


def test_gspo_ratio_is_exp_mean_token_log_ratio():
    torch.manual_seed(1)
    loss, _, mask = _batch()
    logp = torch.randn(loss.shape, dtype=torch.float64)
    old = torch.randn(loss.shape, dtype=torch.float64)
    s = gspo_sequence_ratio(logp, old, mask)
    for i, n in enumerate(LENGTHS):
        ref = math.exp((logp[i, :n] - old[i, :n]).mean().item())
        assert torch.allclose(s[i], torch.full((T,), ref, dtype=torch.float64), rtol=1e-12)
    sel = mask.bool()
    seq_ids = torch.arange(len(LENGTHS)).unsqueeze(1).expand_as(mask)[sel]
    assert torch.allclose(gspo_sequence_ratio(logp[sel], old[sel], mask[sel], seq_ids=seq_ids), s[sel])
    out = gspo_loss(logp, old, torch.ones(len(LENGTHS), dtype=torch.float64), mask, 0.2, 0.2)
    assert torch.allclose(out.loss, -torch.minimum(s, s.clamp(0.8, 1.2)))


def test_gspo_gradient_spreads_equally_within_sequence():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float64)
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    out = gspo_loss(logp, logp.detach(), torch.tensor([1.0], dtype=torch.float64), mask)
    aggregate(out.loss, mask, "seq-mean-token-mean", 1).backward()
    assert torch.allclose(logp.grad[0, :3], torch.full((3,), -1 / 3, dtype=torch.float64))
    assert logp.grad[0, 3] == 0


def test_cispo():
    logp = torch.tensor([math.log(0.5), math.log(10.0)], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([2.0, 1.0], dtype=torch.float64)
    out = cispo_loss(logp, torch.zeros(2, dtype=torch.float64), adv, eps_max=5.0)
    expected = torch.tensor([-0.5 * 2 * math.log(0.5), -5.0 * 1 * math.log(10.0)], dtype=torch.float64)
    assert torch.allclose(out.loss, expected)
    out.loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([-1.0, -5.0], dtype=torch.float64))  # never zero
    assert out.clipped_high.tolist() == [False, True]


def test_k3_nonnegative_and_zero_iff_equal():
    torch.manual_seed(2)
    a, b = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64)
    d = k3_kl(a, b)
    assert torch.all(d >= 0) and torch.all(d > 0)
    assert torch.all(k3_kl(a, a) == 0)
    assert abs(k3_kl(torch.tensor([0.0]), torch.tensor([1.0])).item() - (math.e - 2)) < 1e-6
    logp = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out = ppo_clip_loss(logp, logp.detach(), torch.zeros(3, dtype=torch.float64),
                        ref_logp=torch.full((3,), 1.0, dtype=torch.float64), beta=0.5)
    assert torch.allclose(out.loss, torch.full((3,), 0.5 * (math.e - 2), dtype=torch.float64))


def test_gtpo_conflict_weights_card_example():
    ids = torch.tensor([[1, 2, 3, 9], [1, 2, 4, 9], [1, 5, 3, 9]])
    w = gtpo_conflict_token_weights(ids, torch.ones(3, 4), torch.tensor([1.0, -1.0, -1.0]), torch.zeros(3))
    assert w.tolist() == [[2, 2, 2, 2], [0, 0, 1, 1], [0, 1, 1, 1]]


def test_gtpo_groups_mask_and_zero_advantage():
    ids = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0, 0.0, -1.0])
    w = gtpo_conflict_token_weights(ids, mask, adv, torch.tensor([7, 7, 7, 3]))  # seq 3 alone in its group
    assert w.tolist() == [[2, 2, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("bad", ["shape", "empty", "mode", "zero-mask", "no-norm", "flat-no-ids", "neg-norm"])
def test_aggregate_bad_input(bad):
    loss, w, _ = _batch()
    with pytest.raises(ValueError):
        if bad == "shape":
            aggregate(loss, w[:, :3], "token-mean", 3)
        elif bad == "empty":
            aggregate(torch.zeros(0), torch.zeros(0), "token-mean", 1)
        elif bad == "mode":
            aggregate(loss, w, "sequence-mean", 3)
        elif bad == "zero-mask":
            aggregate(loss, torch.zeros_like(w), "token-mean", 3)
        elif bad == "no-norm":
            aggregate(loss, w, "token-mean")
        elif bad == "flat-no-ids":
            aggregate(loss.flatten(), w.flatten(), "seq-mean-token-mean", 3)
        else:
            aggregate(loss, w, "token-mean", -1)


def test_surrogate_bad_input():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        ppo_clip_loss(x, torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError):
        ppo_clip_loss(x, x, torch.zeros(3))
    with pytest.raises(ValueError):
        ppo_clip_loss(x, x, torch.zeros(2), eps_low=-0.1)
    with pytest.raises(ValueError):
        ppo_clip_loss(x, x, torch.zeros(2), beta=0.1)  # beta without ref_logp
    with pytest.raises(ValueError):
        gspo_loss(x, x, torch.zeros(2), torch.ones(2, 4))
    with pytest.raises(ValueError):
        gspo_sequence_ratio(x.flatten(), x.flatten(), torch.ones(6))  # flat without seq_ids
    with pytest.raises(ValueError):
        cispo_loss(x, x, torch.zeros(2), eps_max=0)
    with pytest.raises(ValueError):
        k3_kl(x, torch.zeros(3))
    with pytest.raises(ValueError):
        gtpo_conflict_token_weights(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 2), torch.zeros(2),
                                    torch.zeros(2))


@pytest.mark.parametrize("mode", INVARIANT)
def test_microbatch_gradient_invariance(mode):
    """Accumulating backward() over micro-batches with the global normaliser gives the full-batch gradient."""
    _, w, mask = _batch(3)
    B = w.shape[0]
    Z = _norm(mode, w, B)
    torch.manual_seed(3)
    logp0 = -torch.rand(B, T, dtype=torch.float64)
    old = logp0 + 0.3 * torch.randn(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    full = logp0.clone().requires_grad_()
    aggregate(ppo_clip_loss(full, old, adv, 0.2, 0.28).loss, w, mode, Z, **_kw(mode)).backward()
    acc = logp0.clone().requires_grad_()
    splits = SPLITS if mode != "group-mean-token-mean" else [(0, 2), (2, 6)]
    for a, b in splits:
        out = ppo_clip_loss(acc[a:b], old[a:b], adv[a:b], 0.2, 0.28)
        aggregate(out.loss, w[a:b], mode, Z, check=False, **_kw(mode, slice(a, b))).backward()
    assert torch.allclose(acc.grad, full.grad, atol=1e-12, rtol=0)


def test_aggregate_meta_device_no_sync():
    """check=False with num_seqs given runs on the meta device (any host sync would raise there)."""
    loss = torch.randn(12, device="meta")
    w = torch.ones(12, device="meta")
    seq = torch.zeros(12, dtype=torch.long, device="meta")
    z = torch.tensor(4.0, device="meta")
    for mode in INVARIANT:
        kw = {"max_len": 3} if mode == "seq-mean-token-sum-norm" else {}
        if mode == "group-mean-token-mean":
            kw.update(group_ids=torch.zeros(3, dtype=torch.long, device="meta"), num_groups=1)
        if mode not in ("token-mean", "seq-mean-token-sum-norm"):
            kw.update(seq_ids=seq, num_seqs=3)
        assert aggregate(loss, w, mode, z, check=False, **kw).device.type == "meta"
    lp = torch.randn(4, 3, device="meta")
    for out in (ppo_clip_loss(lp, lp, torch.randn(4, device="meta"), 0.2, 0.28),
                gspo_loss(lp, lp, torch.randn(4, device="meta"), torch.ones(4, 3, device="meta")),
                cispo_loss(lp, lp, torch.randn(4, device="meta"), 5.0)):
        assert out.loss.device.type == "meta"
