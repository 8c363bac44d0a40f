"""Representation, update, proxy, continual-evaluation and domain-alignment metrics (torchstep.diagnostics):
exact numbers from the reference cards (diagnostics.md §6–§10a), closed forms and properties."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchstep.bench.gpt import GPT, GPTConfig
from torchstep.diagnostics.alignment import domain_alignment
from torchstep.diagnostics.continual import (average_accuracy, min_acc, min_acc_per_task, wc_acc,
                                             windowed_forgetting, windowed_forgetting_per_task,
                                             windowed_plasticity, windowed_plasticity_per_task)
from torchstep.diagnostics.proxies import (AttentionLogitMonitor, OutputLogitMonitor, gpt_attention_sites,
                                           lr_sensitivity, z_loss)
from torchstep.diagnostics.representation import (matrix_entropy, matrix_nuclear_norm, matrix_nuclear_norm_exact,
                                                  mnn_dataset_score, normalize_representation)
from torchstep.diagnostics.updates import parameter_delta, update_rank, update_sparsity

F64 = torch.float64
CARD_R = torch.tensor([[1., 2, 0], [3, 1, 1], [0, 2, 2], [1, 0, 4]], dtype=F64)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- §6 Matrix Nuclear-Norm

def mnn(R, **kw):
    return float(matrix_nuclear_norm(R, accum_dtype=F64, **kw))


def mnn_exact(R, **kw):
    return float(matrix_nuclear_norm_exact(R, accum_dtype=F64, **kw))


def test_mnn_card_worked_numbers_and_normalisation():
    Rn = normalize_representation(CARD_R, accum_dtype=F64)
    assert torch.allclose(torch.linalg.vector_norm(Rn, dim=1), torch.ones(4, dtype=F64), atol=1e-12)
    assert abs(float(Rn.square().sum()) - 4) < 1e-12                      # ‖R̂‖_F² = L
    cols = sorted(torch.linalg.vector_norm(Rn, dim=0).tolist(), reverse=True)
    assert np.allclose(cols, [1.329899, 1.253431, 0.812576], atol=1e-6)
    assert abs(mnn(CARD_R, per_token=False) - 3.395906) < 1e-6
    assert abs(mnn(CARD_R) - 0.848976) < 1e-6
    assert abs(mnn_exact(CARD_R) - 0.756528) < 1e-6
    assert abs(float(matrix_entropy(CARD_R, accum_dtype=F64)) - 0.818343) < 1e-6


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (12, 12)])
def test_mnn_exact_matches_numpy_svd_and_fast_obeys_the_bounds(shape):
    L, d = shape
    R = torch.randn(L, d, generator=gen(L * d), dtype=F64) * 3 + 1
    X = R.numpy()
    X = X - X.mean(0)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    assert abs(mnn_exact(R) - np.linalg.svd(X, compute_uv=False).sum() / L) < 1e-12
    D = min(L, d)
    cols = np.sort(np.linalg.norm(X, axis=0))[::-1]
    fast, exact = mnn(R), mnn_exact(R)
    assert abs(fast - cols[:D].sum() / L) < 1e-12
    assert (D / d) * math.sqrt(L) / L - 1e-12 <= fast <= math.sqrt(D / L) + 1e-12    # MNN ≤ √(D/L) ≤ 1
    assert 1 / math.sqrt(L) - 1e-12 <= exact <= math.sqrt(D / L) + 1e-12             # ‖R̂‖_F ≤ ‖R̂‖_* ≤ √D‖R̂‖_F
    assert exact <= cols.sum() / L + 1e-12                                            # ‖R̂‖_* ≤ Σ_all col norms
    if d <= L:                                                                        # top-D = all columns
        assert fast >= exact - 1e-12


def test_mnn_orthogonal_columns_are_exact_and_spread_rank_one_is_underestimated():
    k = 4
    eye = torch.eye(k, dtype=F64)
    R = torch.cat([eye, -eye]) * 5                       # centred, unit rows, orthogonal columns
    assert abs(mnn(R) - mnn_exact(R)) < 1e-12 and abs(mnn_exact(R) - k * math.sqrt(2) / (2 * k)) < 1e-12
    d = 8                                                # rank one, spread over d > L columns
    u = torch.ones(1, d, dtype=F64)
    R = torch.cat([u, -u])
    assert abs(mnn_exact(R) - math.sqrt(2) / 2) < 1e-12
    assert abs(mnn(R) / mnn_exact(R) - 2 / math.sqrt(d)) < 1e-12      # D/√d with D = L = 2


def test_mnn_invariances_batches_and_degenerate_inputs():
    R = torch.randn(6, 10, generator=gen(1), dtype=F64)
    cols, rows = torch.randperm(10, generator=gen(2)), torch.randperm(6, generator=gen(3))
    for f in (mnn, mnn_exact):
        ref = f(R)
        for other in (R[:, cols], R[rows], 7.5 * R):
            assert abs(f(other) - ref) < 1e-12
    batch = torch.stack([R, 2 * R + 1, R[rows]])
    assert torch.allclose(matrix_nuclear_norm(batch, accum_dtype=F64),
                          torch.tensor([mnn(b) for b in batch], dtype=F64), atol=1e-12)
    assert torch.allclose(matrix_nuclear_norm_exact(batch, accum_dtype=F64),
                          torch.tensor([mnn_exact(b) for b in batch], dtype=F64), atol=1e-12)
    one = torch.randn(1, 10, dtype=F64)
    assert math.isnan(mnn(one)) and math.isnan(mnn_exact(one))      # single token: 0/0, as the official code
    assert math.isnan(mnn(torch.zeros(0, 10)))                      # empty: NaN (official: −1)
    with pytest.raises(ValueError, match="zero after centring"):
        matrix_nuclear_norm(one, on_degenerate="raise")
    with pytest.raises(ValueError, match="on_degenerate"):
        matrix_nuclear_norm(R, on_degenerate="skip")
    assert abs(mnn_dataset_score([0.5, math.nan, 0.7]) - 0.6) < 1e-12
    assert math.isnan(mnn_dataset_score([math.nan]))


# ---------------------------------------------------------------- §7 update sparsity / density / rank

def test_update_sparsity_card_worked_numbers_fp64_and_bf16():
    ref = {"w": torch.tensor([1, 2, 3, 4], dtype=F64)}
    new = {"w": torch.tensor([1, 2 + 1e-6, 3.5, 4], dtype=F64)}
    r = update_sparsity(ref, new)
    assert r.sparsity == r.exact_sparsity == 0.5 and r.changed == 2 and r.total == 4
    assert update_sparsity(ref, new, tol=1e-5).sparsity == 0.75
    assert update_sparsity(ref, new, dtype=torch.bfloat16).exact_sparsity == 0.75     # 2 + 1e-6 → 2 in bf16


def test_bf16_counts_sub_half_ulp_updates_as_unchanged():
    # bf16 spacing near 0.02 is 2^-13 ≈ 1.22e-4: ±5e-5 (< half an ulp) vanishes, +1e-4 rounds to one ulp
    w0 = 164 * 2.0 ** -13                                   # ≈ 0.0200195, a bf16 value (0.02 itself is not)
    ref = {"w": torch.full((4,), w0, dtype=torch.float32)}
    new = {"w": torch.tensor([w0, w0 + 5e-5, w0 + 1e-4, w0 - 5e-5], dtype=torch.float32)}
    assert update_sparsity(ref, new).sparsity == 0.25                           # fp32: three changed
    r = update_sparsity(ref, new, dtype=torch.bfloat16)
    assert r.sparsity == 0.75 and r.changed == 1
    d = parameter_delta(ref["w"], new["w"], torch.bfloat16)
    assert d[2].item() == 2.0 ** -13                                            # exactly one bf16 ulp
    # bf16 checkpoints as stored: the same as rounding fp32 ones
    as_bf16 = update_sparsity({"w": ref["w"].bfloat16()}, {"w": new["w"].bfloat16()})
    assert as_bf16.sparsity == 0.75 and update_sparsity(ref, new, tol=1.3e-4, dtype=torch.bfloat16).sparsity == 1


def test_per_layer_density_hand_counts_weighted_and_unweighted():
    ref, new = {}, {}
    changes = {0: (2, 1), 1: (0, 4), 2: (8, 0)}          # changed entries in (8-entry weight, 4-entry norm)
    for i, (cw, cn) in changes.items():
        ref[f"blocks.{i}.fc.weight"] = torch.zeros(2, 4)
        ref[f"blocks.{i}.ln.weight"] = torch.zeros(4)
        new[f"blocks.{i}.fc.weight"] = torch.zeros(8).index_fill(0, torch.arange(cw), 1.0).view(2, 4)
        new[f"blocks.{i}.ln.weight"] = torch.zeros(4).index_fill(0, torch.arange(cn), 1.0)
    ref["embed.weight"], new["embed.weight"] = torch.zeros(3), torch.ones(3)
    ref["step"], new["step"] = torch.tensor(1), torch.tensor(2)                 # int buffer: not compared
    r = update_sparsity(ref, new)
    assert r.layer_density == {0: (2 / 8 + 1 / 4) / 2, 1: (0 + 1) / 2, 2: (1 + 0) / 2}
    assert r.layer_density_weighted == {0: 3 / 12, 1: 4 / 12, 2: 8 / 12}
    assert r.density["embed.weight"] == 1 and r.total == 3 * 12 + 3 and r.changed == 3 + 4 + 8 + 3
    assert r.missing == r.extra == []
    # streaming over tensors = one concatenated comparison
    cat = lambda sd: {"all": torch.cat([t.reshape(-1) for k, t in sd.items() if t.is_floating_point()])}
    assert update_sparsity(cat(ref), cat(new)).sparsity == r.sparsity


def test_sparse_update_is_full_rank_and_low_rank_update_is_dense():
    g = gen(4)
    w = torch.randn(64, 64, generator=g, dtype=F64)
    mask = torch.rand(64, 64, generator=g) < 0.2
    sparse = w + mask * torch.randn(64, 64, generator=g, dtype=F64)
    low = w + torch.randn(64, 4, generator=g, dtype=F64) @ torch.randn(4, 64, generator=g, dtype=F64)
    s = update_sparsity({"m": w}, {"m": sparse})
    assert abs(s.sparsity - 0.8) < 0.02 and s.sparsity == 1 - mask.double().mean().item()
    r = update_rank({"m": w}, {"m": sparse})
    assert r.rank == {"m": 64} and r.mean_ratio == 1.0
    assert update_sparsity({"m": w}, {"m": low}).sparsity == 0.0
    r = update_rank({"m": w, "v": w[0], "layernorm.weight": w}, {"m": low, "v": low[0], "layernorm.weight": low})
    assert r.rank == {"m": 4} and r.max_rank == {"m": 64} and r.mean_ratio == 4 / 64    # vectors, layernorm skipped
    wide = torch.randn(8, 32, generator=g, dtype=F64)
    delta = torch.randn(8, 3, generator=g, dtype=F64) @ torch.randn(3, 32, generator=g, dtype=F64)
    assert update_rank({"m": wide}, {"m": wide + delta}).rank == {"m": 3}


def test_update_metrics_report_missing_keys_and_take_modules():
    ref = {"a": torch.zeros(3), "b": torch.zeros(2)}
    new = {"a": torch.ones(3), "c": torch.zeros(2)}
    r = update_sparsity(ref, new)
    assert r.missing == ["b"] and r.extra == ["c"] and r.total == 3 and r.sparsity == 0
    with pytest.raises(ValueError, match="keys differ"):
        update_sparsity(ref, new, strict=True)
    with pytest.raises(ValueError, match="shape"):
        update_sparsity({"a": torch.zeros(3)}, {"a": torch.zeros(4)})
    with pytest.raises(ValueError, match="tol"):
        update_sparsity(ref, new, tol=-1.0)
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    m1 = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    m1.load_state_dict(m0.state_dict())
    with torch.no_grad():
        m1[0].bias[0] += 1
    m1[1].running_mean += 1                              # a buffer: modules compare parameters only
    r = update_sparsity(m0, m1)
    assert r.changed == 1 and r.total == 16 + 4 + 4 + 4


# ---------------------------------------------------------------- §8 proxies

def test_lr_sensitivity_card_worked_example_and_edge_cases():
    l0 = math.log(32000)
    lrs = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    losses = [3.30, 3.10, 3.00, 3.05, 3.40, math.nan]
    assert abs(lr_sensitivity(list(zip(lrs, losses)), l0) - 1.370582) < 1e-6
    inf = list(zip(lrs, losses[:-1] + [math.inf]))
    above = list(zip(lrs, losses[:-1] + [50.0]))
    assert lr_sensitivity(inf, l0) == lr_sensitivity(above, l0) == lr_sensitivity(list(zip(lrs, losses)), l0)
    assert lr_sensitivity([(lr, 2.5) for lr in lrs], l0) == 0.0
    assert lr_sensitivity([(1e-3, math.nan), (1e-2, math.nan)], l0) == 0.0         # all diverged: ℓ* = ℓ0
    assert abs(lr_sensitivity(list(zip(lrs + [1.0], losses[:-1] + [3.0, 9.0])), l0, lr_range=(3e-4, 3e-1))
               - (0.3 + 0.1 + 0 + 0.05 + 0.4 + 0) / 6) < 1e-12                       # the lr = 1 run dropped
    with pytest.raises(ValueError, match="sweep"):
        lr_sensitivity([(1.0, 3.0)], l0, lr_range=(1e-4, 1e-1))
    with pytest.raises(ValueError, match="lr"):
        lr_sensitivity([(0.0, 3.0)], l0)


def test_z_loss_value_gradient_and_shift_behaviour():
    z = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64, requires_grad=True)
    log_z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert abs(log_z - 3.407606) < 1e-6
    loss = z_loss(z)
    assert abs(loss.item() - 1.161178e-3) < 1e-9
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.allclose(grad, 2e-4 * log_z * torch.softmax(z.detach(), -1), atol=1e-10)
    y = torch.tensor([2])
    assert abs(F.cross_entropy(z + 5, y).item() - F.cross_entropy(z, y).item()) < 1e-12
    assert z_loss(z + 5).item() > 5 * loss.item()          # (8.41/3.41)² ≈ 6.1


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab=256, context=8, width=16, depth=1, heads=4, **kw)).double()


def gpt_batch():
    idx = torch.randint(0, 256, (2, 8), generator=gen(5))
    return idx, torch.roll(idx, -1, 1)


def direct_attention_logits(model, idx):
    """q·k·scale recomputed from the block's qkv output (its own view/permute), causal entries only."""
    block = model.blocks[0]
    got = {}
    h = block.qkv.register_forward_hook(lambda m, i, o: got.setdefault("qkv", o.detach()))
    with torch.no_grad():
        model(idx)
    h.remove()
    B, T, C = got["qkv"].shape[0], got["qkv"].shape[1], model.cfg.width
    q, k, _ = got["qkv"].view(B, T, 3, model.cfg.heads, C // model.cfg.heads).permute(2, 0, 3, 1, 4)
    q, k = block.q_norm(q), block.k_norm(k)
    scale = block.attn_scale if block.attn_scale is not None else 1 / math.sqrt(q.shape[-1])
    s = q @ k.transpose(-1, -2) * scale
    return s[..., torch.ones(T, T, dtype=torch.bool).tril()]


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"attn_scale": 0.25}], ids=["sp", "qk_norm", "mup_scale"])
def test_attention_monitor_matches_a_direct_computation(kw):
    scale = kw.pop("attn_scale", None)
    model, (idx, tgt) = tiny_gpt(**kw), gpt_batch()
    if scale is not None:        # μP's 1/d_head logits (what mup_base_width sets; built directly: faster)
        model.blocks[0].attn_scale = scale
    assert gpt_attention_sites(model)["blocks.0"][2] == scale
    mon = AttentionLogitMonitor()
    rec = mon(0, model=model, loss_fn=None, batch=(idx, tgt))
    assert abs(rec["attn_logit_max/blocks.0"] - direct_attention_logits(model, idx).abs().max().item()) < 1e-10
    assert rec["attn_logit_max"] == rec["attn_logit_max/blocks.0"] and rec["step"] == 0
    assert 0 < rec["attn_entropy/blocks.0"] == rec["attn_entropy_min"] < math.log(8)
    assert mon(1, model=model, loss_fn=None, batch=(idx, tgt)) is not None and len(mon.history) == 2


