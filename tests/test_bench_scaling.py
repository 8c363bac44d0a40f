"""The harness' scaling pieces: the two-pass refined schedule, μP gpt-bytes, the lr-transfer report."""
import json

import pytest
import torch

from torchstep.bench import arms, runner, transfer
from torchstep.bench.gpt import GPT, GPTConfig
from torchstep.bench.runner import resolve, run_trial
from torchstep.bench.store import trial_id, write_trial
from torchstep.bench.tasks import TASKS
from torchstep.scaling import MuReadout, mu_shapes
from torchstep.schedules import refined_schedule


@pytest.mark.parametrize("arm, norm", [("adamw", "l1"), ("sgd", "l2")])
def test_refined_trial_runs_pass_two_on_the_refined_schedule_of_pass_one(monkeypatch, arm, norm):
    recorders = []
    real = runner.GradNormRecorder

    def spy(*args, **kw):
        recorders.append(real(*args, **kw))
        assert recorders[-1].ord == (1.0 if norm == "l1" else 2.0)
        return recorders[-1]
    monkeypatch.setattr(runner, "GradNormRecorder", spy)
    config = resolve("quadratic", arm, 3e-3, 0, 40, "tune", {"d": 16, "n": 256}, schedule="refined")
    assert config["schedule"] == arms.SCHEDULES["refined"][0]
    first = runner._refined_pass(config, TASKS["quadratic"], arms.ARMS[arm])
    norms = recorders[0].norms()
    assert len(norms) == 40
    expected = refined_schedule(norms, 40, norm=norm)
    assert [first["curve_fn"](t, 40, 2) for t in range(40)] == expected
    assert expected[-1] == 0 and max(expected) == 1
    row = run_trial(config)
    assert not row["diverged"] and row["final_val"] < row["init_val"]
    linear = run_trial(resolve("quadratic", arm, 3e-3, 0, 40, "tune", {"d": 16, "n": 256}, schedule="linear"))
    assert row["final_val"] != linear["final_val"]             # pass 2, not pass 1, is the result


def test_refined_trial_whose_first_pass_diverges_is_diverged():
    config = resolve("quadratic", "sgd", 1e3, 0, 20, "tune", {"d": 16, "n": 256}, schedule="refined")
    assert run_trial(config)["diverged"]


def test_mup_gpt_equals_sp_at_the_base_width_and_scales_above_it():
    cfg = GPTConfig(context=16, width=32, depth=1, heads=2)
    x = torch.randint(0, 256, (2, 16))
    torch.manual_seed(0)
    sp = GPT(cfg)
    torch.manual_seed(0)
    mu = GPT(GPTConfig(context=16, width=32, depth=1, heads=2, mup_base_width=32))
    assert torch.equal(sp(x), mu(x))                           # μP is SP at its base width, bit for bit
    torch.manual_seed(0)
    wide = GPT(GPTConfig(context=16, width=128, depth=1, heads=2, mup_base_width=32))
    assert isinstance(wide.head, MuReadout) and wide.head.width_mult == 4
    shapes = mu_shapes(wide)
    assert shapes["blocks.0.qkv.weight"].hidden and not shapes["head.weight"].hidden
    assert not shapes["embed.weight"].hidden
    assert wide.blocks[0].attn_scale == pytest.approx(4 / 64)  # √d₀/d_head with d₀ = 16, d_head = 64
    assert wide.blocks[0].fc.weight.std().item() == pytest.approx(0.01, rel=0.05)   # 0.02 × 4^-½
    with pytest.raises(ValueError, match="mup_base_width"):
        GPT(GPTConfig(width=64, heads=4, mup_base_width=30))


def test_mup_lr_in_the_harness_follows_each_arms_rule():
    opts = {"width": 64, "depth": 1, "heads": 2, "context": 16, "batch": 2, "mup_base_width": 16}
    problem = TASKS["gpt-bytes"].problem(0, **opts)
    assert problem.mup_width_mult == 4
    adamw = arms.ArmOptimizer(arms.ARMS["adamw"], problem, 1e-2, 10)
    muon = arms.ArmOptimizer(arms.ARMS["muon-fp32"], problem, 1e-2, 10)
    assert adamw.rule.param_groups[0]["initial_lr"] == pytest.approx(2.5e-3)
    assert muon.rule.param_groups[0]["initial_lr"] == pytest.approx(5e-3)     # match_rms_adamw: lr/√m
    sgd = arms.ArmOptimizer(arms.ARMS["sgd"], problem, 1e-2, 10)
    assert sgd.rule.param_groups[0]["initial_lr"] == pytest.approx(1e-2)      # MuSGD: lr/(m_in/m_out) = lr
    with pytest.raises(ValueError, match="no μP rule"):
        arms.ArmOptimizer(arms.ARMS["galore"], problem, 1e-2, 10)
    assert arms.mup_lr_factor("galore", 1) == 1
    assert resolve("gpt-bytes", "adamw", 1e-2, 0, 10, "tune", {"width": 64})["task_options"] == \
        resolve("gpt-bytes", "adamw", 1e-2, 0, 10, "tune", {"width": 64, "mup_base_width": 0})["task_options"]


