"""Trainer integrations, each with the real library (skipped only where it cannot be imported)."""
import pytest
import torch
import torch.nn.functional as F

import torchstep
from torchstep.integrations import hf


def test_create_partitions_a_model_and_records_names():
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "body": torch.nn.Linear(4, 4),
                                 "norm": torch.nn.LayerNorm(4), "head": torch.nn.Linear(4, 10)})
    opt = torchstep.create("lion", model, weight_decay=0.5, overrides={"embedding": {"lr": 1e-5}})
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["matrix"]["param_names"] == ["body.weight"]
    assert by_name["embedding"]["param_names"] == ["emb.weight"] and by_name["embedding"]["lr"] == 1e-5
    assert by_name["head"]["param_names"] == ["head.weight"]
    assert sorted(by_name["no_decay"]["param_names"]) == ["body.bias", "head.bias", "norm.bias", "norm.weight"]
    assert by_name["no_decay"]["weight_decay"] == 0.0 and by_name["matrix"]["weight_decay"] == 0.5
    assert "head.weight" in torchstep.routing_report(opt.param_groups)
    with pytest.raises(ValueError, match="Unknown optimizer 'nope'"):
        torchstep.create("nope", model)
    classp = torchstep.create("classp", model)       # no weight decay hyperparameter: keys dropped
    assert all("weight_decay" not in g for g in classp.param_groups)


def test_hugging_face_trainer_factory_path(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    data = [{"input_ids": torch.randint(0, 32, (16,)), "labels": torch.randint(0, 32, (16,))} for _ in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizer_cls_and_kwargs=(hf.factory("lion"), {"lr": 1e-3}))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torchstep.optim.Lion)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "transformer.h.0.mlp.c_fc.weight" in moved
    assert len(moved) == len(before)


def test_lightning_calls_step_with_a_closure():
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 1)
            self.losses = []

        def training_step(self, batch, _):
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torchstep.create("sophiag", self, lr=3e-2, bs=16)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    loader = torch.utils.data.DataLoader(list(zip(x, x.sum(1, keepdim=True))), batch_size=16)
    module = Module()
    trainer = pl.Trainer(max_epochs=10, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    assert len(module.losses) == 40                       # the closure ran once per step
    assert module.losses[-1] < 0.3 * module.losses[0]


def test_timm_registration():
    timm_optim = pytest.importorskip("timm.optim", reason="timm needs torchvision, which has no CPU wheel here")
    from torchstep.integrations import timm as ts_timm
    names = ts_timm.register()
    assert "torchstep-lion" in names
    model = torch.nn.Linear(4, 4)
    opt = timm_optim.create_optimizer_v2(model, "torchstep-lion", lr=1e-4, weight_decay=0.1)
    assert isinstance(opt, torchstep.optim.Lion)


def test_tied_parameters_are_routed_once():
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(5, 4), "lm_head": torch.nn.Linear(4, 5, bias=False)})
    model.lm_head.weight = model.emb.weight
    assert torchstep.partition.classify(model) == {"emb.weight": "embedding"}
    opt = torchstep.create("adamp", model)
    assert [g["param_names"] for g in opt.param_groups] == [["emb.weight"]]
