"""The ``finetune-bytes`` harness task: the frozen target domain, the cached pretraining, every method as an arm."""
import json

import pytest
import torch

from torchstep.bench import arms, finetune as F, report, sweep
from torchstep.bench.runner import resolve, run_trial
from torchstep.bench.tasks import TASKS

SMALL = dict(pretrain_steps=20, val_batches=2)       # a cheap base for the tests (own cache key)
TRAIN_BYTES, VAL_BYTES = 435_130, 30_987


@pytest.fixture(autouse=True)
def cache(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    F.set_cache_dir(tmp_path_factory.getbasetemp() / "ft-cache")     # one pretraining per test session/worker
    yield
    F.set_cache_dir(None)
    torch.set_num_threads(n)


def test_target_domain_is_the_frozen_pydoc_topics_split_by_topic():
    train, val = F.domain_text()
    assert (len(train), len(val)) == (TRAIN_BYTES, VAL_BYTES)
    assert bytes(train[:22]).decode() == 'The "assert" statement'      # topics in name order, the first trains
    assert b'The "assert" statement' not in bytes(val)


def test_pretraining_is_cached_by_config_and_loaded_weights_only(tmp_path):
    F.set_cache_dir(tmp_path)
    o = {**TASKS["finetune-bytes"].options, **SMALL}
    first = F.pretrained(o)
    files = sorted(p.name for p in tmp_path.glob("pretrained-*.pt"))
    assert len(files) == 1
    again = F.pretrained(o)                                   # loaded, not retrained
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert torch.load(tmp_path / files[0], weights_only=True)["config"]["pretrain_steps"] == 20
    F.pretrained({**o, "pretrain_lr": 1e-3})                  # another config: another file
    assert len(list(tmp_path.glob("pretrained-*.pt"))) == 2


def _problem(method, **spec):
    p = TASKS["finetune-bytes"].problem(0, **SMALL)
    p.configure({"method": method, **spec})
    return p


def test_methods_leave_the_expected_tensors_trainable():
    d, L = 64, 2                                    # width, depth; per block: qkv d×3d, proj d×d, fc d×4d, fc_proj 4d×d
    lora = sum(8 * (i + o) for i, o in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d))) * L
    counts = {m: _problem(m).evaluate()["trainable"] for m in ("full", "lora", "dora", "allora", "hut")}
    total = sum(p.numel() for p in GPTCount.model().parameters())
    assert counts["full"] == total == 135_488
    assert counts["lora"] == counts["allora"] == lora == 16_384
    assert counts["dora"] == lora + L * (3 * d + d + 4 * d + d)   # + one magnitude per output row
    assert counts["hut"] == lora + L * 2 * (3 * d + d + 4 * d + d)   # + γ, β per output row


class GPTCount:
    @staticmethod
    def model():
        return F.GPT(F.model_config(TASKS["finetune-bytes"].options))


def test_every_method_trains_through_the_harness_and_reports_forgetting(tmp_path):
    db = str(tmp_path / "results.sqlite")
    before = TASKS["finetune-bytes"].problem(0, **SMALL).evaluate()["original"]   # the pretrained model's
    for arm in arms.FINETUNE_ARMS:
        row = run_trial(resolve("finetune-bytes", arm.name, arm.default_lr, 0, 6, "final", SMALL, evals=1), db)
        m = json.loads(row["final_metrics"])
        assert row["final_val"] < row["init_val"], arm.name           # the new domain's loss falls
        assert m["forgetting"] == pytest.approx(m["original"] - before, abs=1e-6), arm.name
        assert row["state_bytes"] > 0, arm.name
    assert list(tmp_path.glob("pretrained-*.pt"))                     # the base is cached in the results dir
    md = report.write(tmp_path).read_text()                           # the report's method section and figure
    section = md.split("### finetune-bytes: fine-tuning methods")[1].split("![")[0]
    assert all(f"| {arm.name} |" in section for arm in arms.FINETUNE_ARMS)
    assert "| lora | 0.003 | 1 | " in section and (tmp_path / "figures" / "finetune-bytes-methods.png").exists()


def test_mgpo_step_leaves_the_frozen_base_bitwise_unchanged_and_hft_changes_half_per_round():
    p = _problem("mgpo")
    base = {n: q.detach().clone() for n, q in p.model.named_parameters() if "base_layer" in n}
    opt = arms.ArmOptimizer(arms.ARMS["mgpo"], p, 3e-3, 10)
    for step in range(3):                            # from step 2 on the optimizer has momentum: W is perturbed
        loss = p.train_loss(step)
        opt.zero_grad()
        p.backward(loss)
        opt.step()
    assert p.configure.__self__.mgpo.gbar and all(torch.equal(base[n], q) for n, q in p.model.named_parameters() if n in base)
    h = _problem("hft", round_steps=2)
    ArmOpt = arms.ArmOptimizer(arms.ARMS["hft"], h, 1e-3, 10)
    masks = []
    for step in range(4):
        loss = h.train_loss(step)
        masks.append({n for n, q in h.model.named_parameters() if q.requires_grad})
        ArmOpt.zero_grad()
        loss.backward()
        ArmOpt.step()
    assert masks[0] == masks[1] and masks[2] == masks[3] and masks[0] != masks[2]


def test_finetune_arms_run_only_on_the_finetune_task_and_its_suite_searches_lr():
    with pytest.raises(ValueError, match="does not apply"):
        resolve("quadratic", "lora", 1e-3, 0, 10, "tune")
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        _problem("ia3")
    suite = sweep.SUITES["finetune"]
    assert set(suite.arms) == {a.name for a in arms.FINETUNE_ARMS} and suite.grid_points == 4
    assert "finetune-bytes" in sweep.SUITES["full"].tasks
