"""``torchstep diagnose``: each kind on a small digits MLP writes a CSV whose numbers are the diagnostic's."""
import csv

import pytest
import torch
import torch.nn.functional as F

from torchstep import cli
from torchstep.bench import diagnose
from torchstep.diagnostics import CurvatureOperator, power_eigenvalues

OPTS = {"hidden": 16, "batch": 64}


@pytest.fixture(scope="module")
def prob():
    torch.set_num_threads(1)
    return diagnose.problem("digits-mlp", OPTS, "adamw", 3e-3, train_steps=30)


def test_hessian_rows_match_power_iteration_and_files_exist(prob, tmp_path):
    rows = diagnose.hessian(prob, tmp_path, k=2, trace_samples=8)
    top = power_eigenvalues(CurvatureOperator(prob.model, prob.loss_fn, prob.probe), 1,
                            generator=torch.Generator().manual_seed(3)).values[0]
    assert rows[0][:2] == ("eigenvalue", 1) and rows[0][2] == pytest.approx(float(top), rel=1e-3)
    assert rows[0][2] >= rows[1][2] and rows[-1][0] == "trace" and rows[-1][3] > 0
    assert (tmp_path / "hessian.png").stat().st_size > 0
    with open(tmp_path / "hessian.csv") as fh:
        assert len(list(csv.reader(fh))) == 4                # header, 2 eigenvalues, trace


def test_density_and_data_scores(prob, tmp_path):
    rows = diagnose.density(prob, tmp_path, steps=20, runs=1)
    xs = [r[0] for r in rows]
    mass = sum(0.5 * (rows[i][1] + rows[i + 1][1]) * (xs[i + 1] - xs[i]) for i in range(len(rows) - 1))
    assert mass == pytest.approx(1.0, abs=0.02)
    scores = diagnose.el2n(prob, tmp_path)
    X, y = prob.data[0], prob.data[1]
    with torch.no_grad():                                               # row i is example i (dataset order)
        for i in (0, 7, len(y) - 1):
            p = torch.softmax(prob.model(X[i:i + 1]), -1)[0]
            assert scores[i][1] == pytest.approx(float((p - F.one_hot(y[i], 10)).norm()), rel=1e-5)
    assert len(scores) == len(y)


def test_intrinsic_dim_curve_and_conventions(prob, tmp_path):
    rows = dict(diagnose.intrinsic(prob, tmp_path, dims=(5, 40), steps=20))
    assert set(rows) == {5, 40, "direct", "d_int90_relative", "d_int90_absolute"}
    first = lambda target: next((d for d in (5, 40) if rows[d] >= target), None)   # noqa: E731
    assert rows["d_int90_relative"] == first(0.9 * rows["direct"]) and rows["d_int90_absolute"] == first(0.9)


def test_hessian_products_run_through_the_byte_gpt():
    from torchstep.bench.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(context=8, width=16, depth=1, heads=2)).double()
    idx = torch.randint(0, 256, (2, 8))
    loss = lambda logits, t: F.cross_entropy(logits.flatten(0, 1), t.flatten())   # noqa: E731
    op = CurvatureOperator(model, loss, (idx, idx.roll(1, 1)))
    g = torch.Generator().manual_seed(1)
    v, w = (torch.randn(op.dim, generator=g, dtype=torch.float64) for _ in range(2))
    assert float(w @ (op @ v)) == pytest.approx(float(v @ (op @ w)), rel=1e-8)   # symmetric H


def test_cli_rejects_a_task_without_a_probe(capsys):
    with pytest.raises(SystemExit):
        cli.main(["diagnose", "hessian", "--task", "quadratic"])
    assert "Invalid task" in capsys.readouterr().err
