"""``torchstep bench`` / ``bench speed`` / ``report`` / ``width-sweep`` wiring: one analysis per run, one
best-lr rule, one arms table, the dependency direction diagnostics ← bench ← cli."""
import pathlib
import subprocess
import sys

import pytest
import torch

from torchstep import cli
from torchstep.bench import analysis, report, speed, stats, sweep
from torchstep.bench.arms import ARMS, WIDTH_SWEEP_ARMS
from torchstep.registry import SPECS

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread_restored():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_best_lr_is_one_rule_for_the_plan_and_the_report():
    assert sweep.best_lr is stats.best_lr
    assert stats.best_lr({1e-3: {"final_val": 1.0, "diverged": 0}, 1e-2: {"final_val": 0.5, "diverged": 1},
                          1e-1: {"final_val": 2.0, "diverged": 0}}) == 1e-3
    assert stats.best_lr({1e-3: {"final_val": 1.0, "diverged": 1}}) is None
    rows = [{"task": "t", "arm": "a", "seed": 0, "lr": lr, "final_val": v, "diverged": d}
            for lr, v, d in ((1e-3, 3.0, 0), (1e-2, 1.0, 0), (1e-1, 0.1, 1))]
    rows.append({"task": "t", "arm": "a", "seed": 1, "lr": 1e-1, "final_val": 0.0, "diverged": 0})  # not tuning
    assert analysis.status_from_rows(rows) == {("t", "a"): {"best": 1e-2, "edge": False}}
    rows[1]["diverged"] = 1
    assert analysis.status_from_rows(rows) == {("t", "a"): {"best": 1e-3, "edge": True}}


def test_bench_analyses_once_and_report_rewrites_the_same_files(tmp_path, monkeypatch, capsys):
    calls = []

    def counting(db):
        calls.append(db)
        return real(db)

    real = analysis.analyse
    monkeypatch.setattr(analysis, "analyse", counting)
    monkeypatch.setattr(report, "analyse", counting)
    cli.main(["bench", "--tasks", "quadratic", "--optimizers", "adamw", "--seeds", "1", "--steps", "quadratic=20",
              "--workers", "1", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert len(calls) == 1
    assert "| task | winner |" in out and "| quadratic | adamw |" in out and f"report: {tmp_path}" in out
    names = ("report.md", "runs.csv", "summary.csv")
    first = {n: (tmp_path / n).read_bytes() for n in names}
    for n in names:
        (tmp_path / n).unlink()
    cli.main(["report", str(tmp_path)])
    assert len(calls) == 2 and {n: (tmp_path / n).read_bytes() for n in names} == first
    assert (tmp_path / "figures" / "quadratic.png").exists()


def test_bench_speed_is_a_subcommand_with_its_own_flags(tmp_path, capsys, one_thread_restored):
    parser = cli.build_parser()
    plain = parser.parse_args(["bench", "--suite", "smoke", "--steps", "quadratic=10"])
    assert plain.func is cli.cmd_bench and plain.steps == ["quadratic=10"] and plain.bench_command is None
    timed = parser.parse_args(["bench", "speed", "--rounds", "2", "--steps", "5", "--optimizers", "lion",
                               "--out", "f.md"])
    assert timed.func is cli.cmd_bench_speed and (timed.rounds, timed.steps, timed.optimizers, timed.out) == \
        (2, 5, ["lion"], "f.md")
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--speed-steps", "3"])       # the old spelling is gone
    with pytest.raises(SystemExit):
        cli.main(["bench", "speed", "--optimizers", "adam"])
    assert "unknown optimizer adam; valid: adamw, lion" in capsys.readouterr().err
    path = tmp_path / "speed.md"
    cli.main(["bench", "speed", "--rounds", "1", "--steps", "1", "--optimizers", "lion", "--out", str(path)])
    text = path.read_text()
    assert "torch AdamW (fused)" in text and "torchstep lion" in text and "torchstep adamp" not in text
    assert "Muon family" not in text and "1 interleaved rounds × 1 timed steps" in text
    for device, message in (("nonsense", "invalid --device"), ("cuda", "no CUDA device")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit):
            cli.main(["bench", "speed", "--device", device, "--optimizers", "lion"])
        assert message in capsys.readouterr().err


def test_speed_candidates_come_from_the_arms_table():
    labels = speed.candidates()
    ours = [label.split()[-1] for label in labels if label.startswith("torchstep ")]
    assert ours == [name for name in ARMS if name in SPECS]
    try:
        import pytorch_optimizer  # noqa: F401
        peers = {name for name, arm in ARMS.items() if name in SPECS and arm.peer}
    except ImportError:
        peers = set()
    assert {label.split()[-1] for label in labels if label.startswith("pytorch-optimizer ")} == peers
    p = torch.zeros(4, 4, requires_grad=True)
    sgdp = labels["torchstep sgdp"]([p])
    assert sgdp.param_groups[0]["lr"] == ARMS["sgdp"].default_lr and sgdp.param_groups[0]["momentum"] == 0.9
    # the Muon-family rows keep the labels of docs/speed.md
    doc = (ROOT / "docs" / "speed.md").read_text()
    assert all(f"| {label} " in doc for label in speed.muon_candidates())


def test_width_sweep_uses_the_bench_arms_and_does_not_import_bench(capsys, one_thread_restored):
    code = ("import sys, torchstep.diagnostics.width_sweep as w; assert not hasattr(w, 'ARMS'); "
            "assert not [m for m in sys.modules if m.startswith('torchstep.bench')], 'diagnostics imports bench'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cli.main(["width-sweep", "--widths", "8", "--steps", "1"])
    out = capsys.readouterr().out
    assert all(f"| {name} | 8 |" in out for name in WIDTH_SWEEP_ARMS)