def test_attention_monitor_detects_a_scaled_up_query_weight_and_qk_norm_bounds_it():
    idx, tgt = gpt_batch()
    model = tiny_gpt()
    base = AttentionLogitMonitor().measure(model=model, optimizer=None, loss_fn=None, batch=(idx, tgt), step=0)
    with torch.no_grad():
        model.blocks[0].qkv.weight[:16] *= 10                       # the query rows of the fused qkv weight
    hot = AttentionLogitMonitor().measure(model=model, optimizer=None, loss_fn=None, batch=(idx, tgt), step=0)
    assert abs(hot["attn_logit_max"] / base["attn_logit_max"] - 10) < 1e-9
    assert hot["attn_entropy_min"] < base["attn_entropy_min"]
    with torch.no_grad():
        model.blocks[0].qkv.weight[:16] = 0                         # q = 0: uniform causal attention
    flat = AttentionLogitMonitor().measure(model=model, optimizer=None, loss_fn=None, batch=(idx, tgt), step=0)
    assert flat["attn_logit_max"] == 0
    assert abs(flat["attn_entropy_min"] - sum(math.log(i + 1) for i in range(8)) / 8) < 1e-12
    normed = tiny_gpt(qk_norm=True)
    with torch.no_grad():
        normed.blocks[0].qkv.weight[:32] *= 100
    rec = AttentionLogitMonitor().measure(model=normed, optimizer=None, loss_fn=None, batch=(idx, tgt), step=0)
    assert rec["attn_logit_max"] <= math.sqrt(4) + 1e-6                  # |s| ≤ √d_h under qk-layernorm
    with pytest.raises(ValueError, match="no attention sites"):
        AttentionLogitMonitor().measure(model=nn.Linear(2, 2), optimizer=None, loss_fn=None,
                                        batch=(torch.zeros(1, 2), None), step=0)


