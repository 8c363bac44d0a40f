"""Monitors from a plain loop, the HF Trainer callback path and Lightning, with TensorBoard-style logging."""
import pytest
import torch
import torch.nn.functional as F

from torchstep.diagnostics.monitor import Monitor
from torchstep.integrations.monitors import MonitorSet


class ProbeLoss(Monitor):
    name = "probe"

    def measure(self, *, model, optimizer, loss_fn, batch, step):
        model.eval()                                    # monitors pick their mode; the set restores it
        with torch.no_grad():
            return {"loss": float(loss_fn(model(batch[0]), batch[1])),
                    "lr": optimizer.param_groups[0]["lr"] if optimizer else float("nan")}


class Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return torch.nn.Linear(4, 1), (x, x.sum(1, keepdim=True))


def test_plain_loop_records_every_k_steps_logs_and_restores_mode():
    model, probe = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = Writer()
    monitors = MonitorSet([ProbeLoss(every=3)], F.mse_loss, probe=probe, writer=writer)
    for step in range(7):
        loss = F.mse_loss(model(probe[0]), probe[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = F.mse_loss(model(probe[0]), probe[1]).item()
        out = monitors.step(step, model, opt)
        assert model.training
        if step % 3 == 0:
            assert out["probe"]["loss"] == pytest.approx(before)
        else:
            assert out == {}
    hist = monitors.monitors[0].history
    assert [r["step"] for r in hist] == [0, 3, 6] and hist[-1]["loss"] < hist[0]["loss"]
    assert ("probe/loss", hist[1]["loss"], 3) in writer.scalars and ("probe/lr", 0.1, 6) in writer.scalars
    copy = MonitorSet([ProbeLoss(every=1)], F.mse_loss, probe=probe)
    copy.load_state_dict(monitors.state_dict())
    assert copy.monitors[0].history == hist and copy.monitors[0].every == 3


def test_a_frozen_submodule_keeps_its_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    model.train()
    model[1].eval()                                     # frozen statistics inside a training model
    x = torch.randn(8, 4)
    MonitorSet([ProbeLoss()], F.mse_loss, probe=(x, x[:, :1])).step(0, model)
    assert model.training and model[0].training and not model[1].training


def test_two_monitors_of_one_kind_keep_separate_keys():
    model, probe = _problem()
    writer = Writer()
    out = MonitorSet([ProbeLoss(), ProbeLoss(every=2)], F.mse_loss, probe=probe, writer=writer).step(0, model)
    assert set(out) == {"probe", "probe_2"} and {t for t, _, _ in writer.scalars} >= {"probe/loss", "probe_2/loss"}


def test_bad_sets_and_missing_batches_are_rejected():
    model, probe = _problem()
    with pytest.raises(ValueError, match="monitors"):
        MonitorSet([], F.mse_loss)
    with pytest.raises(ValueError, match="every"):
        ProbeLoss(every=0)
    with pytest.raises(ValueError, match="batch"):
        MonitorSet([ProbeLoss()], F.mse_loss).step(0, model)
    with pytest.raises(ValueError, match="probe"):
        MonitorSet([ProbeLoss()], F.mse_loss).hf_callback()


def test_hf_callback_measures_on_the_probe_at_the_global_step():
    from transformers import TrainerControl, TrainerState, TrainingArguments
    model, probe = _problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitors = MonitorSet([ProbeLoss(every=2)], F.mse_loss, probe=probe)
    cb = monitors.hf_callback()
    state = TrainerState()

    class Wrapped:                                      # what the Trainer passes: accelerate's wrapper
        def __init__(self, optimizer):
            self.optimizer = optimizer
    opt_passed = Wrapped(opt)
    for step in (1, 2, 4):
        state.global_step = step
        cb.on_step_end(TrainingArguments(output_dir="/tmp/unused", report_to=[]), state, TrainerControl(),
                       model=model, optimizer=opt_passed)
    assert [r["step"] for r in monitors.monitors[0].history] == [2, 4]
    assert monitors.monitors[0].history[0]["lr"] == 0.05


def test_lightning_callback_uses_the_training_batch():
    pl = pytest.importorskip("pytorch_lightning")
    model, probe = _problem()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return F.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(list(zip(*probe)), batch_size=16)
    monitors = MonitorSet([ProbeLoss(every=1)], F.mse_loss)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[monitors.lightning_callback()])
    trainer.fit(Module(), loader)
    hist = monitors.monitors[0].history
    assert [r["step"] for r in hist] == [1, 2, 3, 4] and all(r["lr"] == 0.1 for r in hist)
