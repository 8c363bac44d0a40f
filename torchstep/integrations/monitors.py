"""Run :class:`torchstep.diagnostics.monitor.Monitor` objects from a plain loop, a Hugging Face ``Trainer`` or a
Lightning ``Trainer``, logging every record to TensorBoard when a writer is given.

```python
monitors = MonitorSet([SharpnessMonitor(every=50)], loss_fn=F.cross_entropy, probe=(x_probe, y_probe))
for step, (x, y) in enumerate(loader):
    ...; opt.step()
    monitors.step(step, model, opt)                 # measures on the fixed probe batch (or pass batch=(x, y))
trainer = transformers.Trainer(..., callbacks=[monitors.hf_callback()])
trainer = pytorch_lightning.Trainer(callbacks=[monitors.lightning_callback()])
```

The adapters run after each optimizer step (the Trainer zeroes the gradients before callbacks see them), so
monitors that need this step's gradient before the update — ``SafeRadiusMonitor`` — belong in a plain loop,
called between ``backward()`` and ``step()``.  Hugging Face callbacks are not given the training batch, so the monitors there measure on ``probe`` (a fixed
batch: comparable across steps, the usual choice for sharpness); Lightning passes the batch, which is used
when no probe is set (``batch_to_pair`` maps it to ``(inputs, targets)``).  Each monitor chooses its own
train/eval mode (the diagnostics default to eval); the model's mode is restored after every measurement.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..diagnostics.monitor import LossFn, Monitor


class MonitorSet:
    """Several monitors sharing a loss, a probe batch and an optional TensorBoard ``SummaryWriter``.

    Args:
        monitors: the monitors.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        probe: a fixed ``(inputs, targets)`` batch, or None to use the batch given to :meth:`step`.
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or anything with ``add_scalar``), or None.
        batch_to_pair: maps a trainer's batch to ``(inputs, targets)`` (default: the batch itself).
    """

    def __init__(self, monitors: Iterable[Monitor], loss_fn: LossFn, probe: tuple[Any, Any] | None = None,
                 writer: Any = None, batch_to_pair: Callable[[Any], tuple[Any, Any]] = lambda b: b) -> None:
        self.monitors = list(monitors)
        if not self.monitors or not all(isinstance(m, Monitor) for m in self.monitors):
            raise ValueError("Invalid monitors: (valid range: one or more torchstep Monitor objects)")
        self.loss_fn, self.probe, self.writer, self.batch_to_pair = loss_fn, probe, writer, batch_to_pair
        # one key per monitor: two of the same kind get name, name_2, … (records and TensorBoard tags)
        seen: dict[str, int] = {}
        self.keys = []
        for m in self.monitors:
            seen[m.name] = seen.get(m.name, 0) + 1
            self.keys.append(m.name if seen[m.name] == 1 else f"{m.name}_{seen[m.name]}")

    def step(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
             batch: tuple[Any, Any] | None = None) -> dict[str, dict[str, float]]:
        """Run every due monitor; returns ``key → record`` (:attr:`keys`: the monitor's name, suffixed ``_2``,
        ``_3`` … for repeats) for those that measured."""
        batch = self.probe if self.probe is not None else batch
        if batch is None:
            raise ValueError("Invalid batch: none given and no probe set (valid range: a probe or a batch)")
        out = {}
        flags = [(m, m.training) for m in model.modules()]       # per module: a frozen BatchNorm stays frozen
        try:
            for name, m in zip(self.keys, self.monitors):
                if step % m.every:
                    continue
                record = m(step, model=model, optimizer=optimizer, loss_fn=self.loss_fn, batch=batch)
                out[name] = record
                if self.writer is not None:
                    for key, value in record.items():
                        if key != "step":
                            self.writer.add_scalar(f"{name}/{key}", value, step)
        finally:
            for m, flag in flags:
                m.training = flag
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"monitors": [m.state_dict() for m in self.monitors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, s in zip(self.monitors, state["monitors"]):
            m.load_state_dict(s)

    def hf_callback(self):
        """A ``transformers.TrainerCallback`` running the set after each optimizer step (needs ``probe``)."""
        from transformers import TrainerCallback
        if self.probe is None:
            raise ValueError("Invalid probe: the Hugging Face Trainer gives callbacks no batch (valid range: set probe)")
        owner = self

        class TorchstepMonitors(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
                # the Trainer hands over accelerate's AcceleratedOptimizer: the rule's thresholds need the real one
                owner.step(state.global_step, model, getattr(optimizer, "optimizer", optimizer))
        return TorchstepMonitors()

    def lightning_callback(self):
        """A Lightning ``Callback`` running the set after each training batch."""
        try:
            from lightning.pytorch import Callback
        except ImportError:
            from pytorch_lightning import Callback
        owner = self

        class TorchstepMonitors(Callback):
            last = None

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == self.last:      # gradient accumulation: one record per optimizer step
                    return
                self.last = trainer.global_step
                opt = trainer.optimizers[0] if trainer.optimizers else None
                with torch.enable_grad():
                    owner.step(trainer.global_step, pl_module, opt, owner.batch_to_pair(batch))
        return TorchstepMonitors()


__all__ = ["MonitorSet"]