def test_output_logit_monitor_log_z_drift_and_max_logit():
    model, (idx, tgt) = tiny_gpt(), gpt_batch()
    mon = OutputLogitMonitor(every=2)
    rec = mon(0, model=model, loss_fn=None, batch=(idx, tgt))
    with torch.no_grad():
        logits = model(idx)
    log_z = logits.logsumexp(-1)
    assert abs(rec["log_z_mean"] - log_z.mean().item()) < 1e-12 and rec["log_z_drift"] == 0
    assert abs(rec["log_z_sq_mean"] - z_loss(logits, 1.0).item()) < 1e-12
    # (the monitor's forward runs the math attention kernel: equal to the fused one up to rounding)
    assert rec["log_z_min"] <= rec["log_z_mean"] <= rec["log_z_max"]
    assert abs(rec["logit_max"] - logits.max().item()) < 1e-12
    assert mon(1, model=model, loss_fn=None, batch=(idx, tgt)) is None
    with torch.no_grad():
        model.head.weight *= 10
    rec2 = mon(2, model=model, loss_fn=None, batch=(idx, tgt))
    assert abs(rec2["logit_max"] / rec["logit_max"] - 10) < 1e-9
    assert abs(rec2["log_z_drift"] - (rec2["log_z_mean"] - rec["log_z_mean"])) < 1e-12
    state = mon.state_dict()
    other = OutputLogitMonitor()
    other.load_state_dict(state)
    assert other.history == mon.history and other.every == 2