def _row(p, width, lr, val, steps=1):
    config = resolve("gpt-bytes", "adamw", lr, 0, steps, "tune",
                     {"width": width, "mup_base_width": 32 if p == "mup" else 0, "tied_fallback": True})
    return {"trial_id": trial_id(config), "task": "gpt-bytes", "arm": "adamw", "lr": lr, "seed": 0, "steps": steps,
            "phase": "tune", "config": json.dumps(config), "env": "{}", "init_val": 5.0, "final_val": val,
            "diverged": 0, "cpu_s": 0.0, "wall_s": 0.0, "opt_cpu_s": 0.0, "state_bytes": 0,
            "final_metrics": "{}", "finished": 0.0}


def test_transfer_summary_reports_best_lr_spread_and_regret(tmp_path):
    db = tmp_path / "results.sqlite"
    vals = {("sp", 32): {1e-3: 3.0, 3e-3: 2.8, 1e-2: 2.9}, ("sp", 64): {1e-3: 2.9, 3e-3: 2.85, 1e-2: 2.6},
            ("mup", 32): {1e-3: 3.0, 3e-3: 2.8, 1e-2: 2.9}, ("mup", 64): {1e-3: 2.9, 3e-3: 2.7, 1e-2: 2.75}}
    for (p, w), runs in vals.items():
        for lr, v in runs.items():
            write_trial(db, _row(p, w, lr, v), [])
    write_trial(db, _row("sp", 64, 3e-3, 0.1, steps=2), [])   # another budget in the same database: ignored
    plan = transfer.suites(("adamw",), (32, 64), 1, 1, 3, {})
    rows = {(r["param"], r["width"]): r for r in transfer.summary(db, plan)}
    assert rows[("sp", 64)]["best_lr"] == 1e-2 and rows[("sp", 64)]["regret"] == pytest.approx(0.25)
    assert rows[("mup", 64)]["best_lr"] == 3e-3 and rows[("mup", 64)]["regret"] == 0
    assert transfer.spread(list(rows.values()), "adamw", "sp") == pytest.approx(2 * 0.5229, abs=1e-3)
    assert transfer.spread(list(rows.values()), "adamw", "mup") == 0
    transfer.figure(db, plan, tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    transfer.write_csv(db, plan, tmp_path / "t.csv")
    assert len((tmp_path / "t.csv").read_text().splitlines()) == 1 + 12


def test_monitored_trial_records_sharpness_and_trains_exactly_as_unmonitored(tmp_path):
    from torchstep.bench import eos, sweep
    from torchstep.bench.analysis import analyse
    from torchstep.bench.store import curves
    opts = {"hidden": 16, "batch": 32}
    plain = resolve("digits-mlp", "sgd", 0.1, 0, 20, "tune", opts)
    watched = resolve("digits-mlp", "sgd", 0.1, 0, 20, "tune", opts, monitor={"name": "sharpness", "every": 10})
    assert "monitor" not in plain and watched["monitor"] == {"name": "sharpness", "every": 10}
    db = tmp_path / "results.sqlite"
    a, b = run_trial(plain), run_trial(watched, str(db))
    assert a["final_val"] == b["final_val"]                     # measuring does not touch the training
    sharp = curves(db, "monitor/sharpness")[b["trial_id"]]
    ratio = curves(db, "monitor/ratio")[b["trial_id"]]
    assert [p[0] for p in sharp] == [10] and sharp[0][1] > 0
    # sgd here: heavy ball β = 0.9, threshold (2 + 2β)/η on the rule's tensors (biases on the fallback: η = 0)
    assert 0 < ratio[0][1] <= sharp[0][1] * 0.1 / 3.8 * (1 + 1e-9)
    with pytest.raises(ValueError, match="monitor"):
        resolve("digits-mlp", "sgd", 0.1, 0, 20, "tune", opts, monitor={"name": "nope", "every": 1})
    with pytest.raises(ValueError, match="probe"):
        run_trial(resolve("quadratic", "sgd", 0.1, 0, 5, "tune", {"d": 4, "n": 16},
                          monitor={"name": "sharpness", "every": 1}))
    assert eos.threshold_rule("sgd") == "heavy_ball" and eos.threshold_rule("lion") == "gd*"
