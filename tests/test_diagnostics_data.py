"""Data Diet scores (diagnostics.md §1): EL2N, GraNd, run averages, dataset order, pruning."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchstep.diagnostics.data import data_scores, el2n_scores, grand_scores, prune_by_score, trained_runs
from torchstep.scaling import per_sample_gradients

DT = torch.float64


def linear_softmax(n_in=3, n_out=4, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).to(DT)


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.ReLU(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(DT)


def data(n=24, n_in=5, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_in, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def test_worked_numbers():
    model = linear_softmax(n_in=3, n_out=3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([2.0, 1.0, 0.0]))
    x, y = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT), torch.tensor([0])     # logits (2, 1, 0), label 0
    assert el2n_scores(model, (x, y)).item() == pytest.approx(0.424336, abs=1e-6)
    assert grand_scores(model, F.cross_entropy, (x, y)).item() == pytest.approx(1.060840, abs=1e-6)


def test_grand_equals_el2n_times_sqrt_one_plus_x_squared_for_linear_softmax():
    model = linear_softmax(n_in=6, n_out=5, seed=3)
    x, y = data(n=32, n_in=6, classes=5, seed=4)
    x = 3 * x
    el2n, grand = data_scores(model, (x, y), F.cross_entropy).values()
    torch.testing.assert_close(grand, el2n * (1 + x.pow(2).sum(1)).sqrt(), rtol=1e-12, atol=1e-12)
    # only the bias: ∇_b ℓ = p − y, so GraNd over the "no_decay" group is EL2N itself
    torch.testing.assert_close(grand_scores(model, F.cross_entropy, (x, y), params="no_decay"), el2n,
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grand_scores(model, F.cross_entropy, (x, y), params=["weight"]),
                               el2n * x.norm(dim=1), rtol=1e-12, atol=1e-12)


def test_el2n_bounds_and_zero_iff_one_hot_prediction():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(200, 6, generator=g, dtype=DT)
    y = torch.randint(0, 6, (200,), generator=g)
    score = el2n_scores(nn.Identity(), (logits, y))
    p_y = logits.softmax(-1).gather(1, y[:, None]).squeeze(1)
    assert (score >= 0).all() and (score <= math.sqrt(2) * (1 - p_y) + 1e-15).all()
    assert (score <= math.sqrt(2)).all()
    confident = torch.tensor([[1000.0, 0.0, 0.0]], dtype=DT)
    assert el2n_scores(nn.Identity(), (confident, torch.tensor([0]))).item() == 0.0
    assert el2n_scores(nn.Identity(), (confident, torch.tensor([1]))).item() == pytest.approx(math.sqrt(2))
    # soft / one-hot float targets are used as given
    soft = logits.softmax(-1)
    assert el2n_scores(nn.Identity(), (logits, soft)).abs().max() < 1e-15


def test_grand_vmap_matches_python_loop():
    model, (x, y) = mlp(seed=2), data(n=10)
    loop = []
    for i in range(10):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        loop.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    torch.testing.assert_close(grand_scores(model, F.cross_entropy, (x, y), batch_size=4), torch.stack(loop),
                               rtol=1e-10, atol=1e-12)
    # the reuse is real: the same per-sample gradients as torchstep.scaling's
    grads = per_sample_gradients(model, F.cross_entropy, x, y)
    torch.testing.assert_close(grand_scores(model, F.cross_entropy, (x, y)),
                               sum(g.flatten(1).pow(2).sum(1) for g in grads.values()).sqrt())


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_grand_matches_backpack_batch_l2_for_a_mean_loss():
    import backpack                  # a parity reference: installed by the README command, missing must fail
    from backpack.extensions import BatchL2Grad
    model, (x, y) = mlp(seed=5), data(n=12)
    ours = grand_scores(model, F.cross_entropy, (x, y))
    ext_model, loss = backpack.extend(mlp(seed=5)), backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(BatchL2Grad()):
        loss(ext_model(x), y).backward()
    batch_l2 = sum(p.batch_l2 for p in ext_model.parameters())          # ‖g_i/N‖² for a mean loss
    torch.testing.assert_close(ours, 12 * batch_l2.sqrt(), rtol=1e-5, atol=1e-8)


def test_reductions_agree_on_a_batch_of_one():
    model, (x, y) = mlp(seed=1), data(n=9)
    mean = grand_scores(model, F.cross_entropy, (x, y))
    summed = grand_scores(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), (x, y), reduction="sum")
    none = grand_scores(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (x, y), reduction="none")
    torch.testing.assert_close(summed, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(none, mean, rtol=1e-12, atol=1e-12)


def test_runs_are_averaged_and_factory_runs_are_lazy():
    x, y = data(n=15)
    models = [mlp(seed=s) for s in range(3)]
    per_run = torch.stack([el2n_scores(m, (x, y)) for m in models])
    runs = data_scores(models, (x, y), F.cross_entropy, return_runs=True)
    assert runs["el2n"].shape == runs["grand"].shape == (3, 15)
    torch.testing.assert_close(runs["el2n"], per_run, rtol=0, atol=0)
    torch.testing.assert_close(el2n_scores(models, (x, y)), per_run.mean(0), rtol=0, atol=0)

    built, trained = [], []

    def factory(seed):
        built.append(seed)
        return mlp(seed=seed)

    def train(model, seed):                                   # one SGD step on the data, in place
        trained.append(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    lazy = trained_runs(factory, train, seeds=[0, 1, 2])
    assert built == [] and trained == []
    scores = data_scores(lazy, (x, y), F.cross_entropy)
    assert built == trained == [0, 1, 2]
    assert not torch.allclose(scores["el2n"], per_run.mean(0))    # trained, not the initialisations


def test_scores_are_in_dataset_order_for_loaders_datasets_and_iterables():
    model, (x, y) = mlp(seed=0), data(n=23)
    ref = el2n_scores(model, (x, y))
    dataset = TensorDataset(x, y)
    shuffled = DataLoader(dataset, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(0))
    dropping = DataLoader(dataset, batch_size=5, drop_last=True)
    for source in (dataset, shuffled, dropping, DataLoader(dataset, batch_size=4)):
        torch.testing.assert_close(el2n_scores(model, source), ref, rtol=1e-12, atol=1e-14)
    batches = [(x[i:i + 6], y[i:i + 6]) for i in range(0, 23, 6)]                # iteration order as given
    torch.testing.assert_close(el2n_scores(model, batches), ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grand_scores(model, F.cross_entropy, shuffled),
                               grand_scores(model, F.cross_entropy, (x, y)), rtol=1e-12, atol=1e-14)


def test_eval_mode_default_is_batch_size_invariant_and_train_mode_is_not():
    model, (x, y) = mlp(seed=3, bn=True), data(n=63)
    model.train()
    model(x)                                           # non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = data_scores(model, (x, y), F.cross_entropy, batch_size=7)
    large = data_scores(model, (x, y), F.cross_entropy, batch_size=63)
    for name in ("el2n", "grand"):
        torch.testing.assert_close(small[name], large[name], rtol=1e-10, atol=1e-12)
    train_small = el2n_scores(model, (x, y), mode="train", batch_size=7)
    train_large = el2n_scores(model, (x, y), mode="train", batch_size=63)
    assert (train_small - train_large).abs().max() > 1e-3
    assert model.training and all(m.training for m in model.modules())         # flags restored
    for k, v in model.state_dict().items():                                     # running stats restored
        assert torch.equal(v, before[k]), k


def test_prune_by_score_selection_rules_and_ties():
    scores = torch.tensor([0.3, 0.1, 0.5, 0.1, 0.9, 0.5, 0.2, 0.5])
    # ascending stable order (ties by index): 1, 3, 6, 0, 2, 5, 7, 4
    assert prune_by_score(scores, 0.5, "hard").tolist() == [2, 4, 5, 7]
    assert prune_by_score(scores, 0.5, "easy").tolist() == [0, 1, 3, 6]
    assert prune_by_score(scores, 0.5, "offset", offset=2).tolist() == [0, 2, 5, 6]
    assert prune_by_score(scores, 0.375, "hard").tolist() == [0, 2, 4, 5, 7]          # K = 8 − 3
    assert prune_by_score(scores, 0.0).tolist() == list(range(8))
    hard_ties = prune_by_score(scores, 0.75, "hard")                                  # K = 2: 0.9 and the last 0.5
    assert hard_ties.tolist() == [4, 7]
    assert prune_by_score(torch.tensor([1.0, math.inf, 0.0]), 1 / 3, "hard").tolist() == [0, 1]
    a = prune_by_score(scores, 0.5, "random", generator=torch.Generator().manual_seed(0))
    b = prune_by_score(scores, 0.5, "random", generator=torch.Generator().manual_seed(0))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 4 and a.tolist() == sorted(a.tolist())


def test_el2n_pruning_on_run_averaged_scores_is_keep_max_of_the_mean():
    x, y = data(n=20)
    models = [mlp(seed=s) for s in range(3)]
    mean = el2n_scores(models, (x, y))
    kept = prune_by_score(mean, 0.25)
    dropped = torch.tensor(sorted(set(range(20)) - set(kept.tolist())))
    assert kept.numel() == 15 and mean[kept].min() >= mean[dropped].max()


@pytest.mark.parametrize("call, match", [
    (lambda m, d: data_scores(m, d, F.cross_entropy, mode="test"), "mode"),
    (lambda m, d: data_scores(m, d, F.cross_entropy, reduction="avg"), "reduction"),
    (lambda m, d: data_scores(m, d, F.cross_entropy, scores=("el2n", "el2n")), "scores"),
    (lambda m, d: data_scores(m, d, F.cross_entropy, scores=("loss",)), "scores"),
    (lambda m, d: data_scores(m, d, scores=("grand",)), "loss_fn"),
    (lambda m, d: data_scores(m, d, F.cross_entropy, batch_size=0), "batch_size"),
    (lambda m, d: data_scores(m, d, F.cross_entropy, chunk_size=0), "chunk_size"),
    (lambda m, d: data_scores([], d, F.cross_entropy), "models"),
    (lambda m, d: data_scores([m, "m"], d, F.cross_entropy), "models"),
    (lambda m, d: data_scores(m, d[0], F.cross_entropy), "data"),
    (lambda m, d: data_scores(m, (d[0][:5], d[1]), F.cross_entropy), "data"),
    (lambda m, d: data_scores(m, (d[0][:0], d[1][:0]), F.cross_entropy), "data"),
    (lambda m, d: grand_scores(m, F.cross_entropy, d, params=["nope"]), "params"),
    (lambda m, d: grand_scores(m, F.cross_entropy, d, params="embedding"), "params"),
    (lambda m, d: grand_scores(m, F.cross_entropy, d, params="bias"), "params"),
    (lambda m, d: el2n_scores(m, (d[0], d[1][:, None].to(DT))), "targets"),
    (lambda m, d: el2n_scores(nn.Flatten(0), d), "outputs"),
    (lambda m, d: list(trained_runs(mlp, lambda model, s: None, seeds=[])), "seeds"),
    (lambda m, d: prune_by_score(torch.tensor([1.0, float("nan")]), 0.5), "scores"),
    (lambda m, d: prune_by_score(torch.ones(2, 2), 0.5), "scores"),
    (lambda m, d: prune_by_score(torch.ones(4), 1.0), "fraction"),
    (lambda m, d: prune_by_score(torch.ones(4), -0.1), "fraction"),
    (lambda m, d: prune_by_score(torch.ones(4), 0.5, "max"), "keep"),
    (lambda m, d: prune_by_score(torch.ones(4), 0.5, "offset"), "offset"),
    (lambda m, d: prune_by_score(torch.ones(4), 0.5, "offset", offset=3), "offset"),
    (lambda m, d: prune_by_score(torch.ones(4), 0.5, "hard", offset=1), "offset"),
    (lambda m, d: prune_by_score(torch.ones(4), 0.5, "random"), "generator"),
    (lambda m, d: prune_by_score(torch.ones(4), 0.5, generator=torch.Generator()), "generator"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(mlp(), data(n=6))