# ---------------------------------------------------------------- §9 continual evaluation

NAN = math.nan
CARD_ACC = [[0.5, NAN], [0.8, NAN], [0.9, NAN], [0.4, 0.6], [0.7, 0.8], [0.85, 0.9]]
CARD_TASKS = [0, 0, 0, 1, 1, 1]


def test_continual_metrics_card_worked_numbers():
    assert min_acc(CARD_ACC, CARD_TASKS) == 0.4 and min_acc_per_task(CARD_ACC, CARD_TASKS) == {0: 0.4}
    assert abs(wc_acc(CARD_ACC, CARD_TASKS) - 0.65) < 1e-12
    assert abs(average_accuracy(CARD_ACC, CARD_TASKS) - 0.875) < 1e-12
    assert windowed_forgetting_per_task(CARD_ACC, CARD_TASKS, 3) == pytest.approx({0: 0.5, 1: 0.0}, abs=1e-12)
    assert abs(windowed_forgetting(CARD_ACC, CARD_TASKS, 3) - 0.25) < 1e-12
    assert abs(windowed_forgetting(CARD_ACC, CARD_TASKS, 3, scope="previous") - 0.5) < 1e-12
    assert windowed_plasticity_per_task(CARD_ACC, CARD_TASKS, 3) == pytest.approx({0: 0.45, 1: 0.3}, abs=1e-12)
    assert abs(windowed_plasticity(CARD_ACC, CARD_TASKS, 3) - 0.375) < 1e-12
    assert windowed_forgetting_per_task(CARD_ACC, CARD_TASKS, 2)[0] == pytest.approx(0.5)   # 0.9 → 0.4 adjacent
    assert windowed_forgetting(CARD_ACC, CARD_TASKS, 1) == 0
    # at t = 3 (row 2) only task 1 is seen: min-ACC undefined, WC-ACC = A(E_1, f_3)
    assert math.isnan(min_acc(CARD_ACC, CARD_TASKS, t=2)) and wc_acc(CARD_ACC, CARD_TASKS, t=2) == 0.9
    assert min_acc(CARD_ACC, CARD_TASKS, t=3) == 0.4 and abs(wc_acc(CARD_ACC, CARD_TASKS, t=3) - 0.5) < 1e-12


def random_trace(seed=0, runs=(10, 10, 10)):
    g = gen(seed)
    tasks = [k for k, n in enumerate(runs) for _ in range(n)]
    acc = torch.rand(len(tasks), len(runs), generator=g, dtype=F64)
    starts = [tasks.index(k) for k in range(len(runs))]
    for k, s in enumerate(starts):
        acc[:s, k] = NAN
    return acc, tasks


def test_continual_metric_properties():
    acc, tasks = random_trace()
    N = len(tasks)
    for t in range(N):
        assert wc_acc(acc, tasks, t) <= average_accuracy(acc, tasks, t) + 1e-12
    for t in range(N - 1):                    # per-task minima never rise, per-task WF^w never falls
        now, later = min_acc_per_task(acc, tasks, t), min_acc_per_task(acc, tasks, t + 1)
        assert all(later[i] <= now[i] for i in now)
        for w in (3, 10):
            f_now = windowed_forgetting_per_task(acc, tasks, w, t)
            f_later = windowed_forgetting_per_task(acc, tasks, w, t + 1)
            assert all(f_later[i] >= f_now[i] for i in f_now)
    wf = [windowed_forgetting(acc, tasks, w) for w in (1, 2, 5, 10, N)]
    assert wf == sorted(wf)
    for rho in (2, 5):                        # coarser evaluation: min-ACC can only rise, WF^∞ only fall
        rows = sorted(range(N - 1, -1, -rho))
        sub, sub_tasks = acc[rows], [tasks[r] for r in rows]
        assert min_acc(sub, sub_tasks) >= min_acc(acc, tasks) - 1e-12
        assert windowed_forgetting(sub, sub_tasks, N) <= windowed_forgetting(acc, tasks, N) + 1e-12


def test_unseen_tasks_are_never_evaluated_and_bad_traces_raise():
    acc, tasks = random_trace(1)
    garbage = acc.clone()
    garbage[:10, 1], garbage[:20, 2] = 0.0, 1.0            # values before a task starts are ignored
    for f in (min_acc, wc_acc, average_accuracy):
        assert f(garbage, tasks, 15) == f(acc, tasks, 15)
    assert windowed_forgetting(garbage, tasks, 10, 15) == windowed_forgetting(acc, tasks, 10, 15)
    assert set(windowed_forgetting_per_task(acc, tasks, 10, 15)) == {0, 1}
    with pytest.raises(ValueError, match="more than one run"):
        min_acc(CARD_ACC, [0, 1, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="task_of"):
        min_acc(CARD_ACC, [0, 0, 0])
    with pytest.raises(ValueError, match="scope"):
        windowed_forgetting(CARD_ACC, CARD_TASKS, 3, scope="current")
    with pytest.raises(ValueError, match="Invalid w"):
        windowed_plasticity(CARD_ACC, CARD_TASKS, 0)


# ---------------------------------------------------------------- §10a Hessian alignment

def mse(out, y):
    return ((out - y) ** 2).mean()


def linear_domains(diagonal=False):
    g = gen(7)
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    if diagonal:                                            # XᵀX diagonal ⇒ diagonal Hessians
        xs = [torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=F64)), torch.diag(torch.tensor([0.3, 1.5, 2.0],
                                                                                              dtype=F64))]
    else:
        xs = [torch.randn(5, 3, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64) * 2]
    return model, [(x, torch.randn(x.shape[0], 1, generator=g, dtype=F64)) for x in xs]


def test_domain_alignment_closed_form_on_a_two_domain_linear_model():
    model, batches = linear_domains()
    w = model.weight.detach().numpy().reshape(3, 1)
    gs, Hs = [], []
    for x, y in batches:                                   # ℓ_e = (1/n)‖Xw − y‖²
        X, Y, n = x.numpy(), y.numpy(), x.shape[0]
        gs.append((2 / n) * X.T @ (X @ w - Y))
        Hs.append((2 / n) * X.T @ X)
    gbar, Hbar = sum(gs) / 2, sum(Hs) / 2
    r = domain_alignment(model, mse, batches, exact=True)
    assert abs(r.grad_dispersion - sum(float(((g - gbar) ** 2).sum()) for g in gs) / 2) < 1e-10
    assert abs(r.hgp_dispersion - sum(float(((H @ g - Hbar @ gbar) ** 2).sum()) for H, g in zip(Hs, gs)) / 2) < 1e-10
    diag = sum(float(((np.diag(H) - np.diag(Hbar)) ** 2).sum()) for H in Hs) / 2
    assert abs(r.diag_dispersion - diag) < 1e-10
    assert abs(r.spectral_gap - np.abs(np.linalg.eigvalsh(Hs[0] - Hs[1])).max()) < 1e-10
    assert np.allclose(r.losses, [float(mse(model(x), y).detach()) for x, y in batches], atol=1e-12)
    summed = domain_alignment(model, lambda o, y: ((o - y) ** 2).sum(0).squeeze(), batches, reduction="sum")
    assert abs(summed.hgp_dispersion - r.hgp_dispersion) < 1e-10 and summed.hutchinson_dispersion is None
    swapped = domain_alignment(model, mse, batches[::-1], exact=True)
    for f in ("grad_dispersion", "hgp_dispersion", "diag_dispersion", "spectral_gap"):
        assert abs(getattr(swapped, f) - getattr(r, f)) < 1e-12
    same = domain_alignment(model, mse, [batches[0], batches[0]], hutchinson_samples=3, exact=True)
    assert same.grad_dispersion == same.hgp_dispersion == same.hutchinson_dispersion == same.diag_dispersion == 0
    assert same.spectral_gap == 0


def test_hutchinson_dispersion_is_exact_for_diagonal_hessians():
    model, batches = linear_domains(diagonal=True)
    r = domain_alignment(model, mse, batches, hutchinson_samples=1, exact=True, generator=gen(0))
    assert abs(r.hutchinson_dispersion - r.diag_dispersion) < 1e-12 and r.diag_dispersion > 0


def test_hgp_matches_the_papers_norm_gradient_identity_on_a_cross_entropy_head():
    g = gen(8)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    batches = [(torch.randn(10, 4, generator=g, dtype=F64), torch.randint(0, 3, (10,), generator=g))
               for _ in range(3)]
    head = list(model[3].parameters())
    model.eval()
    vecs, gradients = [], []
    for batch in batches + [None]:                       # each domain, then the mean loss (the targets)
        loss = (sum(F.cross_entropy(model(bx), by) for bx, by in batches) / 3 if batch is None
                else F.cross_entropy(model(batch[0]), batch[1]))
        grads = torch.autograd.grad(loss, head, create_graph=True)
        norm = torch.sqrt(sum((gr ** 2).sum() for gr in grads))
        dnorm = torch.autograd.grad(norm, head)
        vecs.append(torch.cat([(norm * d).reshape(-1) for d in dnorm]).detach())      # ‖g‖·∇‖g‖ = H g
        gradients.append(torch.cat([gr.reshape(-1) for gr in grads]).detach())
    hgp = sum(float(((v - vecs[-1]) ** 2).sum()) for v in vecs[:-1]) / 3
    grad = sum(float(((v - gradients[-1]) ** 2).sum()) for v in gradients[:-1]) / 3
    model.train()
    r = domain_alignment(model, F.cross_entropy, batches, params=model[3])
    assert abs(r.hgp_dispersion - hgp) < 1e-10 * max(1, hgp) and abs(r.grad_dispersion - grad) < 1e-12
    assert model.training and model[2].training                            # modes restored
    with pytest.raises(ValueError, match="at least 2"):
        domain_alignment(model, F.cross_entropy, batches[:1])
    with pytest.raises(ValueError, match="params"):
        domain_alignment(model, F.cross_entropy, batches, params=[nn.Parameter(torch.zeros(2))])
